"""One `pallas_call` wrapper for every kernel, inside or outside `shard_map`.

Inside `shard_map` (with its varying-axes check) every operand of a custom call must vary
over the same manual mesh axes, and the output must declare that type; outside, operands
pass unchanged. The TPU and GPU kernels all return float32 (accumulated) arrays.

Each call also states its cost (`sparse_rows_cost`): without one, XLA counts a custom call
as reading every byte of every operand, i.e. the whole decoder table per call, where the
kernels move only the rows they gather. `gemmascope-jax plan`'s roofline reads these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def vma_aligned(*operands):
    """Inside `shard_map`: the operands made varying over the union of their manual mesh axes,
    and that type for the kernel's output; outside, the operands unchanged and None."""
    axes = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
    if not axes:
        return operands, None

    def widen(x):
        missing = tuple(sorted(axes - jax.typeof(x).mat.varying))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    operands = tuple(widen(x) for x in operands)
    return operands, jax.typeof(operands[0]).mat


def manual_pallas_call(kernel, operands, out_shape: tuple[int, ...], **pallas_kwargs):
    """`pl.pallas_call(kernel, out_shape=float32 out_shape, **pallas_kwargs)(*operands)`, with
    operands and output typed for the enclosing `shard_map`, if any."""
    operands, mat = vma_aligned(*operands)
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32, manual_axis_type=mat)
    return pl.pallas_call(kernel, out_shape=out, **pallas_kwargs)(*operands)


def sparse_rows_cost(n_pairs: int, n_cols: int, row_itemsize: int, other_bytes: int):
    """FLOPs and HBM bytes of a kernel that moves `n_pairs` rows of `n_cols` elements and does
    one multiply-add per element of each (`other_bytes`: indices, values, outputs)."""
    return pl.CostEstimate(
        flops=2 * n_pairs * n_cols,
        transcendentals=0,
        bytes_accessed=n_pairs * n_cols * row_itemsize + other_bytes,
    )
