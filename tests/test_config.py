"""Config presets: architecture facts, HF round trips, and parameter counts by eval_shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Gemma3ForCausalLM

from gemmascope_jax.gemma3.config import FULL, SLIDING, Gemma3Config, preset
from gemmascope_jax.gemma3.model import Gemma3

SIZES = ["270m", "1b", "4b", "12b", "27b"]


def abstract_param_count(cfg: Gemma3Config) -> int:
    model = nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(int(np.prod(leaf.shape)) for leaf in leaves)


def transformers_param_count(cfg: Gemma3Config) -> int:
    """Count transformers' parameters for the same config on the meta device (no memory)."""
    from transformers import Gemma3TextConfig

    with torch.device("meta"):
        hf = Gemma3ForCausalLM(Gemma3TextConfig(**cfg.to_hf()))
    return sum(p.numel() for p in hf.parameters())  # tied lm_head counted once


@pytest.mark.parametrize("size", SIZES)
def test_preset_param_count_equals_transformers(size):
    cfg = preset(size)
    assert abstract_param_count(cfg) == transformers_param_count(cfg)


def test_known_totals():
    assert abstract_param_count(preset("270m")) == 268_098_176
    assert abstract_param_count(preset("1b")) == 999_885_952


@pytest.mark.parametrize(
    "size, embed_scale_bf16",
    [("270m", 25.25), ("1b", 34.0), ("4b", 50.5), ("12b", 62.0), ("27b", 73.5)],
)
def test_embed_scale_rounded_to_param_dtype(size, embed_scale_bf16):
    cfg = preset(size)
    assert cfg.with_dtype(jnp.bfloat16).embed_scale == embed_scale_bf16
    assert abs(cfg.embed_scale - cfg.hidden_size**0.5) < 1e-5


def test_architecture_facts():
    assert [i for i, t in enumerate(preset("270m").layer_types) if t == FULL] == [5, 11, 17]
    assert [i for i, t in enumerate(preset("1b").layer_types) if t == FULL] == [5, 11, 17, 23]
    big = preset("27b")
    assert (big.head_dim, big.query_pre_attn_scalar, big.rope_global_scaling) == (128, 168, 8.0)
    assert preset("4b").vocab_size == 262_208 and preset("1b").vocab_size == 262_144
    assert preset("gemma-3-12b-pt").name == "gemma-3-12b"


def test_big_presets_forward_shapes_without_memory():
    cfg = preset("27b").with_dtype(jnp.bfloat16)
    model = nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0)))
    out = jax.eval_shape(
        lambda m, t: m(t, capture=["attn_z.30", "mlp_in.61"]), model, jnp.zeros((2, 16), jnp.int32)
    )
    assert out.logits.shape == (2, 16, 262_208) and out.logits.dtype == jnp.bfloat16
    assert out.sites["attn_z.30"].shape == (2, 16, 32 * 128)


@pytest.mark.parametrize("size", SIZES)
def test_hf_round_trip(size):
    cfg = preset(size)
    again = Gemma3Config.from_hf(cfg.to_hf(), name=cfg.name)
    assert again == cfg


def test_legacy_hf_keys():
    legacy = preset("4b").to_hf()
    del legacy["rope_parameters"], legacy["layer_types"]
    legacy.update(
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=6,
    )
    wrapped = {"model_type": "gemma3", "text_config": legacy}
    assert Gemma3Config.from_hf(wrapped, name="gemma-3-4b") == preset("4b")


def test_invalid_configs_are_named():
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_layers=3"):
        preset("tiny").replace(num_layers=3, layer_types=(SLIDING, FULL))
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        preset("tiny").replace(num_heads=3)
    with pytest.raises(ValueError, match="lacks required fields"):
        Gemma3Config.from_hf({"model_type": "gemma3_text", "hidden_size": 8})
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'yarn'"):
        bad = preset("270m").to_hf()
        bad["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "factor": 2.0}
        Gemma3Config.from_hf(bad)
    with pytest.raises(ValueError, match="unknown Gemma 3 preset"):
        preset("3b")
