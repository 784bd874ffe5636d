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

Grouped selection (`groups` = G > 1, TR App. B.2): the F latents are G contiguous ranges and
each range keeps its own K/G largest, in slots `[g·K/G, (g+1)·K/G)`. Latents of different
groups never compete, but with G a multiple of the mesh's `model` axis every device selects
and decodes only its own latent shard's slots (`pallas_kernels.sparse_decode(slot_groups=)`):
no gather of the dense codes, and a 1/model share of the decoder-row traffic per device.
`overflow` is summed over the groups.

Encoders: `sparsify` turns dense codes (e.g. JumpReLU) into this form with an overflow count;
`topk_codes` is the TopK activation straight to sparse form, per row (for multi-layer
dictionaries: per source layer), exact (`lax.top_k`) or approximate (`lax.approx_max_k` at a
recall target, TR App. B.2; docs/recipe.md). Both pass gradients to the kept values.

`decode_rows` is the gather-and-sum decode (docs/kernels.md): `out = Σ_k v[k] · W[i[k]]`,
`pallas_kernels.sparse_decode_single` (XLA on CPU, Pallas kernels on TPU / GPU).
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import sparse_decode_single


@flax.struct.dataclass
class SparseCodes:
    """values [..., K], indices [..., K] int32, overflow [...] int32 (see module docstring)."""

    values: jax.Array
    indices: jax.Array
    overflow: jax.Array
    groups: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def l0(self) -> jax.Array:
        """Active latents per row [...], including the dropped ones."""
        return (self.values != 0).sum(-1).astype(jnp.int32) + self.overflow

    def to_dense(self, width: int) -> jax.Array:
        """Dense codes [..., width] (dropped overflow latents are not recovered)."""
        return to_dense(self, width)


def _check_k(k, width: int) -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in 1..{width} (latents per row), got {k!r}")
    return int(k)


def _largest(a: jax.Array, k: int, recall_target: float | None):
    """(values, int32 indices) of the k largest along the last axis, exact or approximate."""
    if recall_target is None:
        values, indices = jax.lax.top_k(a, k)
    else:
        if not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")
        values, indices = jax.lax.approx_max_k(a, k, recall_target=float(recall_target))
    return values, indices.astype(jnp.int32)


def sparsify(
    codes: jax.Array, k: int, *, recall_target: float | None = None, groups: int = 1
) -> SparseCodes:
    """Dense codes [..., F] (non-negative) -> `SparseCodes` with K = k slots per row.

    The K largest codes are kept (`recall_target` switches to `lax.approx_max_k`, which may
    miss some of them); `overflow` counts the active latents beyond K. `groups` = G > 1
    keeps the K/G largest of each of G contiguous latent ranges (module docstring).
    """
    width = codes.shape[-1]
    k = _check_k(k, width)
    if not isinstance(groups, numbers.Integral) or groups < 1 or k % groups or width % groups:
        raise ValueError(f"groups must divide k ({k}) and the width ({width}), got {groups!r}")
    grouped = codes.reshape(*codes.shape[:-1], groups, width // groups)
    values, indices = _largest(grouped, k // groups, recall_target)
    indices = indices + (jnp.arange(groups, dtype=jnp.int32) * (width // groups))[:, None]
    values = jnp.where(values > 0, values, jnp.zeros((), values.dtype))
    active = (grouped != 0).sum(-1).astype(jnp.int32)
    overflow = jnp.maximum(active - k // groups, 0).sum(-1).astype(jnp.int32)
    flat = lambda a: a.reshape(*codes.shape[:-1], k)
    return SparseCodes(flat(values), flat(indices), overflow, groups=int(groups))


def topk_codes(pre: jax.Array, k: int, *, recall_target: float | None = None) -> SparseCodes:
    """The TopK activation in sparse form: per row of `pre` [..., F], the k largest of
    `relu(pre)` -> values/indices [..., k] (overflow 0: TopK keeps at most k by definition).

    Equals `sparsify(activations.topk(pre, k), k)` without the dense [..., F] codes;
    `recall_target` (e.g. 0.95) uses `lax.approx_max_k` (TR App. B.2: 0.75-0.975 work).
    """
    k = _check_k(k, pre.shape[-1])
    values, indices = _largest(pre, k, recall_target)
    values = jax.nn.relu(values)
    overflow = jnp.zeros(pre.shape[:-1], jnp.int32)
    return SparseCodes(values=values, indices=indices, overflow=overflow)


def fire_counts(codes: SparseCodes, width: int) -> jax.Array:
    """Rows on which each latent is active: codes [N, (L,) K] -> [(L,) width] int32."""
    active = (codes.values != 0).astype(jnp.int32)
    lead = codes.values.shape[1:-1]
    flat_i = codes.indices.reshape(codes.indices.shape[0], -1, codes.k)
    flat_a = active.reshape(flat_i.shape)
    groups = jnp.arange(flat_i.shape[1])[None, :, None]
    counts = jnp.zeros((flat_i.shape[1], width), jnp.int32).at[groups, flat_i].add(flat_a)
    return counts.reshape(*lead, width)


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

    values/indices [..., K]; w [F, *rest] -> out [..., *rest] in the values' dtype. Indices
    out of [0, F) raise a ValueError (when concrete).
    """
    table = w.astype(values.dtype).reshape(w.shape[0], -1)
    out = sparse_decode_single(values, indices, table)
    return out.reshape(*values.shape[:-1], *w.shape[1:])


def prefix_mask(codes: SparseCodes, prefix: int | None) -> SparseCodes:
    """Zero the slots whose latent index is >= prefix (Matryoshka prefix decode)."""
    if prefix is None:
        return codes
    keep = codes.indices < prefix
    return codes.replace(values=jnp.where(keep, codes.values, jnp.zeros((), codes.values.dtype)))
