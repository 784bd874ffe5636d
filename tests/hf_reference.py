"""Tiny transformers Gemma 3 models built and saved inside the tests, plus HF hook capture.

These are the numerical reference: transformers' own modules, randomized so that every
piece of the forward (norm gains, GQA, both layer types, sliding window shorter than the
sequence, linear RoPE scaling, query_pre_attn_scalar != head_dim) matters.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

LAYER_TYPES = (
    ["sliding_attention", "sliding_attention", "full_attention"]
    + ["sliding_attention"] * 3
    + ["full_attention"]
)


def tiny_text_config(**overrides) -> Gemma3TextConfig:
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=LAYER_TYPES,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        max_position_embeddings=512,
        attn_implementation="eager",
        use_cache=False,
    )
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm gains ~ N(0, 0.5) (they init to 0, hiding the (1 + w) form) and weights ~ N(0, 0.15)
    (the default 0.02 gives logits ~0.5 that hide bugs under any tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if name.endswith("norm.weight") else 0.15
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_causal_lm(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    return randomize_(Gemma3ForCausalLM(tiny_text_config(**overrides)), seed).eval()


# Our site kind -> (transformers submodule under model.layers.L, "input" or "output").
HF_SITE_MODULES = {
    "resid_pre": ("", "input"),
    "attn_in": ("input_layernorm", "output"),
    "attn_z": ("self_attn.o_proj", "input"),
    "attn_proj": ("self_attn.o_proj", "output"),
    "attn_out": ("post_attention_layernorm", "output"),
    "resid_mid": ("pre_feedforward_layernorm", "input"),
    "mlp_in": ("pre_feedforward_layernorm", "output"),
    "mlp_hidden": ("mlp.down_proj", "input"),
    "mlp_proj": ("mlp.down_proj", "output"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
    "resid_post": ("", "output"),
}


def hf_run_with_sites(hf_model, tokens, **kwargs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and every per-layer site (our names), read with hooks on transformers' modules
    named by the Gemma Scope 2 hook strings, plus the eager attention probabilities."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    text_model = (
        hf_model.model.language_model
        if hasattr(hf_model.model, "language_model")
        else (hf_model.model)
    )

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    for layer_idx, layer in enumerate(text_model.layers):
        for kind, (path, io) in HF_SITE_MODULES.items():
            module = layer.get_submodule(path) if path else layer
            key = f"{kind}.{layer_idx}"
            if io == "input":
                handles.append(
                    module.register_forward_pre_hook(
                        lambda m, args, kw=None, key=key: captured.__setitem__(
                            key, first(args).detach().float().numpy()
                        )
                    )
                )
            else:
                handles.append(
                    module.register_forward_hook(
                        lambda m, args, out, key=key: captured.__setitem__(
                            key, first(out).detach().float().numpy()
                        )
                    )
                )
        handles.append(
            layer.self_attn.register_forward_hook(
                lambda m, args, out, key=f"attn_pattern.{layer_idx}": captured.__setitem__(
                    key, out[1].detach().float().numpy()
                )
            )
        )
    handles.append(
        text_model.norm.register_forward_hook(
            lambda m, args, out: captured.__setitem__("final_norm", out.detach().float().numpy())
        )
    )
    try:
        with torch.no_grad():
            logits = hf_model(torch.as_tensor(np.asarray(tokens)), **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return logits.float().numpy(), captured


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the tolerance measure used throughout the suite)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
