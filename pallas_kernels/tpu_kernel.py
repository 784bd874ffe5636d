"""Pallas TPU (Mosaic) kernels of the sparse decode: a row gather (forward, and the decoder
gradient over latent-sorted rows) and gathered row dots (the values gradient).

    tpu_gather_rows(values, indices, table)   out[t] = Σ_k values[t, k] · table[indices[t, k]]
    tpu_row_dots(indices, table, g)           out[t, k] = ⟨table[indices[t, k]], g[t]⟩

Shapes: values/indices [T, K], table [F, C] (a source layer's causal decoder block seen as
rows, or the output cotangent [T, L·D] read as rows by the decoder gradient), out [T, R]
float32 / [T, K] float32. Both kernels read a column window `col_offset .. col_offset + R`
of their [.., C] operand, so a layer's slice of g is never copied.

Layout (the Pallas TPU scalar-prefetch / paged-attention pattern; docs/kernels.md): the
indices (and the gather's values, as float32) are scalar-prefetched into SMEM
(`pltpu.PrefetchScalarGridSpec`) and drive the DMA of rows; the table stays in HBM
(`memory_space=pl.ANY`). The grid is (token tiles, column tiles). Each step starts one async
copy per (token, k) of the row slice `table[idx, cols]` into a VMEM scratch [TT, K, 1, tC],
waits for all, then per token reduces its K rows in float32 on the vector unit, in a
`fori_loop` over k: `acc += value · row` (gather), or `acc[k] = Σ row · g[t]` (row dots,
accumulated over the column tiles, the innermost "arbitrary" grid axis, so an output block
is only revisited on consecutive steps).

What Mosaic accepts (found by compiling for v5e with libtpu 0.0.42): the tiled (sublane,
lane) dims of a ref can only be sliced at tile-aligned offsets, so single rows are
addressed on untiled leading dims at both ends of the copy (the table viewed as [F, 1, C],
a free reshape; the scratch [TT, K, 1, tC]). Reading that scratch back as a [K, tC] matrix
for an MXU dot is a strided sublane load that took ~8 s of Mosaic compile per bf16 kernel
(10 min for a 270M CLT's fwd+bwd); the vector-unit loop compiles in under 1 s. In-kernel
vector indexing of VMEM refs is rejected (jax #39366).

Tiles (`TpuTiles`, per-generation `default_tiles`) and the shape checks
(`tpu_unsupported`: why a shape cannot run, the caller then falls back to XLA) live in
`tpu_tiles.py`. Scalar prefetch is bounded by SMEM, so long token axes are split into calls
of at most `max_prefetch` pairs.

Compiled for real TPU topologies (v5e, v5p) by `tests/test_tpu_compile.py` through libtpu's
AOT compiler; on CPU the kernels run in the TPU-faithful interpreter
`pltpu.InterpretParams()` (out-of-bounds reads raise, uninitialised memory is NaN).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.manual_call import manual_pallas_call, sparse_rows_cost
from pallas_kernels.tpu_tiles import (
    LANES,
    LATENT_TILE,
    TpuTiles,
    column_tile,
    default_tiles,
    latent_rows_scratch,
    tpu_unsupported,
)
from pallas_kernels.xla_decode import sort_by_latent


def _gather_to_vmem(idx_ref, table_hbm, rows, sem, *, first, n_active, token_tile, col, width):
    """DMA `table[idx[first + j], 0, col : col + width]` for j < TT·K into rows
    [TT, K, 1, width]. Rows are addressed on untiled leading dims at both ends: Mosaic only
    slices the tiled (sublane, lane) dims at tile-aligned offsets, so a [F, C] table or a
    [TT, K, C] scratch cannot take single-row copies at arbitrary rows."""

    def copy(j):
        t, k = j // n_active, j % n_active
        row = idx_ref[first + t * n_active + k]
        return pltpu.make_async_copy(table_hbm.at[row, :, pl.ds(col, width)], rows.at[t, k], sem)

    n_copies = token_tile * n_active

    @pl.loop(0, n_copies)
    def _start(j):
        copy(j).start()

    @pl.loop(0, n_copies)
    def _wait(j):
        copy(j).wait()


def _gather_kernel(idx_ref, val_ref, table_hbm, *rest, n_active, token_tile, col_tile, offset):
    out_ref, rows, sem = rest[-3:]  # rest[0] is the aliased poison buffer when present
    first = pl.program_id(0) * token_tile * n_active
    _gather_to_vmem(
        idx_ref,
        table_hbm,
        rows,
        sem,
        first=first,
        n_active=n_active,
        token_tile=token_tile,
        col=offset + pl.program_id(1) * col_tile,
        width=col_tile,
    )
    for t in range(token_tile):

        def add_row(k, acc, t=t):
            return acc + val_ref[first + t * n_active + k] * rows[t, k].astype(jnp.float32)

        zero = jnp.zeros((1, col_tile), jnp.float32)
        out_ref[pl.ds(t, 1), :] = jax.lax.fori_loop(0, n_active, add_row, zero)


def _row_dot_kernel(
    idx_ref, g_ref, table_hbm, out_ref, rows, sem, *, n_active, token_tile, col_tile
):  # noqa: E501
    tile, c = pl.program_id(0), pl.program_id(1)
    _gather_to_vmem(
        idx_ref,
        table_hbm,
        rows,
        sem,
        first=tile * token_tile * n_active,
        n_active=n_active,
        token_tile=token_tile,
        col=c * col_tile,
        width=col_tile,
    )

    @pl.when(c == 0)
    def _init():
        out_ref[...] = jnp.zeros_like(out_ref)

    slots = jax.lax.broadcasted_iota(jnp.int32, (1, n_active), 1)
    for t in range(token_tile):
        g = g_ref[pl.ds(t, 1), :].astype(jnp.float32)

        def add_dot(k, acc, t=t, g=g):
            dot = jnp.sum(rows[t, k].astype(jnp.float32) * g, axis=1, keepdims=True)
            return acc + jnp.where(slots == k, dot, 0.0)

        zero = jnp.zeros((1, n_active), jnp.float32)
        out_ref[pl.ds(t, 1), :] += jax.lax.fori_loop(0, n_active, add_dot, zero)


def _latent_rows_kernel(
    tok_ref, val_ref, starts_ref, ends_ref, g_hbm, *rest, batch, latent_tile, col_tile, offset
):
    """One (latent tile, column tile) of the decoder gradient: the tile's pairs are one
    contiguous run of the latent-sorted pairs, read in batches of `batch` rows of g; each
    row is added into its latent's accumulator row (found from the tile's segment ends)."""
    out_ref, acc, rows, sem = rest[-4:]
    col = offset + pl.program_id(1) * col_tile
    for j in range(latent_tile):
        if len(rest) == 5:  # accumulate onto the previous token chunk's result
            acc[j] = rest[0][pl.ds(j, 1), :]
        else:
            acc[j] = jnp.zeros((1, col_tile), jnp.float32)
    first, last = starts_ref[0, 0, 0], ends_ref[0, 0, latent_tile - 1]

    @pl.loop(0, (last - first + batch - 1) // batch)
    def _batch(b):
        start = first + b * batch
        count = jnp.minimum(batch, last - start)

        def copy(q):
            row = g_hbm.at[tok_ref[start + q], :, pl.ds(col, col_tile)]
            return pltpu.make_async_copy(row, rows.at[q], sem)

        @pl.loop(0, count)
        def _start(q):
            copy(q).start()

        @pl.loop(0, count)
        def _wait(q):
            copy(q).wait()

        @pl.loop(0, count)
        def _add(q):
            pair = start + q
            slot = jnp.int32(0)
            for j in range(latent_tile - 1):
                slot += (ends_ref[0, 0, j] <= pair).astype(jnp.int32)
            acc[slot] = acc[slot] + val_ref[pair] * rows[q].astype(jnp.float32)

    for j in range(latent_tile):
        out_ref[pl.ds(j, 1), :] = acc[j]


def _tpu_call(
    kernel, operands, out_shape, grid_spec, semantics, interpret, name, cost, aliases=None
):
    """One Mosaic kernel call: float32 [out_shape], typed for an enclosing `shard_map`."""
    return manual_pallas_call(
        kernel,
        operands,
        out_shape,
        grid_spec=grid_spec,
        input_output_aliases=aliases or {},
        cost_estimate=cost,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=_interpret(interpret),
        name=name,
    )


def _interpret(interpret: bool | None):
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return pltpu.InterpretParams() if interpret else False


def _token_chunks(n_tokens: int, n_active: int, tiles: TpuTiles):
    """(start, stop) token ranges of at most `max_prefetch` indices, whole token tiles."""
    per_call = max(tiles.token_tile, tiles.max_prefetch // n_active)
    per_call -= per_call % tiles.token_tile
    return [(s, min(s + per_call, n_tokens)) for s in range(0, n_tokens, per_call)]


def _pad_tokens(a: jax.Array, tile: int) -> jax.Array:
    return jnp.pad(a, ((0, -a.shape[0] % tile), (0, 0)))


@functools.partial(
    jax.jit, static_argnames=("col_offset", "n_cols", "tiles", "interpret", "poison")
)
def tpu_gather_rows(
    values: jax.Array,
    indices: jax.Array,
    table: jax.Array,
    *,
    col_offset: int = 0,
    n_cols: int | None = None,
    tiles: TpuTiles | None = None,
    interpret: bool | None = None,
    poison: bool = False,
) -> jax.Array:
    """values/indices [T, K], table [F, C] -> [T, R] float32, R = n_cols (default
    C - col_offset): `Σ_k values[t, k] · table[indices[t, k], col_offset:col_offset + R]`.

    `interpret=None` runs natively on TPU and under `pltpu.InterpretParams()` elsewhere.
    `poison=True` aliases a NaN-filled buffer to the output, so rows the kernel fails to
    write show up as NaN (a test hook)."""
    tiles = tiles or default_tiles()
    n_cols = table.shape[1] - col_offset if n_cols is None else n_cols
    n_active = values.shape[1]
    if why := tpu_unsupported(n_active, n_cols, table.dtype, tiles):
        raise ValueError(f"tpu_gather_rows: {why}")
    parts = [
        _gather_call(values[a:b], indices[a:b], table, col_offset, n_cols, tiles, interpret, poison)
        for a, b in _token_chunks(values.shape[0], n_active, tiles)
    ]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _gather_call(values, indices, table, col_offset, n_cols, tiles, interpret, poison):
    n_tokens, n_active = values.shape
    tt = tiles.token_tile
    col_tile = column_tile(n_cols, n_active, table.dtype.itemsize, tiles)
    # values rounded to the table's dtype (as the XLA path multiplies), held as f32 scalars
    values = _pad_tokens(values.astype(table.dtype).astype(jnp.float32), tt)
    indices = _pad_tokens(indices.astype(jnp.int32), tt)
    n_padded = values.shape[0]
    operands = [indices.reshape(-1), values.reshape(-1), table.reshape(table.shape[0], 1, -1)]
    in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
    aliases = {}
    if poison:
        operands.append(jnp.full((n_padded, n_cols), jnp.nan, jnp.float32))
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        aliases = {3: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n_padded // tt, n_cols // col_tile),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tt, col_tile), lambda i, c, *_: (i, c)),
        scratch_shapes=[
            pltpu.VMEM((tt, n_active, 1, col_tile), table.dtype),
            pltpu.SemaphoreType.DMA(()),
        ],
    )
    kernel = functools.partial(
        _gather_kernel, n_active=n_active, token_tile=tt, col_tile=col_tile, offset=col_offset
    )
    out = _tpu_call(
        kernel,
        operands,
        (n_padded, n_cols),
        grid_spec,
        ("parallel", "parallel"),
        interpret,
        "sparse_decode_rows_tpu",
        sparse_rows_cost(
            n_padded * n_active,
            n_cols,
            table.dtype.itemsize,
            n_padded * n_active * 8 + n_padded * n_cols * 4,
        ),
        aliases,
    )
    return out[:n_tokens]


@functools.partial(jax.jit, static_argnames=("g_offset", "tiles", "interpret"))
def tpu_row_dots(
    indices: jax.Array,
    table: jax.Array,
    g: jax.Array,
    *,
    g_offset: int = 0,
    tiles: TpuTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """indices [T, K], table [F, R], g [T, C] -> [T, K] float32:
    `⟨table[indices[t, k]], g[t, g_offset:g_offset + R]⟩` (the values gradient)."""
    tiles = tiles or default_tiles()
    n_active, n_cols = indices.shape[1], table.shape[1]
    why = tpu_unsupported(n_active, n_cols, table.dtype, tiles)
    if why or g_offset + n_cols > g.shape[1]:
        raise ValueError(f"tpu_row_dots: {why or 'g is narrower than offset + columns'}")
    parts = [
        _row_dot_call(indices[a:b], table, g[a:b], g_offset, tiles, interpret)
        for a, b in _token_chunks(indices.shape[0], n_active, tiles)
    ]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _row_dot_call(indices, table, g, g_offset, tiles, interpret):
    n_tokens, n_active = indices.shape
    n_cols, tt = table.shape[1], tiles.token_tile
    # A tile dividing both R and the offset reads g's window in place (for a CLT layer:
    # gcd((L - l)·D, l·D) is a multiple of D); otherwise the window is sliced out once.
    aligned = column_tile(math.gcd(n_cols, g_offset), n_active, table.dtype.itemsize, tiles)
    if aligned is None or (aligned % LANES and aligned != g.shape[1]):
        g, g_offset = g[:, g_offset : g_offset + n_cols], 0
        aligned = column_tile(n_cols, n_active, table.dtype.itemsize, tiles)
    col_tile, first_tile = aligned, g_offset // aligned
    indices = _pad_tokens(indices.astype(jnp.int32), tt)
    g = _pad_tokens(g, tt)
    n_padded = indices.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(n_padded // tt, n_cols // col_tile),
        in_specs=[
            pl.BlockSpec((tt, col_tile), lambda i, c, idx: (i, first_tile + c)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((tt, n_active), lambda i, c, idx: (i, 0)),
        scratch_shapes=[
            pltpu.VMEM((tt, n_active, 1, col_tile), table.dtype),
            pltpu.SemaphoreType.DMA(()),
        ],
    )
    kernel = functools.partial(_row_dot_kernel, n_active=n_active, token_tile=tt, col_tile=col_tile)
    out = _tpu_call(
        kernel,
        (indices.reshape(-1), g, table.reshape(table.shape[0], 1, -1)),
        (n_padded, n_active),
        grid_spec,
        ("parallel", "arbitrary"),
        interpret,
        "sparse_decode_row_dots_tpu",
        sparse_rows_cost(
            n_padded * n_active,
            n_cols,
            table.dtype.itemsize,
            n_padded * n_active * 8 + n_padded * n_cols * g.dtype.itemsize,
        ),
    )
    return out[:n_tokens]


@functools.partial(
    jax.jit, static_argnames=("n_latents", "col_offset", "n_cols", "tiles", "interpret")
)
def tpu_latent_rows(
    values: jax.Array,
    indices: jax.Array,
    g: jax.Array,
    *,
    n_latents: int,
    col_offset: int = 0,
    n_cols: int | None = None,
    tiles: TpuTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """values/indices [T, K], g [T, C] -> [F, R] float32, F = n_latents, R = n_cols (default
    C - col_offset): `Σ_{(t, k): indices[t, k] = f} values[t, k] · g[t, col_offset:+R]`,
    the decoder gradient, i.e. the transpose of `tpu_gather_rows`.

    The T·K pairs are sorted by latent (per SMEM-sized token chunk); each grid step owns
    LATENT_TILE latents and one column tile, and sums the g rows of its latents' contiguous
    run of pairs into a VMEM accumulator. Every output row is written by exactly one step,
    so no scatter exists anywhere (XLA:TPU's scatter-add of [n, R] rows needs scoped VMEM in
    proportion to its updates: 19-27 MiB of a 16 MiB limit at the 270M CLT shape). Token
    chunks accumulate in place (the previous result aliased to the output)."""
    tiles = tiles or default_tiles()
    n_cols = g.shape[1] - col_offset if n_cols is None else n_cols
    if why := tpu_unsupported(0, n_cols, jnp.float32, tiles, latent_rows_scratch(tiles)):
        raise ValueError(f"tpu_latent_rows: {why}")
    out = None
    for a, b in _token_chunks(values.shape[0], values.shape[1], tiles):
        out = _latent_rows_call(
            values[a:b], indices[a:b], a, g, out, n_latents, col_offset, n_cols, tiles, interpret
        )
    return out[:n_latents]


def _latent_rows_call(
    values, indices, first_token, g, prev, n_latents, offset, n_cols, tiles, interpret
):
    n_tokens, n_active = indices.shape
    lt, batch = LATENT_TILE, latent_rows_scratch(tiles) - LATENT_TILE
    col_tile = column_tile(n_cols, 0, 4, tiles, latent_rows_scratch(tiles))
    n_pairs = n_tokens * n_active
    latents, order = sort_by_latent(indices.reshape(-1), n_latents)
    tokens = first_token + order // n_active
    pair_values = values.reshape(-1).astype(jnp.float32)[order]
    n_padded = -(-n_latents // lt) * lt
    bounds = jnp.searchsorted(latents, jnp.arange(n_padded + 1, dtype=jnp.int32))
    bounds = jnp.minimum(bounds, n_pairs).astype(jnp.int32)
    # [tiles, 1, LT] with whole-array trailing dims (Mosaic's rank-1 SMEM blocks need 128+)
    smem_block = lambda: pl.BlockSpec(
        (1, 1, lt), lambda i, c, *_: (i, 0, 0), memory_space=pltpu.SMEM
    )
    in_specs = [smem_block(), smem_block(), pl.BlockSpec(memory_space=pl.ANY)]
    g = g.astype(jnp.float32).reshape(g.shape[0], 1, -1)
    segments = lambda a: a.reshape(-1, 1, lt)
    operands = [tokens, pair_values, segments(bounds[:-1]), segments(bounds[1:]), g]
    out_spec = pl.BlockSpec((lt, col_tile), lambda i, c, *_: (i, c))
    aliases = {}
    if prev is not None:
        operands.append(prev)
        in_specs.append(out_spec)
        aliases = {len(operands) - 1: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n_padded // lt, n_cols // col_tile),
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=[
            pltpu.VMEM((lt, 1, col_tile), jnp.float32),
            pltpu.VMEM((batch, 1, col_tile), jnp.float32),
            pltpu.SemaphoreType.DMA(()),
        ],
    )
    kernel = functools.partial(
        _latent_rows_kernel, batch=batch, latent_tile=lt, col_tile=col_tile, offset=offset
    )
    return _tpu_call(
        kernel,
        operands,
        (n_padded, n_cols),
        grid_spec,
        ("parallel", "parallel"),
        interpret,
        "sparse_decode_latent_rows_tpu",
        sparse_rows_cost(  # g rows per pair; the output (and the aliased previous sum) once
            n_pairs, n_cols, 4, n_pairs * 8 + n_padded * n_cols * 4 * (1 + len(aliases))
        ),
        aliases,
    )
