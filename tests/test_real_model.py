"""The embedded real Gemma 3 270M (GGUF): our forward and generation vs transformers' own GGUF
load of the same file, on real prompts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemmascope_jax.gemma3.generate import generate
from tests.hf_reference import rel_err

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Sparse autoencoders decompose a language model's activations into",
]
CHAT = [{"role": "user", "content": "Write one sentence about the ocean."}]


@pytest.fixture(scope="module")
def batch(real_model):
    _, tok = real_model
    rows = [tok.encode(p) for p in PROMPTS] + [tok.chat(CHAT)]
    tokens, mask = tok.batch(rows)
    return rows, tokens, mask


@pytest.fixture(scope="module")
def reference(hf_gguf_model, batch):
    _, tokens, mask = batch
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    captured = {}
    layer5 = hf_gguf_model.model.layers[5]
    hooks = [
        layer5.pre_feedforward_layernorm.register_forward_hook(
            lambda m, a, o: captured.__setitem__("mlp_in.5", o.numpy())
        ),
        hf_gguf_model.model.layers[9].register_forward_hook(
            lambda m, a, o: captured.__setitem__(
                "resid_post.9", (o[0] if isinstance(o, tuple) else o).numpy()
            )
        ),
        layer5.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a: captured.__setitem__("attn_z.5", a[0].numpy())
        ),
    ]
    with torch.no_grad():
        logits = hf_gguf_model(
            torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, captured


def test_real_logits_and_sites_match_transformers(real_model, batch, reference):
    model, _ = real_model
    rows, tokens, mask = batch
    ref_logits, ref_sites = reference
    sites = ("mlp_in.5", "attn_z.5", "resid_post.9")
    out = model.jitted(capture=sites)(jnp.asarray(tokens), jnp.asarray(mask))
    width = tokens.shape[1]
    for i, row in enumerate(rows):
        real = slice(width - len(row), width)
        ours, ref = np.asarray(out.logits[i, real]), ref_logits[i, real]
        assert rel_err(ours, ref) <= 1e-4, i
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
        for name in sites:
            assert rel_err(out.sites[name][i, real], ref_sites[name][i, real]) <= 1e-4, name


def test_greedy_generation_matches_transformers(real_model, hf_gguf_model):
    """24 new tokens of a chat and a plain prompt, decoded together (left-padded, KV cache)
    against transformers' greedy generation of each prompt alone."""
    model, tok = real_model
    prompts = [tok.chat(CHAT), tok.encode(PROMPTS[0])]
    ours = generate(model, prompts, max_new_tokens=24)
    for prompt, row in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_gguf_model.generate(
                torch.as_tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=[1, 106]
            )[0, len(prompt) :].tolist()
        assert row == ref, (tok.decode(row), tok.decode(ref))
