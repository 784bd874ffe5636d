"""The causal sparse decode op of cross-layer transcoders, with a custom VJP.

Shapes (T tokens, L layers, K active latents per token and source layer, F latents per
layer, D = d_out):

    values   [..., L, K]  float
    indices  [..., L, K]  int, local to each source layer's F latents
    blocks   L arrays, blocks[l] [F, L - l, D]: source layer l -> output layers l..L-1
             (exactly `MultiLayerDictionary.w_dec`)
    out      [..., L, D]

    out[t, j] = Σ_{l <= j} Σ_k values[t, l, k] · blocks[l][indices[t, l, k], j - l]

A single-layer SAE / transcoder decode (`[..., K]` x `[F, D]` -> `[..., D]`) is the same op
with L = 1 (`sparse_decode_single`). Repeated indices within a row simply add up.

Each source layer is one "row gather" over its block seen as a table `[F, R]`, R = (L - l)·D
(a free reshape): `part[t] = Σ_k values[t, l, k] · table[indices[t, l, k]]`, and `out[:, l:]`
accumulates `part` (in float32). The FLOPs and gathered bytes are T·K·D·L(L+1)/2, never the
dense T·F·D·L(L+1)/2.

Backward (`jax.custom_vjp`, the same for every implementation, plain XLA):

    d_values[t, l, k] = ⟨g[t, l:], table_l[indices[t, l, k]]⟩        gather + row dot
    d_table_l[f]      = Σ_{(t, k): indices[t, l, k] = f} values[t, l, k] · g[t, l:]

On the XLA path d_table_l is not a scatter-add of T·K rows (serial on XLA:CPU): the pairs are
sorted by latent and laid out as ELL rows that the forward's fused gather reads
(`xla_decode.py`: `ell_layout`, `xla_table_grad`; `xla_row_dots` for d_values). No dense
[T, F] array is ever formed; indices get no cotangent.

Implementations (`impl=`): "xla" (`xla_decode.py`, the reference and the CPU path: per source
layer, fused gather-multiply-adds over chunks of slots, so the [T, K, R] gathered rows never
exist), "pallas_tpu" (`tpu_kernel.py`, tiles in `tpu_tiles.py`) and "pallas_gpu"
(`gpu_kernel.py`). `impl=None` takes the `use_impl(...)` context, else the
`GEMMASCOPE_SPARSE_IMPL` environment variable, else the default backend's kernel (cpu -> xla,
tpu -> pallas_tpu, gpu -> pallas_gpu). A Pallas implementation forced on a backend that
cannot run it natively runs in interpret mode (TPU: the TPU-faithful
`pltpu.InterpretParams()`; GPU: the generic `interpret=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.tpu_tiles import default_tiles, tpu_backward_unsupported, tpu_unsupported
from pallas_kernels.xla_decode import (
    OVERFLOW_BLOCK,
    ell_layout,
    ell_width,
    xla_gather_rows,
    xla_row_dots,
    xla_table_grad,
)

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
IMPL_ENV = "GEMMASCOPE_SPARSE_IMPL"
DATA_AXIS, MODEL_AXIS = "data", "model"  # gemmascope_jax.sharding.MESH_AXES
_DEFAULT_FOR_BACKEND = {"cpu": "xla", "tpu": "pallas_tpu", "gpu": "pallas_gpu"}
_forced: list[str] = []


@contextlib.contextmanager
def use_impl(impl: str):
    """`with use_impl("xla"): ...` makes `impl=None` calls inside use `impl`."""
    _check_impl(impl)
    _forced.append(impl)
    try:
        yield
    finally:
        _forced.pop()


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown sparse decode impl {impl!r}; expected one of {IMPLS}")
    return impl


def resolve_impl(impl: str | None = None, platform: str | None = None) -> str:
    """The implementation an `impl=None` call would use (see the module docstring) when
    compiling for `platform` (default: the default backend)."""
    if impl is not None:
        return _check_impl(impl)
    if _forced:
        return _forced[-1]
    if env := os.environ.get(IMPL_ENV):
        return _check_impl(env.strip())
    return _DEFAULT_FOR_BACKEND.get(platform or jax.default_backend(), "xla")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What one decode compiles to (static): the implementation, whether a Pallas kernel runs
    in interpret mode (its platform is not the target), and the TPU tiles."""

    impl: str = "xla"
    interpret: bool = True
    tiles: Any = None

    @classmethod
    def for_target(cls, impl: str | None, mesh=None) -> Kernel:
        """The kernel for the device the program is compiled for: the mesh's device (a mesh of
        abstract TPU devices from `jax.experimental.topologies` means XLA:TPU and Mosaic even
        on a CPU host), else the default backend."""
        if isinstance(mesh, jax.sharding.Mesh):
            mesh = mesh.abstract_mesh
        device = getattr(mesh, "abstract_device", None) if mesh is not None else None
        platform = device.platform if device is not None else jax.default_backend()
        impl = resolve_impl(impl, platform)
        native = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}.get(impl) == platform
        tiles = None
        if impl == "pallas_tpu":
            kind = device.device_kind if device is not None and platform == "tpu" else None
            tiles = default_tiles(kind)
        return cls(impl, not native, tiles)


# ---- validation -------------------------------------------------------------------------------


def check_inputs(values, indices, blocks) -> tuple[int, int, int]:
    """Raise a ValueError for inconsistent shapes; returns (L, F, D). Index ranges are
    checked when the indices are concrete (outside jit)."""
    if not isinstance(blocks, (tuple, list)) or not blocks:
        raise ValueError("w_dec_blocks must be a non-empty tuple of [F, L - l, D] arrays")
    if values.shape != indices.shape:
        raise ValueError(f"values {values.shape} and indices {indices.shape} differ in shape")
    if values.ndim < 2:
        raise ValueError(f"expected values/indices [..., L, K], got {values.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    n_layers = values.shape[-2]
    if len(blocks) != n_layers:
        raise ValueError(f"got {len(blocks)} decoder blocks for {n_layers} source layers")
    width, d_out = blocks[0].shape[0], blocks[0].shape[-1]
    for layer, block in enumerate(blocks):
        want = (width, n_layers - layer, d_out)
        if tuple(block.shape) != want:
            raise ValueError(f"decoder block {layer} has shape {block.shape}, expected {want}")
    if not isinstance(indices, jax.core.Tracer):
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= width):
            raise ValueError(
                f"indices must lie in [0, {width}), got range [{idx.min()}, {idx.max()}]"
            )
    return n_layers, width, d_out


# ---- dispatch, forward and custom VJP ------------------------------------------------------------


def _tpu_fallback(kernel: Kernel, n_active: int, n_cols: int, dtype, what: str) -> bool:
    """True (after a warning) when the Pallas TPU kernels of the forward or the backward
    cannot run this shape."""
    check = tpu_backward_unsupported if what == "backward" else tpu_unsupported
    why = check(n_active, n_cols, dtype, kernel.tiles)
    if why:
        warnings.warn(
            f"sparse decode {what}: Pallas TPU kernel skipped, XLA used: {why}", stacklevel=3
        )
    return bool(why)


def _gather_rows(kernel: Kernel, values, indices, table):
    """One source layer's forward ([T, K] x [F, R] -> [T, R] float32)."""
    if kernel.impl == "pallas_tpu":
        from pallas_kernels.tpu_kernel import tpu_gather_rows

        if not _tpu_fallback(kernel, values.shape[1], table.shape[1], table.dtype, "forward"):
            return tpu_gather_rows(
                values, indices, table, tiles=kernel.tiles, interpret=kernel.interpret
            )
        return xla_gather_rows(values, indices, table)
    if kernel.impl == "pallas_gpu":
        from pallas_kernels.gpu_kernel import gpu_gather_rows

        return gpu_gather_rows(values, indices, table, interpret=kernel.interpret)
    return xla_gather_rows(values, indices, table)


def _forward(values, indices, blocks, kernel: Kernel):
    """values/indices [T, L, K] -> out [T, L, D] float32."""
    n_tokens, n_layers, _ = values.shape
    d_out = blocks[0].shape[-1]
    values, indices = jax.lax.optimization_barrier((values, indices))  # as in _backward
    out = jnp.zeros((n_tokens, n_layers, d_out), jnp.float32)
    for layer, block in enumerate(blocks):
        table = block.reshape(block.shape[0], -1)
        part = _gather_rows(kernel, values[:, layer], indices[:, layer], table)
        out = out.at[:, layer:].add(part.reshape(n_tokens, n_layers - layer, d_out))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _decode(values, indices, blocks, kernel, out_dtype):
    return _forward(values, indices, blocks, kernel).astype(out_dtype)


def _decode_fwd(values, indices, blocks, kernel, out_dtype):
    return _decode(values, indices, blocks, kernel, out_dtype), (values, indices, blocks)


def _ell(values, indices, n_latents):
    """`ell_layout` of every source layer (one batched sort) and its overflow block size."""
    n_pairs = values.shape[0] * values.shape[2]  # per layer
    width = ell_width(n_pairs, n_latents)
    over_block = min(OVERFLOW_BLOCK, max(n_pairs // width, 1))
    layout = functools.partial(ell_layout, n_latents=n_latents, width=width, block=over_block)
    return jax.vmap(layout, in_axes=1)(values, indices), over_block


@functools.partial(jax.jit, static_argnums=(4,))
def _backward(values, indices, blocks, g, kernel=Kernel()):
    n_tokens, n_layers, _ = values.shape
    n_latents = blocks[0].shape[0]
    # The barrier keeps XLA from fusing the producers of g / values (the rest of the
    # model's backward) into the gather loops, where they would be recomputed per element
    # (measured 3x slower CLT train steps on CPU without it).
    values, indices, g = jax.lax.optimization_barrier((values, indices, g.astype(jnp.float32)))
    ell = None
    d_values, d_blocks = [], []
    g_rows = g.reshape(n_tokens, -1)  # [T, L·D]; layer l's R = (L - l)·D are the last
    for layer, block in enumerate(blocks):
        n_cols = (n_layers - layer) * block.shape[-1]
        tpu = kernel.impl == "pallas_tpu" and not _tpu_fallback(
            kernel, values.shape[2], n_cols, block.dtype, "backward"
        )
        if tpu:
            dv, d_table = _tpu_layer_grads(
                kernel, values[:, layer], indices[:, layer], block, g_rows
            )
        else:
            if ell is None:
                ell, over_block = _ell(values, indices, n_latents)
            dv = xla_row_dots(indices[:, layer], block, g)
            d_table = xla_table_grad(*(a[layer] for a in ell), g_rows, n_cols, over_block)
        d_values.append(dv)
        d_blocks.append(d_table.reshape(block.shape).astype(block.dtype))
    d_values = jnp.stack(d_values, axis=1).astype(values.dtype)
    return d_values, tuple(d_blocks)


def _tpu_layer_grads(kernel: Kernel, values, indices, block, g_rows):
    """One source layer's (d_values [T, K], d_table [F, R]) with the Pallas TPU kernels:
    gathered row dots against g's window of the layer's output layers, and the decoder
    gradient summed per latent over the latent-sorted pairs (`tpu_latent_rows`: each output
    row written once, no scatter; XLA:TPU's scatter-add of the overflow rows needed 19-27
    MiB of a 16 MiB scoped-VMEM limit at the 270M CLT shape)."""
    from pallas_kernels.tpu_kernel import tpu_latent_rows, tpu_row_dots

    n_latents, n_out, d_out = block.shape
    offset = g_rows.shape[1] - n_out * d_out
    table = block.reshape(n_latents, -1)
    opts = dict(tiles=kernel.tiles, interpret=kernel.interpret)
    d_values = tpu_row_dots(indices, table, g_rows, g_offset=offset, **opts)
    d_table = tpu_latent_rows(
        values, indices, g_rows, n_latents=n_latents, col_offset=offset, **opts
    )
    return d_values, d_table


def _decode_bwd(kernel, out_dtype, residuals, g):
    d_values, d_blocks = _backward(*residuals, g, kernel)
    return d_values, None, d_blocks


_decode.defvjp(_decode_fwd, _decode_bwd)
_jitted_decode = jax.jit(_decode, static_argnums=(3, 4))


# ---- latent-sharded decoders ------------------------------------------------------------------


def _model_axis(mesh, n_latents: int) -> int:
    """Size of the mesh's `model` axis when the decoder's latents can be split over it."""
    if mesh is None or mesh.empty or MODEL_AXIS not in mesh.axis_names:
        return 1
    size = mesh.shape[MODEL_AXIS]
    return size if size > 1 and n_latents % size == 0 else 1


def _sharded_decode(values, indices, blocks, kernel, out_dtype, mesh, slot_groups: int = 1):
    """`_decode` per latent shard: `shard_map` over `model` (and `data` on the token axis when
    it divides), each device gathering only its own decoder rows, then a float32 `psum` over
    `model`, so no device ever holds the whole decoder; the custom VJP runs per shard too.

    Slots grouped by latent range (`slot_groups` a multiple of the `model` size, as
    `sparsify(groups=)` makes them): each device receives only its own shard's K/model slots
    (the slot axis split over `model`). Otherwise every device sees all K slots, pairs whose
    latent lives on another shard get value 0 (index clipped to 0), and shard_map's transpose
    sums the values gradient over `model`."""
    data = DATA_AXIS if DATA_AXIS in mesh.axis_names else None
    if data is not None and values.shape[0] % mesh.shape[data]:
        data = None
    own_slots = slot_groups % mesh.shape[MODEL_AXIS] == 0
    slot_spec = jax.sharding.PartitionSpec(data, None, MODEL_AXIS if own_slots else None)
    block_spec = jax.sharding.PartitionSpec(MODEL_AXIS, None, None)

    def per_shard(values, indices, blocks):
        if data is not None:  # each data shard's decoder gradient is summed over `data`
            blocks = jax.lax.pcast(blocks, data, to="varying")
        local_width = blocks[0].shape[0]
        local = indices - jax.lax.axis_index(MODEL_AXIS) * local_width
        if not own_slots:
            mine = (local >= 0) & (local < local_width)
            values = jnp.where(mine, values, jnp.zeros_like(values))
            local = jnp.where(mine, local, 0)
        part = _decode(values, local, blocks, kernel, jnp.float32)
        return jax.lax.psum(part, MODEL_AXIS)

    out = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(slot_spec, slot_spec, tuple(block_spec for _ in blocks)),
        out_specs=jax.sharding.PartitionSpec(data, None, None),
    )(values, indices, tuple(blocks))
    return out.astype(out_dtype)


# ---- public API -------------------------------------------------------------------------------


def sparse_decode(
    values: jax.Array,
    indices: jax.Array,
    w_dec_blocks,
    *,
    impl: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    slot_groups: int = 1,
) -> jax.Array:
    """Causal sparse decode: values/indices [..., L, K], blocks[l] [F, L - l, D] -> [..., L, D].

    Output dtype: the result type of values and blocks (accumulated in float32). No bias or
    skip term. Differentiable in values and blocks (see the module docstring).

    mesh: default the context mesh (`jax.set_mesh` outside jit, `use_abstract_mesh` inside,
    which `TrainStep` sets while tracing). Its device picks the kernel (`Kernel.for_target`:
    a mesh of TPU devices compiles the Mosaic kernels natively, also when AOT-compiling on a
    CPU host); when it has a `model` axis of size > 1 that divides F, the decoder is taken as
    sharded over latents on `model` and the op runs per shard (`_sharded_decode`).
    slot_groups: the K slots come in this many latent-range groups (`sparsify(groups=)`):
    slots [g·K/G, (g+1)·K/G) hold latents of range g only. The result does not depend on it;
    with G a multiple of the `model` size each device decodes only its own K/model slots.
    """
    blocks = tuple(jnp.asarray(b) for b in w_dec_blocks)
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    n_layers, width, d_out = check_inputs(values, indices, blocks)
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    kernel = Kernel.for_target(impl, mesh)
    dtype = jnp.result_type(values.dtype, *(b.dtype for b in blocks))
    lead = values.shape[:-2]
    flat_v = values.reshape(-1, *values.shape[-2:]).astype(dtype)
    flat_i = indices.reshape(-1, *indices.shape[-2:]).astype(jnp.int32)
    blocks = tuple(b.astype(dtype) for b in blocks)
    if _model_axis(mesh, width) > 1:
        out = _sharded_decode(flat_v, flat_i, blocks, kernel, dtype, mesh, slot_groups)
    else:
        out = _jitted_decode(flat_v, flat_i, blocks, kernel, dtype)
    return out.reshape(*lead, n_layers, d_out)


def sparse_decode_single(
    values: jax.Array,
    indices: jax.Array,
    w_dec: jax.Array,
    *,
    impl: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    slot_groups: int = 1,
) -> jax.Array:
    """Single-layer decode: values/indices [..., K], w_dec [F, D] -> [..., D] (L = 1)."""
    w_dec = jnp.asarray(w_dec)
    if w_dec.ndim != 2:
        raise ValueError(f"expected w_dec [F, D], got {w_dec.shape}")
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    if values.ndim < 1 or values.shape != indices.shape:
        raise ValueError(
            f"expected values/indices [..., K] alike, got {values.shape}, {indices.shape}"
        )
    out = sparse_decode(
        values[..., None, :],
        indices[..., None, :],
        (w_dec[:, None, :],),
        impl=impl,
        mesh=mesh,
        slot_groups=slot_groups,
    )
    return out[..., 0, :]
