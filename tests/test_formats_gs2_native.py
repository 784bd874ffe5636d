"""Gemma Scope 2 and native formats, the format registry and the `convert` verb.

GS2 folders are built here in the exact released layout (docs/formats.md) with the real
`safetensors` package and random numpy weights; the loaded dictionaries are checked against
an independent float64 numpy computation of the GS2 formulas. Round trips GS2 -> native ->
GS2 must reproduce every tensor byte for byte and config.json exactly; native -> native is
bit-for-bit for every kind (bfloat16, Matryoshka, b_pre included). Bad inputs give a
FormatError naming file and tensor, and leave no output behind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemmascope_jax.cli import run_verb
from gemmascope_jax.cli.convert import add_convert_parser
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.formats import (
    FORMATS,
    canonical_format,
    detect_format,
    load_dictionary,
    save_dictionary,
)
from gemmascope_jax.formats.gemma_scope_2 import read as gs2_read
from gemmascope_jax.formats.gemma_scope_2 import write as gs2_write
from gemmascope_jax.formats.io import FormatError

D, F = 16, 32  # d_model, latents per layer
MODEL = "google/gemma-3-270m-it"  # 18 layers


# ---- GS2 folders in the released layout -----------------------------------------------------


def _gs2_tensors(rng, d_in, d_out, width, affine, layers_out=None, source=0, upstream=0.0):
    """One GS2 params file: single-layer (`layers_out` None) or multi-layer source `source`
    with w_dec [F, layers_out, d_out], zeros upstream unless `upstream` != 0."""
    t = {
        "w_enc": rng.normal(0, 1 / np.sqrt(d_in), (d_in, width)),
        "b_enc": rng.normal(0, 0.1, (width,)),
        "threshold": rng.uniform(0.1, 1.0, (width,)),
        "b_dec": rng.normal(0, 0.1, (d_out,)),
    }
    if layers_out is None:
        t["w_dec"] = rng.normal(0, 0.3, (width, d_out))
    else:
        w_dec = rng.normal(0, 0.3, (width, layers_out, d_out))
        w_dec[:, :source, :] = upstream
        t["w_dec"] = w_dec
    if affine:
        t["affine_skip_connection"] = rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_out))
    return {k: v.astype(np.float32) for k, v in t.items()}


def _single_config(hook_in, hook_out, width, type_, affine, l0=18, model_name=MODEL):
    return {
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "width": width,
        "model_name": model_name,
        "architecture": "jump_relu",
        "l0": l0,
        "affine_connection": affine,
        "type": type_,
    }


SINGLE = {
    "sae": dict(
        folder="resid_post/layer_5_width_16k_l0_small",
        hooks=("model.layers.5.output",) * 2,
        type_="sae",
        affine=False,
        d_in=D,
    ),
    "transcoder": dict(
        folder="transcoder/layer_7_width_16k_l0_medium",
        hooks=(
            "model.layers.7.pre_feedforward_layernorm.output",
            "model.layers.7.post_feedforward_layernorm.output",
        ),
        type_="transcoder",
        affine=False,
        d_in=D,
    ),
    "affine_transcoder": dict(
        folder="transcoder/layer_9_width_16k_l0_small_affine",
        hooks=(
            "model.layers.9.pre_feedforward_layernorm.output",
            "model.layers.9.post_feedforward_layernorm.output",
        ),
        type_="transcoder",
        affine=True,
        d_in=D,
    ),
    "attn_sae": dict(  # attn_out sites read the o_proj input: H*hd != d_model
        folder="attn_out_all/layer_2_width_16k_l0_small",
        hooks=("model.layers.2.self_attn.o_proj.input",) * 2,
        type_="sae",
        affine=False,
        d_in=24,
    ),
}


def make_single(root: Path, name: str, seed: int = 0) -> tuple[Path, dict]:
    spec = SINGLE[name]
    folder = root / "gemma-scope-2-270m-it" / spec["folder"]
    folder.mkdir(parents=True)
    d_in = spec["d_in"]
    d_out = D if spec["type_"] == "transcoder" else d_in
    t = _gs2_tensors(np.random.default_rng(seed), d_in, d_out, F, spec["affine"])
    save_file(t, str(folder / "params.safetensors"))
    conf = _single_config(*spec["hooks"], F, spec["type_"], spec["affine"])
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder, t


def make_multi(
    root: Path, kind: str, *, config: bool, affine: bool, upstream: float = 0.0, seed: int = 0
) -> tuple[Path, list[dict], tuple[int, ...]]:
    if kind == "clt":
        layers = (0, 1, 2)
        folder = root / "clt" / f"width_{F * 3}_l0_medium{'_affine' if affine else ''}"
    else:
        layers = (1, 3, 4)
        folder = root / "crosscoder" / f"layer_1_3_4_width_{F * 3}_l0_medium"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n = len(layers)
    files = [_gs2_tensors(rng, D, D, F, affine, n, i, upstream) for i in range(n)]
    for i, t in enumerate(files):
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
    if config:
        site_in, site_out = (
            ("pre_feedforward_layernorm.output", "post_feedforward_layernorm.output")
            if kind == "clt"
            else ("output", "output")
        )
        conf = {
            "hf_hook_point_in": [f"model.layers.{i}.{site_in}" for i in layers],
            "hf_hook_point_out": [f"model.layers.{i}.{site_out}" for i in layers],
            "width": F * n,
            "architecture": "jump_relu",
            "l0": 150,
            "affine_connection": affine,
            "type": kind,
            "n_layers": n,
            "layers": list(layers),
            "width_per_layer": F,
        }
        (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder, files, layers


# ---- independent numpy GS2 formulas ------------------------------------------------------------


def np_single(t: dict, x: np.ndarray):
    p = {k: v.astype(np.float64) for k, v in t.items()}
    x = x.astype(np.float64)
    pre = x @ p["w_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * np.maximum(pre, 0)
    y = f @ p["w_dec"] + p["b_dec"]
    if "affine_skip_connection" in p:
        y = y + x @ p["affine_skip_connection"]
    return f, y


def np_multi(files: list[dict], x: np.ndarray):
    """x [..., n, D]; y[lo] = sum_{li <= lo} f[li] @ w_dec_li[:, lo] + b_dec_lo (+ x[lo] @ A_lo)."""
    n = len(files)
    p = [{k: v.astype(np.float64) for k, v in t.items()} for t in files]
    x = x.astype(np.float64)
    fs = []
    for i in range(n):
        pre = x[..., i, :] @ p[i]["w_enc"] + p[i]["b_enc"]
        fs.append((pre > p[i]["threshold"]) * np.maximum(pre, 0))
    ys = []
    for lo in range(n):
        y = p[lo]["b_dec"] + sum(fs[li] @ p[li]["w_dec"][:, lo, :] for li in range(lo + 1))
        if "affine_skip_connection" in p[lo]:
            y = y + x[..., lo, :] @ p[lo]["affine_skip_connection"]
        ys.append(y)
    return np.stack(fs, -2), np.stack(ys, -2)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def outputs(d, x):
    f = d.encode(x)
    return np.asarray(f), np.asarray(d.decode(f, x))


# ---- loading GS2 against the formulas ----------------------------------------------------------


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_layer_matches_gs2_formulas(tmp_path, name):
    folder, t = make_single(tmp_path, name)
    assert detect_format(folder) == "gemma-scope-2"
    d = load_dictionary(folder)
    spec = SINGLE[name]
    expect_kind = {"sae": "sae", "transcoder": "transcoder"}[spec["type_"]]
    expect_kind = "skip_transcoder" if spec["affine"] else expect_kind
    assert d.cfg.kind == expect_kind and d.cfg.architecture == "jumprelu"
    assert d.cfg.model_name == MODEL and d.cfg.model_num_layers == 18
    assert d.cfg.l0_target == 18 and d.cfg.dtype == "float32"
    assert list(d.cfg.hf_hook_points_in) == [spec["hooks"][0]]
    assert list(d.cfg.hf_hook_points_out) == [spec["hooks"][1]]

    x = np.random.default_rng(1).normal(size=(4, 5, spec["d_in"])).astype(np.float32)
    f_ref, y_ref = np_single(t, x)
    f, y = outputs(d, x)
    assert 0.05 < (f_ref > 0).mean() < 0.9  # a non-trivial JumpReLU pattern
    assert np.array_equal(f > 0, f_ref > 0)
    assert rel_err(f, f_ref) <= 1e-6 and rel_err(y, y_ref) <= 1e-6


@pytest.mark.parametrize("kind,affine,config", [("clt", True, False), ("clt", False, True),
                                                ("crosscoder", False, False)])  # fmt: skip
def test_multi_layer_matches_gs2_formulas(tmp_path, kind, affine, config):
    folder, files, layers = make_multi(tmp_path, kind, config=config, affine=affine)
    assert detect_format(folder) == "gemma-scope-2"
    d = load_dictionary(folder, "gs2", progress=True)
    assert d.cfg.kind == kind and d.cfg.layers == layers and d.cfg.width == F
    assert d.cfg.skip == affine and d.cfg.total_width == F * len(layers)
    site = ("mlp_in", "mlp_out") if kind == "clt" else ("resid_post", "resid_post")
    assert d.cfg.input_sites == tuple(f"{site[0]}.{i}" for i in layers)
    assert d.cfg.output_sites == tuple(f"{site[1]}.{i}" for i in layers)

    x = np.random.default_rng(2).normal(size=(3, 4, len(layers), D)).astype(np.float32)
    f_ref, y_ref = np_multi(files, x)
    f, y = outputs(d, x)
    assert 0.05 < (f_ref > 0).mean() < 0.9
    assert np.array_equal(f > 0, f_ref > 0)
    assert rel_err(f, f_ref) <= 1e-6 and rel_err(y, y_ref) <= 1e-6


def test_clt_nonzero_upstream_blocks_warn_and_are_dropped(tmp_path):
    folder, files, _ = make_multi(tmp_path, "clt", config=False, affine=False, upstream=0.5)
    with pytest.warns(gs2_read.UpstreamDecoderWarning, match="params_layer_1.safetensors"):
        d = load_dictionary(folder)
    causal = [dict(t, w_dec=t["w_dec"].copy()) for t in files]
    for i, t in enumerate(causal):
        t["w_dec"][:, :i, :] = 0
    x = np.random.default_rng(3).normal(size=(6, 3, D)).astype(np.float32)
    _, y_ref = np_multi(causal, x)
    assert rel_err(outputs(d, x)[1], y_ref) <= 1e-6


def test_model_depth_from_name_and_folder(tmp_path):
    folder, _ = make_single(tmp_path, "sae")
    conf = json.loads((folder / "config.json").read_text())
    conf["model_name"] = "gemma-v3-1b-pt"  # spelling seen in some files
    (folder / "config.json").write_text(json.dumps(conf))
    assert load_dictionary(folder).cfg.model_num_layers == 26
    conf["hf_hook_point_in"] = conf["hf_hook_point_out"] = "model.layers.30.output"
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(FormatError, match="config.json.*out of range"):
        load_dictionary(folder)
    # A CLT without config.json: the model comes from the repo folder name, and a CLT must
    # have one params_layer file per model layer.
    clt, _, _ = make_multi(tmp_path / "gemma-scope-2-270m-pt", "clt", config=False, affine=False)
    with pytest.raises(FormatError, match="3 files and google/gemma-3-270m-pt has 18 layers"):
        load_dictionary(clt)


# ---- round trips --------------------------------------------------------------------------------


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert list(ta) == list(tb) or sorted(ta) == sorted(tb), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
            assert ta[key].tobytes() == tb[key].tobytes(), f"{name}:{key}"


@pytest.mark.parametrize(
    "case", ["sae", "affine_transcoder", "attn_sae", "clt_config", "clt_bare", "crosscoder"]
)
def test_gs2_native_gs2_round_trip_is_byte_identical(tmp_path, case):
    if case in SINGLE:
        src, _ = make_single(tmp_path / "in", case)
    else:
        kind = "crosscoder" if case == "crosscoder" else "clt"
        src, _, _ = make_multi(
            tmp_path / "in", kind, config=case == "clt_config", affine=kind == "clt"
        )
    save_dictionary(load_dictionary(src), tmp_path / "native", "native")
    assert detect_format(tmp_path / "native") == "native"
    save_dictionary(load_dictionary(tmp_path / "native"), tmp_path / "back", format="gs2")
    _same_files(src, tmp_path / "back")
    if (src / "config.json").exists():
        original = json.loads((src / "config.json").read_text())
        assert json.loads((tmp_path / "back" / "config.json").read_text()) == original
    else:  # we write a config.json; it reloads to the same dictionary
        a, b = load_dictionary(src), load_dictionary(tmp_path / "back")
        assert a.cfg == b.cfg


NATIVE_CASES = {
    "sae_bf16_matryoshka": dict(
        kind="sae", d_in=D, d_out=D, layers=(3,), dtype="bfloat16", matryoshka_widths=(4, 8)
    ),
    "skip_transcoder": dict(
        kind="skip_transcoder", d_in=D, d_out=12, layers=(2,), model_name=MODEL, l0_target=60
    ),
    "topk_transcoder": dict(
        kind="transcoder", architecture="topk", k=4, d_in=D, d_out=D, layers=(1,)
    ),  # fmt: skip
    "clt_bf16": dict(
        kind="clt",
        d_in=D,
        d_out=D,
        layers=(0, 1, 2, 3),
        skip=True,
        dtype="bfloat16",
        extra={"run": "abc", "step": 7},
    ),  # fmt: skip
    "crosscoder_batchtopk": dict(
        kind="crosscoder",
        architecture="batchtopk",
        k=3,
        d_in=D,
        d_out=D,
        layers=(2, 5),
        matryoshka_widths=(8,),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_native_round_trip_is_bit_for_bit(tmp_path, case):
    kw = {"architecture": "jumprelu", "width": F, **NATIVE_CASES[case]}
    d = random_dictionary(DictionaryConfig(**kw), seed=4, pre_bias=True)
    save_dictionary(d, tmp_path / "a")
    e = load_dictionary(tmp_path / "a")
    assert e.cfg == d.cfg and e.cfg.extra == d.cfg.extra
    a, b = d.arrays(), e.arrays()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes()
    assert any(np.asarray(v).any() for k, v in b.items() if k == "b_pre")
    save_dictionary(e, tmp_path / "b", "native")
    assert (tmp_path / "a/params.safetensors").read_bytes() == (
        tmp_path / "b/params.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "a/dictionary.json").read_text()) == json.loads(
        (tmp_path / "b/dictionary.json").read_text()
    )


@pytest.mark.parametrize("kind", ["sae", "clt"])
def test_gs2_export_relu_and_pre_bias_keep_outputs(tmp_path, kind):
    layers = (0, 1, 2) if kind == "clt" else (4,)
    cfg = DictionaryConfig(kind=kind, architecture="relu", d_in=D, d_out=D, width=F, layers=layers)
    d = random_dictionary(cfg, seed=5, pre_bias=True)
    save_dictionary(d, tmp_path / "gs2", "gemma-scope-2")
    e = load_dictionary(tmp_path / "gs2")
    assert e.cfg.architecture == "jumprelu"
    x = np.random.default_rng(6).normal(size=(5, *((len(layers),) if kind == "clt" else ()), D))
    x = x.astype(np.float32)
    assert rel_err(e(x), d(x)) <= 1e-5


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_gs2_export_refuses_topk(tmp_path, arch):
    cfg = DictionaryConfig(
        kind="sae", architecture=arch, k=4, d_in=D, d_out=D, width=F, layers=(1,)
    )
    with pytest.raises(FormatError, match="JumpReLU") as e:
        save_dictionary(random_dictionary(cfg), tmp_path / "out", "gs2")
    if arch == "batchtopk":
        assert "to_jumprelu" in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---- atomic saving ------------------------------------------------------------------------------


def test_save_refuses_existing_output_and_cleans_up_failures(tmp_path, monkeypatch):
    cfg = DictionaryConfig(kind="clt", architecture="jumprelu", d_in=D, d_out=D, width=F,
                           layers=(0, 1, 2))  # fmt: skip
    d = random_dictionary(cfg, seed=7)
    out = tmp_path / "out"
    save_dictionary(d, out, "gs2")
    before = (out / "params_layer_2.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_dictionary(random_dictionary(cfg, seed=8), out, "gs2")
    assert (out / "params_layer_2.safetensors").read_bytes() == before
    save_dictionary(random_dictionary(cfg, seed=8), out, "native", force=True)
    assert detect_format(out) == "native"

    calls = []

    def fail_on_second(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(path, tensors, metadata)

    real = gs2_write.write_safetensors
    monkeypatch.setattr(gs2_write, "write_safetensors", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        save_dictionary(d, tmp_path / "fresh", "gs2")
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_dictionary(d, out, "gs2", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or temp folder
    assert detect_format(out) == "native"  # a failed forced save keeps the old output


# ---- bad input ----------------------------------------------------------------------------------


def _rewrite(folder: Path, file: str, change) -> None:
    t = load_file(str(folder / file))
    change(t)
    save_file(t, str(folder / file))


def _nan(t):
    t["w_dec"][3, 1] = np.nan


def _single_w_dec(t):
    t["w_dec"] = t["w_dec"][:, 0].copy()


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


BAD_SINGLE = {
    "truncated": (
        lambda f: (f / "params.safetensors").write_bytes(
            (f / "params.safetensors").read_bytes()[:-50]
        ),
        r"params\.safetensors: tensor '\w+' ends at .*truncated",
    ),  # fmt: skip
    "missing_tensor": (
        lambda f: _rewrite(f, "params.safetensors", lambda t: t.pop("threshold")),
        r"params\.safetensors.*missing tensor.*threshold",
    ),
    "transposed_w_enc": (
        lambda f: _rewrite(f, "params.safetensors", lambda t: t.update(w_enc=t["w_enc"].T.copy())),
        r"params\.safetensors.*'w_enc'.*transposed",
    ),
    "nan_weights": (
        lambda f: _rewrite(f, "params.safetensors", _nan),
        r"params\.safetensors.*'w_dec'.*NaN",
    ),
    "width_disagrees": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "width": 2 * F})
        ),
        r"params\.safetensors.*'b_enc'.*config\.json says width=64",
    ),
    "affine_flag_disagrees": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "affine_connection": True})
        ),
        r"params\.safetensors.*missing tensor 'affine_skip_connection'",
    ),
}


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gemmascope-jax")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return run_verb("convert", args.func, args)


@pytest.mark.parametrize("case", list(BAD_SINGLE))
def test_bad_single_layer_input(tmp_path, case, capsys):
    folder, _ = make_single(tmp_path, "transcoder")
    damage, pattern = BAD_SINGLE[case]
    damage(folder)
    with pytest.raises(FormatError, match=pattern):
        load_dictionary(folder)
    out = tmp_path / "converted"
    assert _convert([str(folder), str(out), "--to", "native"]) == 2
    assert not out.exists() and "error" in capsys.readouterr().err


BAD_MULTI = {
    "truncated": (
        lambda f: _truncate(f / "params_layer_2.safetensors", 8),
        r"params_layer_2\.safetensors.*truncated",
    ),
    "missing_file": (
        lambda f: (f / "params_layer_1.safetensors").unlink(),
        r"missing \['params_layer_1\.safetensors'\]",
    ),
    "missing_first_file": (
        lambda f: (f / "params_layer_0.safetensors").unlink(),
        r"missing \['params_layer_0\.safetensors'\]",
    ),
    "missing_last_file": (
        lambda f: (f / "params_layer_2.safetensors").unlink(),
        r"config\.json: n_layers=3, but .* has 2 params_layer files",
    ),
    "missing_tensor": (
        lambda f: _rewrite(f, "params_layer_1.safetensors", lambda t: t.pop("b_dec")),
        r"params_layer_1\.safetensors.*missing tensor.*b_dec",
    ),
    "nan_weights": (
        lambda f: _rewrite(f, "params_layer_2.safetensors", _nan),
        r"params_layer_2\.safetensors.*'w_dec'.*NaN",
    ),
    "single_layer_w_dec": (
        lambda f: _rewrite(
            f, "params_layer_0.safetensors", lambda t: t.update(w_dec=t["w_dec"][:, 0])
        ),
        r"params_layer_0\.safetensors.*'w_dec' has shape \(32, 16\)",
    ),  # fmt: skip
    "width_disagrees": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "width": 100})
        ),
        r"params_layer_0\.safetensors.*'b_enc' has 32 latents x 3 layers.*width=100",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MULTI))
def test_bad_multi_layer_input(tmp_path, case):
    folder, _, _ = make_multi(tmp_path, "clt", config=True, affine=True)
    damage, pattern = BAD_MULTI[case]
    damage(folder)
    with pytest.raises(FormatError, match=pattern):
        load_dictionary(folder)
    out = tmp_path / "converted"
    assert _convert([str(folder), str(out), "--to", "native"]) == 2
    assert not out.exists()


def test_bad_native_input(tmp_path):
    cfg = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=D, d_out=D, width=F, layers=(1,)
    )
    save_dictionary(random_dictionary(cfg), tmp_path / "n")
    meta = json.loads((tmp_path / "n/dictionary.json").read_text())
    meta["config"]["width"] = 2 * F
    (tmp_path / "n/dictionary.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"params\.safetensors.*'w_enc'.*\(16, 64\)"):
        load_dictionary(tmp_path / "n")
    meta["config"]["kind"] = "hypercoder"
    (tmp_path / "n/dictionary.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"dictionary\.json.*hypercoder"):
        load_dictionary(tmp_path / "n")


# ---- registry, detection, CLI -------------------------------------------------------------------


def test_format_names_and_aliases():
    assert list(FORMATS) == ["gemma-scope-2", "saelens", "circuit-tracer", "native"]
    for alias, name in [("gs2", "gemma-scope-2"), ("gemma_scope_2", "gemma-scope-2"),
                        ("sae_lens", "saelens"), ("SAELens", "saelens"),
                        ("circuit_tracer", "circuit-tracer"), ("native", "native")]:  # fmt: skip
        assert canonical_format(alias) == name
    with pytest.raises(ValueError, match="unknown dictionary format 'onnx'"):
        canonical_format("onnx")
    assert FORMATS["native"].NAME == "native"
    assert FORMATS["gemma-scope-2"].NAME == "gemma-scope-2"


def test_detect_format(tmp_path):
    sae, _ = make_single(tmp_path, "sae")
    clt, _, _ = make_multi(tmp_path, "clt", config=False, affine=False)
    assert detect_format(sae) == detect_format(clt) == "gemma-scope-2"
    save_dictionary(load_dictionary(sae), tmp_path / "native")
    assert detect_format(tmp_path / "native") == "native"

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "weights.pt").write_bytes(b"x")
    with pytest.raises(FormatError) as e:
        detect_format(unknown)
    msg = str(e.value)
    expected = [
        "no params.safetensors + config.json",
        "(gemma-scope-2)",
        "no cfg.json + sae_weights.safetensors (saelens)",
        "no config.yaml (circuit-tracer)",
        "no dictionary.json",
        "weights.pt",
    ]
    for looked_for in expected:
        assert looked_for in msg
    with pytest.raises(FormatError, match="no such file"):
        load_dictionary(tmp_path / "nowhere")


def test_detect_peer_formats(tmp_path):
    """Folders written by the other formats' own modules are told apart from ours."""
    pytest.importorskip("gemmascope_jax.formats.saelens")
    pytest.importorskip("gemmascope_jax.formats.circuit_tracer")
    cfg = DictionaryConfig(kind="transcoder", architecture="jumprelu", d_in=D, d_out=D,
                           width=F, layers=(1,), model_name="google/gemma-3-270m-pt")  # fmt: skip
    save_dictionary(random_dictionary(cfg), tmp_path / "sl", "saelens")
    clt = DictionaryConfig(kind="clt", architecture="jumprelu", d_in=D, d_out=D, width=F,
                           layers=(0, 1, 2))  # fmt: skip
    save_dictionary(random_dictionary(clt), tmp_path / "ct", "circuit_tracer")
    assert detect_format(tmp_path / "sl") == "saelens"
    assert detect_format(tmp_path / "ct") == "circuit-tracer"
    assert _convert([str(tmp_path / "ct"), str(tmp_path / "gs2"), "--to", "gs2"]) == 0
    assert load_dictionary(tmp_path / "gs2").cfg.layers == (0, 1, 2)


def test_convert_cli(tmp_path, capsys):
    src, t = make_single(tmp_path, "affine_transcoder")
    out = tmp_path / "native"
    assert _convert([str(src), str(out), "--to", "native", "--no-progress"]) == 0
    assert "skip_transcoder" in capsys.readouterr().out
    x = np.random.default_rng(9).normal(size=(7, D)).astype(np.float32)
    assert rel_err(outputs(load_dictionary(out), x)[1], np_single(t, x)[1]) <= 1e-6

    assert _convert([str(out), str(tmp_path / "gs2"), "--to", "gs2", "--from", "native"]) == 0
    _same_files(src, tmp_path / "gs2")
    assert _convert([str(src), str(out), "--to", "native"]) == 2  # exists
    assert "force" in capsys.readouterr().err
    assert _convert([str(src), str(out), "--to", "native", "--force"]) == 0
    assert _convert([str(src), str(src / "inside"), "--to", "native"]) == 2
    with pytest.raises(SystemExit):
        _convert([str(src), str(tmp_path / "x"), "--to", "onnx"])
    assert not (tmp_path / "x").exists()
