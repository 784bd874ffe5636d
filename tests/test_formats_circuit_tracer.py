"""circuit-tracer format: export, run the real circuit-tracer 0.5.0, compare; import; bad input.

circuit-tracer pins transformers 4.57.3, so it lives in `.venv-interop` (`make interop`); the
harness `scripts/interop/circuit_tracer_check.py` loads our exported folders with its own
loaders and writes its encode/decode outputs, which are compared here with ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import FormatError, load_dictionary, save_dictionary
from gemmascope_jax.formats import circuit_tracer as ct
from gemmascope_jax.io.safetensors import read_safetensors, write_safetensors

REPO = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = REPO / ".venv-interop" / "bin" / "python"
INTEROP_STAMP = REPO / ".venv-interop" / ".installed"  # written by `make interop` when complete
HARNESS = REPO / "scripts" / "interop" / "circuit_tracer_check.py"
MODEL = "google/gemma-3-270m"
L, D, F, N_POS = 4, 16, 48, 12
TOL = 1e-6


def transcoder_set(*, skip: bool, input_site: str = "mlp_in", seed: int = 0, dtype="float32"):
    members = []
    for i in range(L):
        cfg = DictionaryConfig(
            kind="skip_transcoder" if skip else "transcoder",
            architecture="jumprelu",
            d_in=D,
            d_out=D,
            width=F,
            layers=(i,),
            input_sites=(f"{input_site}.{i}",),
            model_name=MODEL,
            model_num_layers=L,
            l0_target=8.0 + i,
            dtype=dtype,
        )
        members.append(random_dictionary(cfg, seed=seed + i, pre_bias=not skip))
    return TranscoderSet.from_transcoders(members)


def clt(*, seed: int = 10, skip: bool = False, architecture: str = "jumprelu", pre_bias=True):
    cfg = DictionaryConfig(
        kind="clt",
        architecture=architecture,
        d_in=D,
        d_out=D,
        width=F,
        layers=tuple(range(L)),
        model_name=MODEL,
        model_num_layers=L,
        skip=skip,
        l0_target=30.0,
        matryoshka_widths=(16, F),
        extra={"run": "test"},
    )
    return random_dictionary(cfg, seed=seed, pre_bias=pre_bias)


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


# ---- the real circuit-tracer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Export three dictionaries, run circuit-tracer on them once, return everything."""
    if not (INTEROP_PYTHON.exists() and INTEROP_STAMP.exists()):
        pytest.fail(
            f"{INTEROP_STAMP} not found: the circuit-tracer interop venv is missing or "
            "incomplete; run `make interop` (make test builds it)",
            pytrace=False,
        )
    root = tmp_path_factory.mktemp("ct_peer")
    x = np.random.default_rng(0).normal(size=(L, N_POS, D)).astype(np.float32)
    np.savez(root / "inputs.npz", x=x)
    cases = {
        "set_skip": transcoder_set(skip=True),
        "set_plain": transcoder_set(skip=False, input_site="resid_mid", seed=20),
        "clt": clt(),
    }
    argv = []
    for name, obj in cases.items():
        save_dictionary(obj, root / name, "circuit-tracer")
        argv += [str(root / name), str(root / "inputs.npz"), str(root / f"{name}.npz")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(INTEROP_PYTHON), str(HARNESS), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    if proc.returncode != 0:
        pytest.fail(f"circuit-tracer harness failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    results = {}
    for name in cases:
        with np.load(root / f"{name}.npz") as f:
            results[name] = {k: f[k] for k in f.files}
        results[name]["info"] = json.loads(str(results[name]["info"]))
    return {"x": x, "cases": cases, "results": results, "root": root}


def check_features(pre, features, threshold, theirs_pre, theirs_features):
    """Pre-activations within TOL; codes within TOL except where pre sits on the threshold."""
    assert rel_err(pre, theirs_pre) <= TOL
    near = np.abs(np.asarray(pre) - np.asarray(threshold)) < 1e-5
    assert near.sum() <= 2
    ours = np.where(near, 0, np.asarray(features))
    assert rel_err(ours, np.where(near, 0, theirs_features)) <= TOL
    active = (np.asarray(theirs_features) != 0).mean()
    assert 0.05 < active < 0.9, f"{active:.2f} of the features fire: a weak test"


@pytest.mark.parametrize("name", ["set_skip", "set_plain"])
def test_transcoder_set_matches_circuit_tracer(peer, name):
    tset, res, x = peer["cases"][name], peer["results"][name], peer["x"]
    info = res["info"]
    assert info["class"] == "TranscoderSet"
    assert (info["n_layers"], info["d_transcoder"], info["d_model"]) == (L, F, D)
    assert info["activation"] == "jumprelu" and info["skip"] == (name == "set_skip")
    hook_in = "mlp.hook_in" if name == "set_skip" else "hook_resid_mid"
    assert (info["feature_input_hook"], info["feature_output_hook"]) == (hook_in, "hook_mlp_out")
    for i, t in enumerate(tset):
        xi = jnp.asarray(x[i])
        check_features(
            t.pre_activations(xi),
            tset.encode(xi, i),
            t.threshold[...],
            res["pre"][i],
            res["features"][i],
        )
        # Decode circuit-tracer's own codes: the decoder alone, skip term included.
        ours = tset.decode(jnp.asarray(res["features"][i]), i, x=xi)
        assert rel_err(ours, res["decode"][i]) <= TOL
        assert rel_err(ours, res["attr_reconstruction"][i]) <= TOL
        if t.cfg.skip:
            assert rel_err(xi @ t.w_skip[...], res["skip"][i]) <= TOL
    if name == "set_plain":  # exported with a pre-encoder bias, folded into b_enc
        assert any(float(jnp.abs(t.b_pre[...]).max()) > 0 for t in tset)


def test_clt_matches_circuit_tracer(peer):
    d, res = peer["cases"]["clt"], peer["results"]["clt"]
    x = jnp.asarray(peer["x"].transpose(1, 0, 2))  # ours: [pos, layer, D]
    info = res["info"]
    assert info["class"] == "CrossLayerTranscoder" and info["activation"] == "jumprelu"
    assert (info["n_layers"], info["d_transcoder"], info["d_model"]) == (L, F, D)
    t = lambda a: np.asarray(a).transpose(1, 0, 2)
    check_features(
        t(d.pre_activations(x)),
        t(d.encode(x)),
        np.asarray(d.threshold[...])[:, None, :],
        res["pre"],
        res["features"],
    )
    codes = jnp.asarray(t(res["features"]))
    ours = t(d.decode(codes, x))
    assert rel_err(ours, res["decode"]) <= TOL
    assert rel_err(ours, res["attr_reconstruction"]) <= TOL
    # The decoders to later layers carry real weight in this comparison.
    diagonal = d.with_arrays(
        **{f"w_dec.{i}": d.w_dec[i][...].at[:, 1:].set(0) for i in range(L)}
    ).decode(codes, x)
    assert rel_err(t(diagonal), res["decode"]) > 0.1


# ---- import --------------------------------------------------------------------------------------


def assert_same(a, b):
    assert a.cfg == b.cfg
    arrays_b = b.arrays()
    for name, value in a.arrays().items():
        assert np.array_equal(np.asarray(value), np.asarray(arrays_b[name])), name


def test_roundtrip_transcoder_set(tmp_path):
    for dtype in ("float32", "bfloat16"):
        tset = transcoder_set(skip=True, seed=3, dtype=dtype)
        out = save_dictionary(tset, tmp_path / dtype, "ct")
        assert ct.detect(out)
        back = load_dictionary(out)
        assert isinstance(back, TranscoderSet) and len(back) == L
        assert (back.model_name, back.input_site, back.output_site) == (MODEL, "mlp_in", "mlp_out")
        for a, b in zip(tset, back, strict=True):
            assert_same(a, b)
    # A `transcoders` list of local files (relative to the folder) instead of layer_{i} names.
    config = yaml.safe_load((out / "config.yaml").read_text())
    for i in range(L):
        (out / f"layer_{i}.safetensors").rename(out / f"tc{i}.safetensors")
    config["transcoders"] = [f"tc{i}.safetensors" for i in range(L)]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    for a, b in zip(tset, ct.load(out, progress=True), strict=True):
        assert_same(a, b)


def test_roundtrip_clt(tmp_path):
    d = clt(pre_bias=False)
    back = load_dictionary(save_dictionary(d, tmp_path / "clt", "circuit-tracer", progress=True))
    assert_same(d, back)
    relu = clt(architecture="relu", pre_bias=False, seed=4)
    assert_same(relu, ct.load(save_dictionary(relu, tmp_path / "relu", "circuit-tracer")))


def test_pre_bias_is_folded(tmp_path):
    d = clt(pre_bias=True)
    back = ct.load(save_dictionary(d, tmp_path / "clt", "circuit-tracer"))
    assert float(jnp.abs(back.b_pre[...]).max()) == 0
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, L, D)), jnp.float32)
    assert rel_err(back.pre_activations(x), d.pre_activations(x)) < 1e-5


def test_detect_is_quiet_for_foreign_folders(tmp_path):
    assert not ct.detect(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: [unclosed\n")
    assert not ct.detect(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: something_else\n")
    assert not ct.detect(tmp_path)
    assert not ct.detect(tmp_path / "missing")


# ---- refusals and bad input --------------------------------------------------------------------


def test_save_refuses_what_circuit_tracer_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="W_skip"):
        ct.save(clt(skip=True), tmp_path)
    topk = DictionaryConfig(
        kind="transcoder", architecture="topk", k=4, d_in=D, d_out=D, width=F, layers=(0,)
    )
    with pytest.raises(ValueError, match="to_jumprelu"):
        ct.save(TranscoderSet.from_transcoders([random_dictionary(topk)]), tmp_path)
    with pytest.raises(TypeError, match="TranscoderSet"):
        ct.save(transcoder_set(skip=False)[0], tmp_path)
    sae = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=D, d_out=D, width=F, layers=(0,)
    )
    with pytest.raises(ValueError, match="transcoder"):
        TranscoderSet.from_transcoders([random_dictionary(sae)])
    assert not any(tmp_path.iterdir())


@pytest.fixture()
def exported(tmp_path):
    tset = transcoder_set(skip=True, seed=7)
    return save_dictionary(tset, tmp_path / "set", "circuit-tracer"), save_dictionary(
        clt(pre_bias=False), tmp_path / "clt", "circuit-tracer"
    )


def rewrite(path: Path, **changes):
    tensors = read_safetensors(path)
    tensors.update(changes)
    write_safetensors(path, tensors)


def test_missing_layer_files(exported):
    set_dir, clt_dir = exported
    (set_dir / "layer_1.safetensors").unlink()
    with pytest.raises(FormatError, match=r"layer_1\.safetensors"):
        ct.load(set_dir)
    # The last layer too: config.yaml's n_layers says how many there must be.
    shutil.copy(set_dir / "layer_0.safetensors", set_dir / "layer_1.safetensors")
    (set_dir / f"layer_{L - 1}.safetensors").unlink()
    with pytest.raises(FormatError, match=rf"layer_{L - 1}\.safetensors"):
        ct.load(set_dir)
    (clt_dir / "W_dec_2.safetensors").unlink()
    with pytest.raises(FormatError, match=r"W_dec_2\.safetensors.*not found"):
        ct.load(clt_dir)


def test_transposed_and_nan_tensors(exported):
    set_dir, clt_dir = exported
    layer = set_dir / "layer_2.safetensors"
    w_enc = read_safetensors(layer)["W_enc"]
    rewrite(layer, W_enc=np.ascontiguousarray(w_enc.T))
    with pytest.raises(FormatError, match=r"layer_2\.safetensors.*'W_enc'.*transposed"):
        ct.load(set_dir)
    rewrite(layer, W_enc=w_enc, W_dec=np.full((F, D), np.nan, np.float32))
    with pytest.raises(FormatError, match=r"layer_2\.safetensors.*'W_dec'.*NaN"):
        ct.load(set_dir)
    enc = clt_dir / "W_enc_1.safetensors"
    rewrite(enc, threshold_1=np.full((F,), np.inf, np.float32))
    with pytest.raises(FormatError, match=r"W_enc_1\.safetensors.*'threshold_1'.*NaN or inf"):
        ct.load(clt_dir)
    rewrite(enc, threshold_1=np.ones((F,), np.float32), W_enc_1=np.zeros((D, F), np.float32))
    with pytest.raises(FormatError, match=r"W_enc_1\.safetensors.*'W_enc_1'.*transposed"):
        ct.load(clt_dir)
    dec = clt_dir / "W_dec_0.safetensors"
    rewrite(dec, W_dec_0=np.zeros((F, L - 1, D), np.float32))
    with pytest.raises(FormatError, match=r"W_dec_0\.safetensors.*'W_dec_0'"):
        ct.load(clt_dir)


def test_bad_configs(exported):
    set_dir, _ = exported
    config_path = set_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    for change, message in [
        ({"feature_input_hook": "ln2.hook_normalized"}, "unsupported.*gain"),
        ({"feature_output_hook": "hook_resid_post"}, "hook_resid_post.*not supported"),
        ({"activation": "topk", "k": 8}, "activation 'topk'"),
        ({"transcoders": ["hf://google/gemma-scope-2-270m-pt/x.safetensors"]}, "hf://"),
        ({"n_layers": L + 1}, rf"layer_{L}\.safetensors"),
    ]:
        config_path.write_text(yaml.safe_dump({**config, **change}))
        with pytest.raises(FormatError, match=rf"config\.yaml|{message}") as e:
            ct.load(set_dir)
        assert e.match(message)
    del config["feature_output_hook"]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(FormatError, match="feature_output_hook"):
        ct.load(set_dir)


# ---- TranscoderSet -----------------------------------------------------------------------------


def test_transcoder_set_container():
    tset = transcoder_set(skip=True)
    assert len(tset) == tset.num_layers == L and tset.skip and tset.widths == (F,) * L
    assert [t.cfg.layers for t in tset] == [(i,) for i in range(L)]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, D)), jnp.float32)
    assert np.array_equal(tset(x, 2), tset[2](x))
    assert np.array_equal(tset.decode(tset.encode(x, 1), 1, x), tset[1](x))
    with pytest.raises(ValueError, match="reads layer 1, expected 0"):
        TranscoderSet(tuple(tset)[1:])
    with pytest.raises(ValueError, match="expected resid_mid"):
        TranscoderSet(tuple(tset), input_site="resid_mid")
    with pytest.raises(ValueError, match="not 'other/model'"):
        TranscoderSet(tuple(tset), model_name="other/model")
