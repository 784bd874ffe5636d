"""DictionaryConfig: defaults per kind, site resolution and GS2 hook strings, JSON round trip,
and clear errors for bad configs."""

from __future__ import annotations

import json

import pytest

from gemmascope_jax.dictionaries import KINDS, DictionaryConfig, random_dictionary


def _tc(**kw):
    base = dict(kind="transcoder", architecture="jumprelu", d_in=16, d_out=16, width=64,
                layers=(5,), model_num_layers=18)  # fmt: skip
    return DictionaryConfig(**{**base, **kw})


def test_defaults_per_kind_and_gs2_hook_points():
    cfg = _tc()
    assert cfg.input_sites == ("mlp_in.5",) and cfg.output_sites == ("mlp_out.5",)
    assert cfg.hf_hook_points_in == ("model.layers.5.pre_feedforward_layernorm.output",)
    assert cfg.hf_hook_points_out == ("model.layers.5.post_feedforward_layernorm.output",)
    assert cfg.skip is False and not cfg.multilayer and cfg.num_layers == 1
    assert _tc(kind="skip_transcoder").skip is True
    sae = _tc(kind="sae", input_sites=("model.layers.5.output",))
    assert sae.input_sites == sae.output_sites == ("resid_post.5",)
    assert sae.hf_hook_points_out == ("model.layers.5.output",)
    cc = _tc(kind="crosscoder", layers=(7, 13, 17, 22), model_num_layers=26, width=65536)
    assert cc.input_sites == ("resid_post.7", "resid_post.13", "resid_post.17", "resid_post.22")
    assert cc.total_width == 262144 and cc.multilayer
    clt = _tc(kind="clt", layers=tuple(range(18)), skip=True)
    assert clt.output_sites[-1] == "mlp_out.17"
    # Sites given in any accepted form, negative layers with a known depth.
    neg = _tc(input_sites=("blocks.5.hook_mlp_in",), output_sites=("mlp_out.-13",))
    assert neg.input_sites == ("mlp_in.5",) and neg.output_sites == ("mlp_out.5",)
    assert _tc(architecture="jump_relu").architecture == "jumprelu"
    assert _tc(matryoshka_widths=[8, 32]).matryoshka_widths == (8, 32, 64)


def test_to_dict_from_dict_json_round_trip():
    extra = {"gs2_folder": "clt/width_262k_l0_medium_affine", "seeds": [1, 2]}
    cfg = _tc(kind="clt", layers=(0, 1, 2), architecture="topk", k=8, skip=True,
              model_name="google/gemma-3-270m-pt", l0_target=60, matryoshka_widths=(16,),
              dtype="bfloat16", extra=extra)  # fmt: skip
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DictionaryConfig.from_dict(data) == cfg
    assert hash(DictionaryConfig.from_dict(data)) == hash(cfg)
    with pytest.raises(ValueError, match=r"unknown DictionaryConfig keys \['colour'\]"):
        DictionaryConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match=r"missing required keys \['width'\]"):
        DictionaryConfig.from_dict({k: v for k, v in data.items() if k != "width"})


def test_metadata_is_json_safe():
    cfg = _tc(kind="skip_transcoder", model_name="google/gemma-3-1b-it", l0_target=20)
    meta = random_dictionary(cfg).metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["kind"] == "skip_transcoder" and meta["width"] == 64 and meta["l0_target"] == 20
    assert meta["model_name"] == "google/gemma-3-1b-it" and meta["architecture"] == "jumprelu"
    assert meta["input_sites"] == ["mlp_in.5"] and meta["dtype"] == "float32"
    assert meta["hf_hook_points_in"] == ["model.layers.5.pre_feedforward_layernorm.output"]
    assert meta["num_params"] == 16 * 64 * 2 + 64 * 2 + 16 + 16 * 16 + 16
    assert set(KINDS) == {"sae", "transcoder", "skip_transcoder", "clt", "crosscoder"}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"kind": "gated_sae"}, "unknown kind 'gated_sae'"),
        ({"architecture": "gated"}, "unknown architecture 'gated'"),
        ({"architecture": "topk"}, "architecture 'topk' needs k"),
        ({"architecture": "batchtopk", "k": 65}, "needs k, an int in 1..width"),
        ({"k": 4}, "k is only used by topk/batchtopk"),
        ({"d_in": 0}, "d_in must be a positive int"),
        ({"width": 12.5}, "width must be a positive int"),
        ({"kind": "sae", "d_out": 8}, "d_in=16 must equal d_out=8"),
        ({"layers": (5, 6)}, "kind 'transcoder' reads one layer"),
        ({"kind": "clt", "layers": (3, 2)}, "strictly increasing"),
        ({"layers": (18,)}, "layer 18 out of range for a 18-layer model"),
        ({"kind": "clt", "layers": (0, 1), "input_sites": ("mlp_in.0",)}, "input_sites has 1"),
        ({"input_sites": ("mlp_in.4",)}, "'mlp_in.4' is not at source layer 5"),
        ({"output_sites": ("mlp_out.3",)}, "'mlp_out.3' is not at or after source layer 5"),
        ({"input_sites": ("nonsense.5",)}, "unknown site 'nonsense.5'"),
        ({"model_num_layers": None, "input_sites": ("mlp_in.-1",)}, "set model_num_layers"),
        ({"kind": "sae", "output_sites": ("mlp_out.5",)}, "predicts its input site"),
        ({"skip": True}, "use kind 'skip_transcoder'"),
        ({"kind": "skip_transcoder", "skip": False}, "needs skip=True"),
        ({"kind": "crosscoder", "layers": (1, 2), "skip": True}, "has no skip connection"),
        ({"matryoshka_widths": (32, 16)}, "matryoshka_widths must be strictly increasing"),
        ({"matryoshka_widths": (128,)}, "matryoshka_widths must be strictly increasing"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
        ({"l0_target": -3}, "l0_target must be a positive number"),
        ({"extra": {"f": object()}}, "extra must be JSON-serialisable"),
    ],
)
def test_bad_configs_give_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _tc(**changes)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as e:
        _tc(architecture="topk", d_out=-1, layers=(5, 6))
    msg = str(e.value)
    assert "needs k" in msg and "d_out must be a positive int" in msg and "reads one layer" in msg
