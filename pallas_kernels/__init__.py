"""Sparse decode kernels for cross-layer transcoders (XLA reference, Pallas TPU and GPU).

    out = sparse_decode(values, indices, w_dec_blocks)   # [T, L, K] x blocks[l] [F, L-l, D]
    y = sparse_decode_single(values, indices, w_dec)     # [T, K] x [F, D] -> [T, D]
    with use_impl("pallas_tpu"): ...                     # or impl=..., GEMMASCOPE_SPARSE_IMPL

See `decode.py` for the op, its VJP and implementation choice; `xla_decode.py` for the XLA
formulations (and the ELL layout of the decoder gradient); `tpu_kernel.py` (tiles in
`tpu_tiles.py`) and `gpu_kernel.py` for the Pallas kernels. Sparse encoders (top-K,
JumpReLU -> fixed K) live in `gemmascope_jax.dictionaries.sparse`.
"""

from pallas_kernels.decode import (
    IMPL_ENV,
    IMPLS,
    resolve_impl,
    sparse_decode,
    sparse_decode_single,
    use_impl,
)

__all__ = [
    "IMPLS",
    "IMPL_ENV",
    "resolve_impl",
    "sparse_decode",
    "sparse_decode_single",
    "use_impl",
]
