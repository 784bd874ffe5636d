"""Fixed-size sparse codes: the K largest active latents per token, and decoding from them.

A dense code row [F] with a handful of non-zeros is stored as

    values   [..., K]  float, descending; the active latents' codes, then zeros
    indices  [..., K]  int32 in [0, F), distinct within a row
    overflow [...]     int32, active latents beyond K that were dropped (0 if none)

"Active" means a non-zero code. K is fixed (static shapes for jit). When a token has fewer
than K active latents, the remaining slots are padding: value exactly 0 and an index of
some inactive latent (distinct from the row's other indices, otherwise unspecified), so
padding contributes nothing to any decode and a scatter back to dense is exact. When it has
more than K, the K largest are kept and `overflow` counts the rest, so
`l0 = count(values != 0) + overflow` always holds.

For multi-layer dictionaries the layer axis sits before K: values/indices [..., L, K],
overflow [..., L], indices local to each source layer's F latents.

`decode_rows` is the gather-and-sum decode (REFERENCE §6.4): `out = Σ_k v[k] · W[i[k]]`,
the XLA reference for the Pallas kernels.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SparseCodes:
    """values [..., K], indices [..., K] int32, overflow [...] int32 (see module docstring)."""

    values: jax.Array
    indices: jax.Array
    overflow: jax.Array

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def l0(self) -> jax.Array:
        """Active latents per row [...], including the dropped ones."""
        return (self.values != 0).sum(-1).astype(jnp.int32) + self.overflow

    def to_dense(self, width: int) -> jax.Array:
        """Dense codes [..., width] (dropped overflow latents are not recovered)."""
        return to_dense(self, width)


def sparsify(codes: jax.Array, k: int) -> SparseCodes:
    """Dense codes [..., F] (non-negative) -> `SparseCodes` with K = k slots per row."""
    width = codes.shape[-1]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in 1..{width} (latents per row), got {k!r}")
    values, indices = jax.lax.top_k(codes, int(k))
    values = jnp.where(values > 0, values, jnp.zeros((), values.dtype))
    active = (codes != 0).sum(-1).astype(jnp.int32)
    overflow = jnp.maximum(active - int(k), 0).astype(jnp.int32)
    return SparseCodes(values=values, indices=indices.astype(jnp.int32), overflow=overflow)


def to_dense(codes: SparseCodes, width: int) -> jax.Array:
    """Scatter-add `codes` into a dense [..., width] array."""
    values, indices = codes.values, codes.indices
    lead = values.shape[:-1]
    flat_v = values.reshape(-1, values.shape[-1])
    flat_i = indices.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat_v.shape[0])[:, None]
    dense = jnp.zeros((flat_v.shape[0], width), values.dtype).at[rows, flat_i].add(flat_v)
    return dense.reshape(*lead, width)


def decode_rows(values: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
    """`out[...] = Σ_k values[..., k] · w[indices[..., k]]`.

    values/indices [..., K]; w [F, *rest] -> out [..., *rest] in the values' dtype.
    """
    rows = jnp.take(w, indices, axis=0, mode="clip").astype(values.dtype)  # [..., K, *rest]
    flat = rows.reshape(*rows.shape[: values.ndim], -1)
    out = jnp.einsum("...k,...kr->...r", values, flat)
    return out.reshape(*values.shape[:-1], *w.shape[1:])


def prefix_mask(codes: SparseCodes, prefix: int | None) -> SparseCodes:
    """Zero the slots whose latent index is >= prefix (Matryoshka prefix decode)."""
    if prefix is None:
        return codes
    keep = codes.indices < prefix
    return codes.replace(values=jnp.where(keep, codes.values, jnp.zeros((), codes.values.dtype)))
