"""Our Gemma 3 against transformers' own modules on tiny randomized checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemmascope_jax.gemma3.loading import load_gemma3
from gemmascope_jax.gemma3.sites import LAYER_SITES, Site, hf_hook_point
from tests.hf_reference import hf_run_with_sites, rel_err

F32_TOL = 1e-5
# bf16: both sides round every linear, residual add and softmax output to 8 mantissa bits,
# but in different orders (XLA fuses, torch does not), so errors of a few bf16 ulps compound
# over 7 layers. Measured 1.6e-2 on the logits (1.1e-2 on resid_post.6); 3e-2 leaves headroom
# without hiding bugs (a wrong norm or RoPE convention gives errors of order 1).
BF16_TOL = 3e-2


@pytest.fixture(scope="module")
def reference(hf_tiny, tiny_tokens):
    return hf_run_with_sites(hf_tiny, tiny_tokens)


def test_logits_match_transformers(tiny_model, tiny_tokens, reference):
    ref_logits, _ = reference
    out = tiny_model(jnp.asarray(tiny_tokens))
    assert out.logits.shape == ref_logits.shape
    assert rel_err(out.logits, ref_logits) <= F32_TOL


def test_every_site_matches_transformers_hooks(tiny_model, tiny_tokens, reference):
    _, ref_sites = reference
    num_layers = tiny_model.cfg.num_layers
    names = [f"{k}.{i}" for i in range(num_layers) for k in LAYER_SITES] + ["final_norm"]
    out = tiny_model(jnp.asarray(tiny_tokens), capture=names)
    for name in names:
        ours, ref = np.asarray(out.sites[name]), ref_sites[name]
        assert ours.shape == ref.shape, name
        assert rel_err(ours, ref) <= F32_TOL, name


def test_gs2_hook_strings_capture_the_same_tensors(tiny_model, tiny_tokens, reference):
    _, ref_sites = reference
    names = {
        "model.layers.5.pre_feedforward_layernorm.output": "mlp_in.5",
        "model.layers.5.post_feedforward_layernorm.output": "mlp_out.5",
        "model.layers.5.self_attn.o_proj.input": "attn_z.5",
        "model.layers.5.output": "resid_post.5",
        "blocks.3.hook_resid_post": "resid_post.3",
        "blocks.3.attn.hook_z": "attn_z.3",
        "blocks.2.hook_mlp_in": "mlp_in.2",
        "blocks.2.mlp.hook_in": "mlp_in.2",
        "blocks.6.hook_mlp_out": "mlp_out.6",
    }
    out = tiny_model(jnp.asarray(tiny_tokens), capture=list(names))
    for alias, ours in names.items():
        assert rel_err(out.sites[alias], ref_sites[ours]) <= F32_TOL, alias
    for kind in LAYER_SITES:
        if kind != "attn_pattern":
            site = Site(kind, 4)
            hooked = tiny_model(jnp.asarray(tiny_tokens), capture=[hf_hook_point(site)])
            np.testing.assert_array_equal(
                hooked.sites[hf_hook_point(site)],
                tiny_model(jnp.asarray(tiny_tokens), capture=[site.name]).sites[site.name],
            )


def test_left_padded_batch(tiny_model, hf_tiny):
    """Left padding: positions restart at the first real token; outputs equal unpadded runs
    and transformers given the same mask and positions."""
    rng = np.random.RandomState(1)
    lengths = [20, 13]
    width = max(lengths)
    tokens = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    rows = [rng.randint(4, 512, size=n) for n in lengths]
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    out = tiny_model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_tiny(
            torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
        ).logits.numpy()
    for i, row in enumerate(rows):
        real = slice(width - len(row), width)
        assert rel_err(out.logits[i, real], ref[i, real]) <= F32_TOL
        alone = tiny_model(jnp.asarray(row[None])).logits[0]
        assert rel_err(out.logits[i, real], alone) <= F32_TOL


def test_bfloat16_within_documented_tolerance(hf_tiny_dir, tiny_tokens, reference):
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM.from_pretrained(
        hf_tiny_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    ref_logits, ref_sites = hf_run_with_sites(hf, tiny_tokens)
    model, _ = load_gemma3(hf_tiny_dir, dtype=jnp.bfloat16, tokenizer=False, progress=False)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    out = model(jnp.asarray(tiny_tokens), capture=["resid_post.3", "mlp_out.6"])
    assert out.logits.dtype == jnp.bfloat16
    assert rel_err(out.logits, ref_logits) <= BF16_TOL
    for name in ("resid_post.3", "mlp_out.6"):
        assert rel_err(out.sites[name], ref_sites[name]) <= BF16_TOL, name
    # Against the float32 truth, our bf16 is no less accurate than transformers' bf16
    # (measured: 1.9e-2 vs 2.1e-2).
    f32_logits, _ = reference
    assert rel_err(out.logits, f32_logits) <= 1.25 * rel_err(ref_logits, f32_logits)


def test_sharded_safetensors_with_index(hf_tiny, tmp_path, tiny_model, tiny_tokens):
    hf_tiny.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_gemma3(tmp_path, tokenizer=False, progress=False)
    np.testing.assert_array_equal(
        model(jnp.asarray(tiny_tokens)).logits, tiny_model(jnp.asarray(tiny_tokens)).logits
    )


def test_multimodal_checkpoint_text_path(tmp_path, tiny_tokens):
    """A Gemma3ForConditionalGeneration checkpoint (language_model.model.* keys, vision tower
    present) loads as the text model; logits equal transformers' multimodal model's."""
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tests.hf_reference import randomize_, tiny_text_config

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    cfg = HFGemma3Config(
        text_config=tiny_text_config(), vision_config=vision, mm_tokens_per_image=4
    )
    cfg._attn_implementation = "eager"
    hf = randomize_(Gemma3ForConditionalGeneration(cfg), seed=3).eval()
    hf.save_pretrained(tmp_path)
    from gemmascope_jax.io.safetensors import SafetensorsFile

    keys = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("language_model.model.") for k in keys), keys[:5]
    assert any(k.startswith("vision_tower.") for k in keys)
    model, _ = load_gemma3(tmp_path, tokenizer=False, progress=False)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tiny_tokens)).logits.numpy()
    assert rel_err(model(jnp.asarray(tiny_tokens)).logits, ref) <= F32_TOL


def test_tiny_preset_matches_test_checkpoint_architecture(tiny_model):
    from gemmascope_jax.gemma3.config import gemma3_tiny

    preset = gemma3_tiny()
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(preset, field) == getattr(tiny_model.cfg, field)
    assert preset.layer_types == tiny_model.cfg.layer_types


def test_fresh_random_model_runs_in_both_dtypes():
    from flax import nnx

    from gemmascope_jax.gemma3.config import gemma3_tiny
    from gemmascope_jax.gemma3.model import Gemma3

    for dtype in (jnp.float32, jnp.bfloat16):
        model = Gemma3(gemma3_tiny().with_dtype(dtype), rngs=nnx.Rngs(1))
        out = model(jnp.ones((1, 12), jnp.int32), capture=["attn_pattern.2"])
        assert out.logits.dtype == dtype
        assert np.isfinite(np.asarray(out.logits, np.float32)).all()
        probs = np.asarray(out.sites["attn_pattern.2"], np.float32)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-2)
