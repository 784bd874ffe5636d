"""SAELens v6 format against the real SAELens (sae-lens 6.54.12, torch float32).

Export: every exportable kind/architecture, random non-trivial parameters (thresholds,
biases, pre-encoder bias, skip), loaded with `sae_lens.SAE.load_from_disk` without warnings;
SAELens' encode / decode / forward match ours to 1e-6 relative, and SAELens re-saves the
identical cfg.json. Import: SAELens SAEs of every supported architecture built and saved by
SAELens itself (plus folds: apply_b_dec_to_input, TopK decoder-norm rescaling, a scaling
factor from activation_scaler.json, a pre-6.0 flat config). Bad input -> FormatError naming
file and tensor.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import sae_lens
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_class

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.formats import saelens as fmt
from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.formats.saelens import layout
from gemmascope_jax.gemma3.sites import LAYER_SITES, Site, resolve_site, tl_hook_name
from gemmascope_jax.io.safetensors import read_safetensors, write_safetensors

D_IN, D_OUT, F, N = 16, 12, 64, 48
HEADS, D_HEAD = 4, 4  # attn_z: D_IN = HEADS * D_HEAD
TOL = 1e-6


def rel_err(ours, peer) -> float:
    ours, peer = np.asarray(ours, np.float64), np.asarray(peer, np.float64)
    assert ours.shape == peer.shape, (ours.shape, peer.shape)
    return float(np.abs(ours - peer).max() / max(np.abs(peer).max(), 1e-30))


def inputs(d_in=D_IN, seed=1):
    return np.random.RandomState(seed).randn(N, d_in).astype(np.float32)


def peer_load(path):
    """SAELens' own loader; any warning is a failure (missing or inconsistent fields)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SAE.load_from_disk(path)
    assert not caught, [str(w.message) for w in caught]
    return sae.eval()


def peer_run(sae, x, hook_z=False):
    """SAELens encode, decode(codes), forward on x [N, d_in] -> numpy, float32."""
    xt = torch.from_numpy(x.reshape(N, HEADS, D_HEAD) if hook_z else x)
    with torch.no_grad():
        codes = sae.encode(xt)
        decoded = sae.decode(codes)
        forward = sae(xt)
    flat = lambda t: t.numpy().reshape(N, -1)
    return flat(codes), flat(decoded), flat(forward)


def our_cfg(kind, architecture, site=None, **kw):
    transcoder = kind != "sae"
    return DictionaryConfig(
        kind=kind,
        architecture=architecture,
        d_in=D_IN,
        d_out=D_OUT if transcoder else D_IN,
        width=F,
        layers=(int(site.split(".")[1]) if site else 3,),
        input_sites=(site,) if site else None,
        model_name="google/gemma-3-270m",
        model_num_layers=18,
        k=6 if architecture == "topk" else None,
        **kw,
    )


def export(d, tmp_path, name="out"):
    out = tmp_path / name
    out.mkdir()
    fmt.save(d, out)
    return out


# ---- export: ours -> SAELens ----------------------------------------------------------------

EXPORT_CASES = [
    # (kind, architecture, site, pre_bias: None | "b_dec" | "random", SAELens architecture)
    ("sae", "jumprelu", "resid_post.3", None, "jumprelu"),
    ("sae", "jumprelu", "resid_post.3", "b_dec", "jumprelu"),
    ("sae", "jumprelu", "mlp_out.5", "random", "jumprelu"),
    ("sae", "relu", "resid_pre.0", "b_dec", "standard"),
    ("sae", "topk", "resid_mid.7", "random", "topk"),
    ("sae", "jumprelu", "attn_z.2", None, "jumprelu"),
    ("sae", "relu", "attn_z.4", "b_dec", "standard"),
    ("transcoder", "jumprelu", None, "random", "jumprelu_transcoder"),
    ("transcoder", "relu", None, None, "transcoder"),
    ("skip_transcoder", "jumprelu", None, "random", "jumprelu_skip_transcoder"),
    ("skip_transcoder", "relu", None, None, "skip_transcoder"),
]


@pytest.mark.parametrize("kind,architecture,site,pre_bias,peer_arch", EXPORT_CASES)
def test_export_matches_saelens(tmp_path, kind, architecture, site, pre_bias, peer_arch):
    extra = dict(l0_target=20.0, matryoshka_widths=(16, 32)) if kind == "sae" else {}
    cfg = our_cfg(kind, architecture, site, **extra)
    d = random_dictionary(cfg, seed=7, pre_bias=pre_bias == "random")
    if pre_bias == "b_dec":
        d = d.with_arrays(b_pre=d.arrays()["b_dec"])
    out = export(d, tmp_path)

    cfg_json = json.loads((out / fmt.CFG_FILENAME).read_text())
    assert cfg_json["architecture"] == peer_arch
    assert cfg_json["apply_b_dec_to_input"] == (pre_bias == "b_dec")
    assert cfg_json["reshape_activations"] == "none"  # flat, as SAELens' GS2 loader

    peer = peer_load(out)
    assert type(peer) is get_sae_class(peer_arch)[0]
    x = inputs()
    codes, decoded, forward = peer_run(peer, x)
    ours_codes = np.asarray(d.encode(x))
    assert 0.05 < (ours_codes > 0).mean() < 0.9  # non-trivial sparsity
    assert rel_err(ours_codes, codes) <= TOL
    assert rel_err(d(x), forward) <= TOL  # skip-transcoders: SAELens adds the skip in forward
    if kind != "skip_transcoder":
        assert rel_err(d.decode(ours_codes, x), decoded) <= TOL

    # every field right: SAELens writes back exactly our cfg.json
    peer.save_model(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / fmt.CFG_FILENAME).read_text()) == cfg_json
    meta = cfg_json["metadata"]
    assert meta["model_name"] == "google/gemma-3-270m"
    assert resolve_site(meta["hook_name"], 18) == cfg.input_site_objects[0]
    assert resolve_site(meta["hf_hook_name"], 18) == cfg.input_site_objects[0]
    if kind != "sae":
        assert meta["hook_name"] == "blocks.3.hook_mlp_in"
        assert meta["hook_name_out"] == "blocks.3.hook_mlp_out"
        assert meta["hf_hook_name"] == "model.layers.3.pre_feedforward_layernorm.output"
        assert meta["hf_hook_name_out"] == "model.layers.3.post_feedforward_layernorm.output"

    # and back: our loader gives the same dictionary (a folded b_pre moves into b_enc)
    d2 = fmt.load(out)
    for field in ("kind", "architecture", "input_sites", "output_sites", "k", "model_name"):
        assert getattr(d2.cfg, field) == getattr(cfg, field), field
    for field in ("l0_target", "matryoshka_widths", "model_num_layers"):
        assert getattr(d2.cfg, field) == getattr(cfg, field), field
    assert rel_err(d2.encode(x), ours_codes) <= TOL
    assert rel_err(d2(x), d(x)) <= TOL


def test_export_bfloat16(tmp_path):
    cfg = our_cfg("sae", "jumprelu", dtype="bfloat16")
    d = random_dictionary(cfg, seed=3)
    out = export(d, tmp_path)
    peer = peer_load(out)
    assert peer.W_enc.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        peer.W_dec.detach().float().numpy(), np.asarray(d.arrays()["w_dec"], np.float32)
    )
    d2 = fmt.load(out)
    assert d2.cfg.dtype == "bfloat16"
    for name, value in d.arrays().items():
        np.testing.assert_array_equal(np.asarray(d2.arrays()[name]), np.asarray(value))


def test_tl_hook_names_resolve_back():
    for kind in LAYER_SITES:
        if kind == "attn_pattern":
            continue
        site = Site(kind, 5)
        assert resolve_site(tl_hook_name(site), 26) == site, kind


@pytest.mark.parametrize(
    "cfg_kw,match",
    [
        (dict(kind="clt", layers=(0, 1, 2), skip=False), "clt.*summed"),
        (dict(kind="crosscoder", layers=(1, 3), d_out=D_IN), "crosscoder.*summed"),
        (dict(kind="sae", architecture="batchtopk", k=4, d_out=D_IN), "to_jumprelu"),
        (dict(kind="transcoder", architecture="topk", k=4), "no topk transcoder"),
    ],
)
def test_export_refuses_what_saelens_cannot_represent(tmp_path, cfg_kw, match):
    base = dict(kind="sae", architecture="jumprelu", d_in=D_IN, d_out=D_OUT, width=F, layers=(2,))
    d = random_dictionary(DictionaryConfig(**{**base, **cfg_kw}))
    with pytest.raises(FormatError, match=match):
        fmt.save(d, tmp_path)
    assert not any(tmp_path.iterdir())


def test_through_the_format_registry(tmp_path):
    from gemmascope_jax.dictionaries.sets import TranscoderSet
    from gemmascope_jax.formats import detect_format, load_dictionary, save_dictionary

    d = random_dictionary(our_cfg("skip_transcoder", "jumprelu"), seed=2)
    out = save_dictionary(d, tmp_path / "tc", format="sae_lens")
    assert detect_format(out) == "saelens"
    x = inputs()
    assert rel_err(load_dictionary(out)(x), d(x)) <= TOL
    t0 = dict(kind="transcoder", architecture="relu", d_in=D_IN, d_out=D_OUT, width=F)
    one = TranscoderSet((random_dictionary(DictionaryConfig(**t0, layers=(0,))),))
    with pytest.raises(FormatError, match="own folder"):
        save_dictionary(one, tmp_path / "set", format="saelens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tc"]


# ---- import: SAELens -> ours ----------------------------------------------------------------

IMPORT_CASES = [
    ("jumprelu", "blocks.3.hook_resid_post", "resid_post.3"),
    ("standard", "blocks.2.attn.hook_z", "attn_z.2"),
    ("topk", "blocks.6.hook_mlp_out", "mlp_out.6"),
    ("transcoder", "blocks.4.hook_mlp_in", "mlp_in.4"),
    ("skip_transcoder", "blocks.4.mlp.hook_in", "mlp_in.4"),
    ("jumprelu_transcoder", "blocks.1.hook_mlp_in", "mlp_in.1"),
    ("jumprelu_skip_transcoder", "blocks.5.hook_mlp_in", "mlp_in.5"),
]


def make_peer(architecture, hook_name, seed=0, **cfg_kw):
    """A SAELens SAE built by SAELens, with random parameters."""
    sae_cls, cfg_cls = get_sae_class(architecture)
    transcoder = "transcoder" in architecture
    layer = int(hook_name.split(".")[1])
    metadata = {"model_name": "google/gemma-3-1b-pt", "hook_name": hook_name}
    if transcoder:
        metadata["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
    kw = dict(d_in=D_IN, d_sae=F, apply_b_dec_to_input=not transcoder)
    kw.update(d_out=D_OUT) if transcoder else None
    kw.update(k=6) if architecture == "topk" else None
    if "hook_z" in hook_name:
        kw.update(reshape_activations="hook_z")
    cfg = cfg_cls(**{**kw, **cfg_kw}, metadata=sae_lens.saes.sae.SAEMetadata(**metadata))
    sae = sae_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=gen))
            elif name in ("W_enc", "W_skip"):
                p.copy_(torch.randn(p.shape, generator=gen) / D_IN**0.5)
            elif name == "W_dec":  # rows of norm ~0.5..2: decoder-norm folds matter
                w = torch.randn(p.shape, generator=gen)
                w /= w.norm(dim=-1, keepdim=True)
                p.copy_(w * (0.5 + 1.5 * torch.rand(p.shape[0], 1, generator=gen)))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return sae.eval()


def check_import(d, peer, hook_z=False, skip=False):
    x = inputs()
    codes, decoded, forward = peer_run(peer, x, hook_z)
    ours_codes = np.asarray(d.encode(x))
    assert 0.05 < (ours_codes > 0).mean() < 0.9
    assert rel_err(ours_codes, codes) <= TOL
    assert rel_err(d(x), forward) <= TOL
    if not skip:
        assert rel_err(d.decode(ours_codes, x), decoded) <= TOL


@pytest.mark.parametrize("architecture,hook_name,site", IMPORT_CASES)
def test_import_saelens_saved(tmp_path, architecture, hook_name, site):
    peer = make_peer(architecture, hook_name)
    peer.save_model(tmp_path / "peer")
    assert fmt.detect(tmp_path / "peer")
    d = fmt.load(tmp_path / "peer")
    kind, activation = layout.IMPORT[architecture]
    assert (d.cfg.kind, d.cfg.architecture) == (kind, activation)
    assert d.cfg.input_sites == (site,)
    if kind != "sae":
        assert d.cfg.output_sites == (f"mlp_out.{site.split('.')[1]}",)
    assert d.cfg.model_name == "google/gemma-3-1b-pt"
    check_import(d, peer, hook_z="hook_z" in hook_name, skip="skip" in architecture)
    # SAELens -> ours -> SAELens keeps the numbers and SAELens' metadata
    out = export(d, tmp_path)
    again = peer_load(out)
    assert again.cfg.reshape_activations == "none"  # our exports take the flat attn_z vector
    check_import(d, again, skip="skip" in architecture)
    assert again.cfg.metadata.model_name == "google/gemma-3-1b-pt"


def test_import_topk_rescaled_by_decoder_norm(tmp_path):
    peer = make_peer("topk", "blocks.6.hook_resid_post", rescale_acts_by_decoder_norm=True)
    peer.save_model(tmp_path / "peer")
    d = fmt.load(tmp_path / "peer")
    check_import(d, peer)
    # the fold changed the weights (rows had norms 0.5..2), not just passed them through
    assert not np.allclose(np.asarray(d.arrays()["w_dec"]), peer.W_dec.detach().numpy())


def test_import_folds_activation_scaler(tmp_path):
    """A training checkpoint: normalize_activations='expected_average_only_in' with the
    factor in activation_scaler.json; folded as SAELens' fold_activation_norm_scaling_factor."""
    peer = make_peer(
        "jumprelu", "blocks.3.hook_resid_post", normalize_activations="expected_average_only_in"
    )
    peer.save_model(tmp_path / "peer")
    with pytest.raises(FormatError, match="activation_scaler.json missing"):
        fmt.load(tmp_path / "peer")
    s = 2.5
    (tmp_path / "peer" / layout.SCALER_FILENAME).write_text(
        json.dumps({"scaling_factor": s, "has_whitening": False})
    )
    d = fmt.load(tmp_path / "peer")
    peer.fold_activation_norm_scaling_factor(s)
    check_import(d, peer)


def test_import_missing_fields_default_like_saelens(tmp_path):
    peer = make_peer("jumprelu", "blocks.6.hook_resid_post")  # apply_b_dec_to_input=True
    peer.save_model(tmp_path / "peer")
    for field in ("apply_b_dec_to_input", "normalize_activations", "reshape_activations"):
        _edit_cfg(tmp_path / "peer", lambda c, f=field: c.pop(f))
    check_import(fmt.load(tmp_path / "peer"), peer_load(tmp_path / "peer"))


def test_import_pre_6_flat_config(tmp_path):
    """A pre-6.0 flat cfg.json (hook_point, activation_fn_str, boolean normalize_activations),
    read by SAELens' handle_pre_6_0_config and by ours."""
    src = make_peer("standard", "blocks.3.hook_resid_pre")
    folder = tmp_path / "old"
    folder.mkdir()
    sd = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    sd["scaling_factor"] = np.ones(F, np.float32)  # legacy, all ones: dropped by both
    write_safetensors(folder / fmt.WEIGHTS_FILENAME, sd)
    old_cfg = {
        "model_name": "gpt2-small",
        "hook_point": "blocks.3.hook_resid_pre",
        "hook_point_layer": 3,
        "hook_point_head_index": None,
        "d_in": D_IN,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "prepend_bos": True,
        "sae_lens_training_version": "3.13.0",
    }
    (folder / fmt.CFG_FILENAME).write_text(json.dumps(old_cfg))
    peer = peer_load(folder)
    d = fmt.load(folder)
    assert d.cfg.input_sites == ("resid_pre.3",) and d.cfg.architecture == "relu"
    check_import(d, peer)


# ---- bad input --------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    d = random_dictionary(our_cfg("sae", "jumprelu"), seed=1)
    return export(d, tmp_path, "good")


def _rewrite(folder, change):
    tensors = read_safetensors(folder / fmt.WEIGHTS_FILENAME)
    change(tensors)
    write_safetensors(folder / fmt.WEIGHTS_FILENAME, tensors)


def _edit_cfg(folder, change):
    path = folder / fmt.CFG_FILENAME
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def test_bad_missing_w_dec(good):
    _rewrite(good, lambda t: t.pop("W_dec"))
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors.*missing.*W_dec"):
        fmt.load(good)


def test_bad_transposed_w_enc(good):
    _rewrite(good, lambda t: t.update(W_enc=np.ascontiguousarray(t["W_enc"].T)))
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors.*'W_enc'.*transposed"):
        fmt.load(good)


def test_bad_nan(good):
    def poison(t):
        t["threshold"] = t["threshold"].copy()
        t["threshold"][5] = np.nan

    _rewrite(good, poison)
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors.*'threshold'.*NaN"):
        fmt.load(good)


def test_bad_cfg_d_sae_disagrees_with_tensors(good):
    _edit_cfg(good, lambda c: c.update(d_sae=F // 2))
    with pytest.raises(FormatError, match=rf"'W_enc'.*cfg\.json d_in={D_IN}, d_sae={F // 2}"):
        fmt.load(good)


def test_bad_extra_tensor(good):
    _rewrite(good, lambda t: t.update(W_skip=np.zeros((D_IN, D_IN), np.float32)))
    with pytest.raises(FormatError, match="unexpected tensor.*W_skip"):
        fmt.load(good)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.pop("d_in"), "'d_in' must be a positive int"),
        (lambda c: c.update(architecture="gated"), "architecture 'gated' is not supported"),
        (lambda c: c.update(normalize_activations="layer_norm"), "normalises each token"),
        (
            lambda c: c["metadata"].update(
                hook_name="blocks.3.ln2.hook_normalized", hf_hook_name=None
            ),
            "cannot map the input hook",
        ),
        (lambda c: c["metadata"].update(hook_head_index=2), "per-head"),
    ],
)
def test_bad_cfg(good, change, match):
    _edit_cfg(good, change)
    with pytest.raises(FormatError, match=match):
        fmt.load(good)


def test_bad_truncated_weights(good):
    path = good / fmt.WEIGHTS_FILENAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors"):
        fmt.load(good)


def test_detect(good, tmp_path):
    assert fmt.detect(good)
    assert not fmt.detect(tmp_path / "missing")
    assert not fmt.detect(good / fmt.CFG_FILENAME)
    gs2 = tmp_path / "gs2"
    gs2.mkdir()
    (gs2 / "config.json").write_text("{}")
    (gs2 / "params.safetensors").write_bytes(b"")
    assert not fmt.detect(gs2)
    (good / fmt.CFG_FILENAME).write_text("not json")
    assert not fmt.detect(good)
