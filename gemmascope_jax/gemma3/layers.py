"""Gemma 3's primitive layers and functions, shared by the forward (`model.py`), the KV-cache
decoder (`kv_cache.py`), finetuning's `forward_from` and the dictionaries.

- `Weight`: an `nnx.Param` carrying `logical_axes` for `gemmascope_jax.sharding`.
- `weight`: creates a `Weight`, zeros or normal(std) initialised.
- `RMSNorm`: Gemma's `x / rms(x) * (1 + w)` in float32, cast back.
- `Linear`: bias-free projection, kernel stored `[in, out]` (transposed from torch).
- `matmul`: `x @ w` accumulated in float32 and rounded once, as torch's bf16 GEMM.
- `attention_masks`: causal (full) and sliding-window boolean masks with padding.
- `rope_tables`, `apply_rope`: RoPE cos/sin tables and their half-split rotation.

They live apart from the model so that code composing the forward by hand (decoding from
a cache, running from a middle layer) imports public names rather than the model's privates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Weight(nnx.Param):
    """A parameter with `logical_axes` metadata (names from `sharding.LOGICAL_RULES`)."""


def weight(rngs: nnx.Rngs, shape, logical_axes, dtype, std: float | None) -> Weight:
    value = (
        jnp.zeros(shape, dtype)
        if std is None
        else std * jax.random.normal(rngs.params(), shape, dtype=dtype)
    )
    return Weight(value, logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: `x / rms(x) * (1 + w)` computed in float32 (or wider), cast back."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = weight(rngs, (dim,), ("norm",), param_dtype, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(compute)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.weight[...].astype(compute))).astype(x.dtype)


class Linear(nnx.Module):
    """Bias-free projection with kernel `[in, out]`."""

    def __init__(self, d_in, d_out, logical_axes, *, param_dtype, rngs: nnx.Rngs):
        self.kernel = weight(rngs, (d_in, d_out), logical_axes, param_dtype, std=0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.kernel[...].astype(x.dtype))


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` accumulated in float32 (or wider) and rounded once to x's dtype.

    Same numbers as a plain matmul in float32; for bfloat16 it matches torch's bf16 GEMM
    (float32 accumulation) and lets XLA's CPU backend use its fast bf16 x bf16 -> f32 dot.
    """
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.matmul(x, w, preferred_element_type=wide).astype(x.dtype)


def attention_masks(valid: jax.Array, window: int) -> dict[bool, jax.Array]:
    """Boolean masks [batch, 1, 1, q, k] for sliding (True) and full (False) layers.

    Causal `k <= q`; sliding layers also need `q - k < window` (a query sees itself and the
    previous window-1 tokens); padded keys are masked.
    """
    t = valid.shape[-1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    causal = k_idx <= q_idx
    keys = valid[:, None, None, None, :]
    full = causal[None, None, None] & keys
    sliding = (causal & (q_idx - k_idx < window))[None, None, None] & keys
    return {True: sliding, False: full}


def rope_tables(positions, head_dim: int, base: float, scaling: float, dtype):
    """cos/sin [batch, seq, head_dim] as transformers builds them (fp32 angles, cast to dtype)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(base) ** exponent)
    if scaling != 1.0:
        inv_freq = inv_freq / jnp.float32(scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation over the last axis."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
