"""Pallas TPU (Mosaic) row-gather kernel: `out[t] = Σ_k values[t, k] · table[indices[t, k]]`.

Shapes: values/indices [T, K], table [F, R] (one source layer's causal decoder block seen as
rows of R = (L - l)·D), out [T, R] float32.

Layout (REFERENCE §6.1, §6.2; the Pallas TPU scalar-prefetch / paged-attention pattern):
the indices are scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`) and drive the
DMA of decoder rows; the table stays in HBM (`memory_space=pl.ANY`). The grid is
(token tiles of `TOKEN_TILE`, column tiles of R). Each step starts one async copy per
(token, k) of the row slice `table[indices[t, k], cols]` into a VMEM scratch [TT, K, tR],
waits for all of them, then reduces each token's K rows with a [1, K] x [K, tR] MXU dot in
float32. In-kernel vector indexing of VMEM refs is avoided (Mosaic rejects it, jax #39366).
Every output block is written exactly once (no revisits).

SMEM holds T·K int32 indices, so very large token counts should be split by the caller
(`sparse_decode` is per source layer already). Tested on CPU with the TPU-faithful
interpreter `pltpu.InterpretParams()` (out-of-bounds reads raise, uninitialised memory is
NaN); a compile on a real TPU has not been run in this repository.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

TOKEN_TILE = 8
MAX_COL_TILE = 2048


def column_tile(n_cols: int) -> int:
    """Largest multiple of 128 dividing `n_cols` and <= MAX_COL_TILE; all of it otherwise."""
    if n_cols <= MAX_COL_TILE:
        return n_cols
    for tile in range(MAX_COL_TILE, 127, -128):
        if n_cols % tile == 0:
            return tile
    return n_cols


def _kernel(idx_ref, val_ref, table_hbm, *rest, n_active: int, col_tile: int):
    out_ref, rows, sem = rest[-3:]  # rest[0] is the aliased poison buffer when present
    tile, col = pl.program_id(0), pl.program_id(1) * col_tile

    def copy(j):
        t, k = j // n_active, j % n_active
        row = idx_ref[(tile * TOKEN_TILE + t) * n_active + k]
        return pltpu.make_async_copy(
            table_hbm.at[pl.ds(row, 1), pl.ds(col, col_tile)], rows.at[t, pl.ds(k, 1)], sem
        )

    n_copies = TOKEN_TILE * n_active

    @pl.loop(0, n_copies)
    def _start(j):
        copy(j).start()

    @pl.loop(0, n_copies)
    def _wait(j):
        copy(j).wait()

    for t in range(TOKEN_TILE):
        weights = val_ref[pl.ds(t, 1), :]
        out_ref[pl.ds(t, 1), :] = jnp.dot(
            weights,
            rows[t],
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )


@functools.partial(jax.jit, static_argnames=("interpret", "poison"))
def tpu_gather_rows(
    values: jax.Array,
    indices: jax.Array,
    table: jax.Array,
    *,
    interpret: bool | None = None,
    poison: bool = False,
) -> jax.Array:
    """values/indices [T, K], table [F, R] -> [T, R] float32 (see the module docstring).

    `interpret=None` runs natively on TPU and under `pltpu.InterpretParams()` elsewhere.
    `poison=True` aliases a NaN-filled buffer to the output, so rows the kernel fails to
    write show up as NaN (a test hook).
    """
    n_tokens, n_active = values.shape
    n_cols = table.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    pad = -n_tokens % TOKEN_TILE
    values = jnp.pad(values.astype(table.dtype), ((0, pad), (0, 0)))
    indices = jnp.pad(indices.astype(jnp.int32), ((0, pad), (0, 0)))
    n_padded = n_tokens + pad
    col_tile = column_tile(n_cols)
    operands = [indices.reshape(-1), values, table]
    in_specs = [
        pl.BlockSpec((TOKEN_TILE, n_active), lambda i, c, idx: (i, 0)),
        pl.BlockSpec(memory_space=pl.ANY),
    ]
    aliases = {}
    if poison:
        operands.append(jnp.full((n_padded, n_cols), jnp.nan, jnp.float32))
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        aliases = {3: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(n_padded // TOKEN_TILE, n_cols // col_tile),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((TOKEN_TILE, col_tile), lambda i, c, idx: (i, c)),
        scratch_shapes=[
            pltpu.VMEM((TOKEN_TILE, n_active, col_tile), table.dtype),
            pltpu.SemaphoreType.DMA(()),
        ],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, n_active=n_active, col_tile=col_tile),
        out_shape=jax.ShapeDtypeStruct((n_padded, n_cols), jnp.float32),
        grid_spec=grid_spec,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="sparse_decode_rows_tpu",
    )(*operands)
    return out[:n_tokens]
