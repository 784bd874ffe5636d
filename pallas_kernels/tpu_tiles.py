"""The tile configuration of the Pallas TPU sparse-decode kernels (`tpu_kernel.py`).

    TpuTiles(token_tile=8, vmem_budget=4 MiB, max_prefetch=2**15)   per-call parameters
    default_tiles(device_kind) -> TpuTiles     per-generation defaults (v4, v5e, v5p, v6e)
    column_tile(n_cols, n_active, itemsize, tiles[, n_rows]) -> int | None
    tpu_unsupported(n_active, n_cols, dtype, tiles[, n_rows]) -> str       '' when it runs
    tpu_backward_unsupported(n_active, n_cols, dtype, tiles) -> str

A kernel step gathers rows into a VMEM scratch [TT, K, 1, tC] (TT = token_tile, K active
slots, tC the column tile of a [F, C] table); the decoder gradient's scratch is
`latent_rows_scratch(tiles)` float32 rows of tC. These checks are plain Python on shapes, so
`decode.py` picks the kernel or the XLA fallback without importing Pallas.

Tiles (`TpuTiles`) are parameters with per-generation defaults (`default_tiles`): the token
tile, and the column tile as the largest multiple of 128 dividing the columns whose scratch
fits a quarter of the generation's default scoped VMEM. Scalar prefetch is bounded by SMEM,
so long token axes are split into calls of at most `max_prefetch` pairs.
`tpu_unsupported` says why a shape cannot run (the caller then falls back to XLA).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LANES = 128
MiB = 1 << 20
# Default scoped-VMEM limit per generation (what XLA:TPU grants a kernel without an explicit
# `vmem_limit_bytes`; the v5 figure is the limit libtpu 0.0.42 reported in a
# CompileTimeScopedVmemOom for v5p). Scratch is kept to a quarter of it (double-buffered
# operand and output blocks live there too).
SCOPED_VMEM = {"v4": 16 * MiB, "v5e": 16 * MiB, "v5p": 16 * MiB, "v6e": 32 * MiB}
LATENT_TILE = 8  # latents per grid step of the decoder gradient (the sublane count)


@dataclasses.dataclass(frozen=True)
class TpuTiles:
    """token_tile: tokens per grid step (multiple of 8, the sublane count); vmem_budget:
    bytes of VMEM scratch a step may use (sets the column tile); max_prefetch: indices
    scalar-prefetched into SMEM per call (longer token axes are split into calls)."""

    token_tile: int = 8
    vmem_budget: int = 4 * MiB
    max_prefetch: int = 1 << 15

    def __post_init__(self):
        if self.token_tile < 8 or self.token_tile % 8:
            raise ValueError(f"token_tile must be a positive multiple of 8, got {self.token_tile}")
        if self.vmem_budget < LANES * 4 * 8 or self.max_prefetch < self.token_tile:
            raise ValueError(f"tiles too small: {self}")


def generation(device_kind: str) -> str:
    """'v4', 'v5e', 'v5p', 'v6e' from a TPU `device_kind` ('TPU v5 lite', 'TPU v5p', ...)."""
    kind = device_kind.lower()
    if "v6" in kind:
        return "v6e"
    if "v5" in kind:
        return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
    return "v4"


def default_tiles(device_kind: str | None = None) -> TpuTiles:
    """Per-generation defaults: scratch within a quarter of the scoped VMEM (v6e: twice the
    v4/v5 budget, so twice the column tile); 8 tokens per step everywhere."""
    if device_kind is None:
        device = jax.devices()[0]
        device_kind = device.device_kind if device.platform == "tpu" else "TPU v5p"
    return TpuTiles(vmem_budget=SCOPED_VMEM[generation(device_kind)] // 4)


def column_tile(
    n_cols: int, n_active: int, itemsize: int, tiles: TpuTiles, n_rows: int | None = None
) -> int | None:
    """Largest multiple of 128 dividing `n_cols` whose scratch [n_rows, tile] (default rows:
    TT·K) fits the VMEM budget; `n_cols` itself when it is narrower than 128 and fits; None
    when nothing fits."""
    row_bytes = (tiles.token_tile * n_active if n_rows is None else n_rows) * itemsize
    if n_cols % LANES:
        return n_cols if n_cols < LANES and n_cols * row_bytes <= tiles.vmem_budget else None
    best = None
    for tile in range(LANES, n_cols + 1, LANES):
        if n_cols % tile == 0 and tile * row_bytes <= tiles.vmem_budget:
            best = tile
    return best


def tpu_unsupported(
    n_active: int, n_cols: int, dtype, tiles: TpuTiles, n_rows: int | None = None
) -> str:
    """Why the kernels cannot run this shape ('' when they can)."""
    if column_tile(n_cols, n_active, jnp.dtype(dtype).itemsize, tiles, n_rows) is None:
        rows = f"[TT, K={n_active}" if n_rows is None else f"[{n_rows}"
        return (
            f"no column tile: {n_cols} columns are not a multiple of {LANES} (or a {rows}, "
            f"tile] scratch exceeds the VMEM budget {tiles.vmem_budget} B)"
        )
    return ""


def tpu_backward_unsupported(n_active: int, n_cols: int, dtype, tiles: TpuTiles) -> str:
    """Why the backward's kernels (`tpu_row_dots` on a `dtype` table, `tpu_latent_rows`)
    cannot run this shape ('' when they can)."""
    return tpu_unsupported(n_active, n_cols, dtype, tiles) or tpu_unsupported(
        0, n_cols, jnp.float32, tiles, latent_rows_scratch(tiles)
    )


def latent_rows_scratch(tiles: TpuTiles) -> int:
    """Float32 scratch rows of `tpu_latent_rows`: the accumulator and a batch of g rows."""
    return LATENT_TILE + tiles.token_tile * 8
