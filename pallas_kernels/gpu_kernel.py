"""Pallas GPU (Triton lowering) row-gather kernel: `out[t] = Σ_k values[t, k] · table[idx[t, k]]`.

Shapes: values/indices [T, K], table [F, R] (one source layer's causal decoder block seen as
rows of R = (L - l)·D), out [T, R] float32.

Why Triton and not Mosaic GPU (docs/kernels.md): on jax 0.10.2 the Mosaic GPU backend wants
`plgpu.kernel` (its `pallas_call` path is deprecated), its row gather on H100/H200 would need
one async copy per row (TMA gathers are Blackwell only), and its interpreter is private and
single-block only, so it could not be tested on CPU. The Triton lowering indexes a ref with
an index vector directly (as jax's paged-attention kernel does), accumulates in registers,
runs on Ampere and Hopper, and its kernels run on CPU under `interpret=True`. Triton is
selected by passing `pltriton.CompilerParams`; jax deprecates it in 0.11, so a port to
`plgpu.kernel` will be needed when the pin moves.

Grid: (token tiles of `TOKEN_TILE`, column tiles of `col_tile` <= 512, powers of two as
Triton requires). Each program loops over the K slots: loads the [TT] indices and values of
slot k, gathers the [TT, tR] row slices (masked at the right edge of R) and accumulates
`values[:, None] * rows` in float32. K is padded to a power of two with zero-valued slots.
Compiled for H100 / H200 (sm_90a, through ptxas) without a GPU by `tests/test_gpu_compile.py`
(`scripts/gpu_aot_check.py`, docs/gpu_compile.md); run on one H200 with jax 0.11.2 (tests and
timings: docs/benchmarks.md, "On an NVIDIA H200").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.manual_call import manual_pallas_call, sparse_rows_cost

TOKEN_TILE = 16
MAX_COL_TILE = 512


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _kernel(idx_ref, val_ref, table_ref, *rest, n_active: int, n_cols: int, col_tile: int):
    out_ref = rest[-1]  # rest[0] is the aliased poison buffer when present
    cols = pl.program_id(1) * col_tile + jnp.arange(col_tile)
    in_range = cols < n_cols

    def body(k, acc):
        idx = idx_ref[k, :]
        weights = val_ref[k, :].astype(jnp.float32)
        rows = pltriton.load(
            table_ref.at[idx[:, None], jnp.minimum(cols, n_cols - 1)[None, :]],
            mask=in_range[None, :],
            other=0.0,
        )
        return acc + weights[:, None] * rows.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, n_active, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret", "poison", "num_warps"))
def gpu_gather_rows(
    values: jax.Array,
    indices: jax.Array,
    table: jax.Array,
    *,
    interpret: bool | None = None,
    poison: bool = False,
    num_warps: int = 4,
) -> jax.Array:
    """values/indices [T, K], table [F, R] -> [T, R] float32 (see the module docstring).

    `interpret=None` compiles with Triton on GPU and runs `interpret=True` elsewhere.
    `poison=True` aliases a NaN-filled buffer to the output (a test hook for unwritten rows).
    """
    n_tokens, n_active = values.shape
    n_cols = table.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    k_pad = _next_pow2(n_active) - n_active
    t_pad = -n_tokens % TOKEN_TILE
    col_tile = min(_next_pow2(n_cols), MAX_COL_TILE)
    n_col_tiles = pl.cdiv(n_cols, col_tile)
    # [K, T] so that slot k is one contiguous row of the block.
    values_t = jnp.pad(values.astype(table.dtype), ((0, t_pad), (0, k_pad))).T
    indices_t = jnp.pad(indices.astype(jnp.int32), ((0, t_pad), (0, k_pad))).T
    n_slots, n_padded = values_t.shape
    out_cols = n_col_tiles * col_tile
    slot_spec = pl.BlockSpec((n_slots, TOKEN_TILE), lambda i, c: (0, i))
    operands = [indices_t, values_t, table]
    in_specs = [slot_spec, slot_spec, pl.BlockSpec(table.shape, lambda i, c: (0, 0))]
    aliases = {}
    if poison:
        operands.append(jnp.full((n_padded, out_cols), jnp.nan, jnp.float32))
        in_specs.append(pl.BlockSpec((TOKEN_TILE, col_tile), lambda i, c: (i, c)))
        aliases = {3: 0}
    out = manual_pallas_call(
        functools.partial(_kernel, n_active=n_slots, n_cols=n_cols, col_tile=col_tile),
        operands,
        (n_padded, out_cols),
        grid=(n_padded // TOKEN_TILE, n_col_tiles),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((TOKEN_TILE, col_tile), lambda i, c: (i, c)),
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        cost_estimate=sparse_rows_cost(
            n_padded * n_slots,
            n_cols,
            table.dtype.itemsize,
            n_padded * (n_slots * 8 + out_cols * 4),
        ),
        interpret=interpret,
        name="sparse_decode_rows_gpu",
    )
    return out[:n_tokens, :n_cols]
