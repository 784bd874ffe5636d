"""Ahead-of-time TPU compiles of the sparse decode, on any machine with libtpu (no TPU).

    compiled, seconds, args = compile_sparse_decode(
        CLT_SHAPES["1b"], "bfloat16", "v5p:2x2x1", mesh_shape=(1, 4))
    compiled_kernels(compiled.as_text())  # ('sparse_decode_latent_rows_tpu', ...)

`jax.experimental.topologies.get_topology_desc(topology, platform="tpu")` gives abstract TPU
devices; `jit(value_and_grad(decode)).lower(ShapeDtypeStructs).compile()` under `jax.set_mesh`
then runs libtpu's XLA:TPU and Mosaic compilers, which check what interpret mode cannot:
Mosaic's tiling rules, scoped-VMEM and SMEM limits, XLA:TPU's fusions around the kernels.
Used by `tests/test_tpu_compile.py` and `scripts/tpu_compile_report.py` (docs/kernels.md).
"""

from __future__ import annotations

import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.decode import sparse_decode

# Gemma Scope 2 CLT shapes: (tokens, layers, K active per source layer, latents per layer,
# d_model) for Gemma 3 270M (14,560 x 18 = 262k latents) and 1B (10,080 x 26 = 262k).
CLT_SHAPES = {"270m": (1024, 18, 64, 14560, 640), "1b": (2048, 26, 64, 10080, 1152)}
# The Mosaic kernels of a forward + backward: row gather, gathered row dots, latent rows.
DECODE_KERNELS = (
    "sparse_decode_latent_rows_tpu",
    "sparse_decode_row_dots_tpu",
    "sparse_decode_rows_tpu",
)


def tpu_devices(topology: str) -> list:
    """Abstract devices of a TPU slice such as 'v5e:2x2' or 'v5p:2x2x1' (needs libtpu)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no lock
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def compiled_kernels(hlo_text: str) -> tuple[str, ...]:
    """Names of this package's Pallas TPU kernels (`sparse_decode_*_tpu`) in compiled HLO."""
    return tuple(sorted(set(re.findall(r"sparse_decode_\w+_tpu", hlo_text))))


def abstract_decode_args(shape, dtype, mesh: Mesh):
    """values/indices [T, L, K] (tokens over `data`), decoder blocks [F, L - l, D] (latents
    over `model`), output cotangent [T, L, D] float32: `ShapeDtypeStruct`s on `mesh`."""
    n_tokens, n_layers, k, n_latents, d_model = shape
    tokens = NamedSharding(mesh, PartitionSpec("data"))
    latents = NamedSharding(mesh, PartitionSpec("model"))
    values = jax.ShapeDtypeStruct((n_tokens, n_layers, k), dtype, sharding=tokens)
    indices = jax.ShapeDtypeStruct((n_tokens, n_layers, k), jnp.int32, sharding=tokens)
    blocks = tuple(
        jax.ShapeDtypeStruct((n_latents, n_layers - layer, d_model), dtype, sharding=latents)
        for layer in range(n_layers)
    )
    cot = jax.ShapeDtypeStruct((n_tokens, n_layers, d_model), jnp.float32, sharding=tokens)
    return values, indices, blocks, cot


def compile_sparse_decode(shape, dtype, topology: str, mesh_shape=(1, 1), impl=None):
    """(compiled `value_and_grad` of the decode w.r.t. values and decoder, compile seconds,
    its abstract arguments) for `topology`'s first data x model chips; `impl` None picks it
    from the mesh (Pallas TPU, natively compiled), "xla" compiles the XLA formulation."""

    def _decode_loss(values, indices, blocks, cot):
        out = sparse_decode(values, indices, blocks, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * cot)

    data, model = mesh_shape
    devices = tpu_devices(topology)[: data * model]
    mesh = Mesh(np.array(devices).reshape(data, model), ("data", "model"))
    args = abstract_decode_args(shape, jnp.dtype(dtype), mesh)
    step = jax.jit(jax.value_and_grad(_decode_loss, argnums=(0, 2)))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(*args).compile()
    return compiled, time.perf_counter() - start, args


def bytes_per_chip(a: jax.ShapeDtypeStruct) -> int:
    """Bytes of one chip's shard of an abstract array."""
    return int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize


def decoder_bytes(shape, dtype) -> int:
    """Bytes of a whole CLT decoder of `shape` (every block [F, L - l, D])."""
    _, n_layers, _, n_latents, d_model = shape
    n_blocks = n_layers * (n_layers + 1) // 2
    return n_latents * n_blocks * d_model * jnp.dtype(dtype).itemsize
