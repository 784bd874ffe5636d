"""The XLA formulations of the sparse decode and the ELL layout of its decoder gradient.

The reference implementation (`impl="xla"`, the CPU path) of `decode.py`'s op, one source
layer at a time, plus the latent sort the Pallas TPU decoder gradient shares
(`tpu_kernel.tpu_latent_rows`). Shapes (T tokens, K active slots, F latents, R columns of a
layer's table, g [T, C] with C >= R, M slots per ELL row, E overflow rows, n = T·K pairs):

    xla_gather_rows(values, indices, table)  [T, K] x [F, R] -> [T, R] f32     the forward
    xla_row_dots(indices, block, g)          [T, K], [F, J, D], [T, L, D] -> [T, K] f32
    sort_by_latent(latents, F)               [n] -> (sorted ids [n], positions [n]) int32
    ell_layout(values, indices, F, M, block) -> ell_values, ell_tokens [F + E, M], over_latent [E]
    xla_table_grad(*ell, g, R, block)        g [T, C] -> d_table [F, R] f32

Why a layout: d_table_l is a scatter-add of T·K rows of R, serial on XLA:CPU (it dominated
fwd+bwd), so it is turned into the forward's fast gather, megablox-style: the (token, slot)
pairs are sorted by latent and laid out as ELL rows of M slots (`ell_layout`): row f holds
latent f's first M (value, token) pairs, further pairs spill into at most T·K / M overflow
rows (a static bound). Gathering rows of g [T, R] with those weights (the forward's fused
gather) gives d_table_l directly; the used overflow rows are gathered and scatter-added into
their latents block by block (`xla_table_grad`). The row dots sum each slot's L - l gathered
[T, D] products in one loop fusion (`xla_row_dots`: XLA:CPU would not fuse the gather into a
reduction over R). The sort and ELL arrays are O(T·K + F·M) per layer: no dense [T, F] array
is ever formed.

They live apart from `decode.py` (dispatch, custom VJP, sharding) so that `tpu_kernel.py` can
use `sort_by_latent` without importing the op that dispatches to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Slots fused into one XLA loop; larger K scans over chunks of this many. Measured on CPU
# (K = 32, d = 640): 8 is the fastest forward; 2 the fastest row dots over the layers of a
# deep CLT (each slot there fuses L - l gathers; per layer, 4 is 10-50% slower at L - l = 1,
# 13 and 26, 25% faster at 6), and small chunks keep compile times of deep CLTs down.
# Overflow ELL rows (`xla_table_grad`) are reduced OVERFLOW_BLOCK at a time.
FORWARD_CHUNK = 8
BACKWARD_CHUNK = 2
OVERFLOW_BLOCK = 512


def _fused_rows(values, indices, table):
    """`Σ_k values[:, k] · table[indices[:, k]]` [T, R] f32 as one fused expression."""
    acc = None
    for k in range(values.shape[1]):
        rows = jnp.take(table, indices[:, k], axis=0, mode="clip").astype(jnp.float32)
        term = values[:, k, None].astype(jnp.float32) * rows
        acc = term if acc is None else acc + term
    return acc


def _chunked(values, indices, chunk: int):
    """[T, K] -> [K / chunk, T, chunk] (zero-valued padding slots, index 0)."""
    pad = -values.shape[1] % chunk
    values = jnp.pad(values, ((0, 0), (0, pad)))
    indices = jnp.pad(indices, ((0, 0), (0, pad)))
    split = lambda a: a.reshape(a.shape[0], -1, chunk).transpose(1, 0, 2)
    return split(values), split(indices)


def xla_gather_rows(values: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """`Σ_k values[:, k] · table[indices[:, k]]` in float32: [T, K] x [F, R] -> [T, R].

    Fused gather-multiply-adds (XLA never materialises [T, K, R]); for larger K a scan
    over chunks of FORWARD_CHUNK slots keeps the program small."""
    if values.shape[1] <= FORWARD_CHUNK:
        return _fused_rows(values, indices, table)
    # The first chunk starts the carry: inside `shard_map` it then has the operands' varying
    # mesh axes (a zeros init would not, and the scan would reject the carry's type).
    chunk_values, chunk_indices = _chunked(values, indices, FORWARD_CHUNK)
    init = _fused_rows(chunk_values[0], chunk_indices[0], table)
    body = lambda acc, chunk: (acc + _fused_rows(*chunk, table), None)
    return jax.lax.scan(body, init, (chunk_values[1:], chunk_indices[1:]))[0]


def _fused_row_dots(indices, table, g, n_out: int):
    """[T, c] slots, table [F·J, D], g [T, L, D] -> [T, c] f32 (see `xla_row_dots`)."""
    first = g.shape[1] - n_out
    parts = []
    for k in range(indices.shape[1]):
        acc = None
        for j in range(n_out):
            rows = jnp.take(table, indices[:, k] * n_out + j, axis=0, mode="clip")
            term = rows.astype(jnp.float32) * g[:, first + j]
            acc = term if acc is None else acc + term
        parts.append(acc)
    return jnp.stack(parts, axis=1).sum(-1)


def xla_row_dots(indices: jax.Array, block: jax.Array, g: jax.Array) -> jax.Array:
    """`d_values[t, k] = ⟨g[t, L - J:], block[indices[t, k]]⟩`: [T, K], [F, J, D], [T, L, D] f32
    -> [T, K] (the block feeds the last J of g's L output layers).

    XLA:CPU does not fuse a gather into a reduction (it would write every gathered [T, J·D]
    row, then reduce them, 3-4x slower), so per slot the J [T, D] products are summed in one
    loop fusion with the gathers inside, as in the forward, and only [T, c, D] is reduced.
    g is read in place (no per-layer [T, J, D] copy)."""
    n_active, n_out = indices.shape[1], block.shape[1]
    table = block.reshape(-1, block.shape[-1])  # row f·J + j = block[f, j]
    if n_active <= BACKWARD_CHUNK:
        return _fused_row_dots(indices, table, g, n_out)
    _, chunks = _chunked(jnp.zeros(indices.shape, jnp.float32), indices, BACKWARD_CHUNK)
    out = jax.lax.map(lambda idx: _fused_row_dots(idx, table, g, n_out), chunks)  # [C, T, c]
    return out.transpose(1, 0, 2).reshape(indices.shape[0], -1)[:, :n_active]


def ell_width(n_pairs: int, n_latents: int) -> int:
    """Slots per ELL row, M: the power of two nearest half the mean pairs per latent, n / 2F,
    in [1, FORWARD_CHUNK] (so a row block is one fused gather). The gathers then cover about
    1.25 n slots for uniform latents (at most F·M + n) and the scatter-add at most n / M rows.
    Measured on CPU (n / F = 16): M = 8 beats 16 and 32 by 20-25% at L = 6; 4, 8 and 16 tie
    within noise at L = 13."""
    half_mean = max(n_pairs / max(2 * n_latents, 1), 1.0)
    return int(min(FORWARD_CHUNK, 2 ** round(np.log2(half_mean))))


def sort_by_latent(latents: jax.Array, n_latents: int) -> tuple[jax.Array, jax.Array]:
    """Stable sort of latent ids [n]: (sorted ids, their positions in `latents`) [n] int32.

    One single-key sort of `latent·n + position` (unique keys, so stable) when that fits
    uint32, else a stable argsort (measured 6-10x slower on CPU)."""
    n = latents.shape[0]
    if n_latents * n <= 2**32:
        key = jnp.sort(latents.astype(jnp.uint32) * n + jnp.arange(n, dtype=jnp.uint32))
        return (key // n).astype(jnp.int32), (key % n).astype(jnp.int32)
    order = jnp.argsort(latents, stable=True).astype(jnp.int32)
    return latents[order].astype(jnp.int32), order


def ell_layout(values, indices, n_latents: int, width: int, block: int):
    """The (value, token) pairs of values/indices [T, K] grouped by latent, as ELL rows.

    With n = T·K pairs and M = width: row f < F holds latent f's first M pairs; each latent's
    further pairs fill the overflow rows after row F, in latent order and from the front
    (latent f needs ceil(count_f / M) - 1 of them, (n - 1) // M in all: a static bound,
    rounded up to whole blocks). Empty slots hold value 0, token 0. Returns ell_values,
    ell_tokens [F + E, M] and over_latent [E] (the latent of row F + e, F for an unused row),
    from a sort of the pairs by latent, binary searches and gathers: nothing of size T·F.
    """
    n_tokens, k = indices.shape
    n_pairs = n_tokens * k
    n_over = -(-(max(n_pairs - 1, 0) // width) // block) * block
    sorted_idx, order = sort_by_latent(indices.reshape(-1), n_latents)
    latents = jnp.arange(n_latents + 1, dtype=jnp.int32)
    bounds = jnp.searchsorted(sorted_idx, latents).astype(jnp.int32)  # [F + 1]
    start, end = bounds[:-1], bounds[1:]
    extra = jnp.maximum((end - start + width - 1) // width - 1, 0)  # overflow rows per latent
    extra_end = jnp.cumsum(extra)
    over = jnp.arange(n_over, dtype=jnp.int32)
    over_latent = jnp.searchsorted(extra_end, over, side="right").astype(jnp.int32)
    safe = jnp.minimum(over_latent, n_latents - 1)
    rank = over - (extra_end - extra)[safe] + 1  # overflow row's place among its latent's rows
    row_start = jnp.concatenate([start, start[safe] + rank * width])
    row_end = jnp.concatenate([end, jnp.where(over_latent < n_latents, end[safe], 0)])
    pos = row_start[:, None] + jnp.arange(width, dtype=jnp.int32)  # [F + E, M]
    filled = pos < row_end[:, None]
    pair = jnp.take(order, pos, mode="clip")
    ell_values = jnp.where(filled, jnp.take(values.reshape(-1), pair), 0)
    ell_tokens = jnp.where(filled, pair // k, 0)
    return ell_values, ell_tokens, over_latent


def xla_table_grad(ell_values, ell_tokens, over_latent, g, n_cols: int, block: int):
    """`d_table[f] = Σ_{(t, k): indices[t, k] = f} values[t, k] · g[t, -R:]` -> [F, R] float32,
    R = n_cols, from g [T, C] (C >= R: the slice fuses into the gathers, so no per-layer
    [T, R] copy of g is written).

    Takes `ell_layout`'s rows [F + E, M] (M <= FORWARD_CHUNK from `ell_width`: one fused
    gather per row block). The forward's fused gather, reading rows of g with the first F ELL
    rows (row f = latent f), gives d_table directly; a loop over only the used blocks of
    overflow rows then gathers each block and scatter-adds it into its (sorted) latents: at
    most n / M scattered rows instead of n."""
    n_latents = ell_values.shape[0] - over_latent.shape[0]
    gather = lambda v, t: _fused_rows(v, t, g)[:, g.shape[1] - n_cols :]
    d_table = gather(ell_values[:n_latents], ell_tokens[:n_latents])
    if not over_latent.shape[0]:  # n <= M: no overflow rows
        return d_table
    over_values, over_tokens = ell_values[n_latents:], ell_tokens[n_latents:]
    n_blocks = (jnp.sum(over_latent < n_latents) + block - 1) // block

    def add_block(b, acc):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, b * block, block)
        part = gather(rows(over_values), rows(over_tokens))
        return acc.at[rows(over_latent)].add(part, mode="drop", indices_are_sorted=True)

    return jax.lax.fori_loop(0, n_blocks, add_block, d_table)
