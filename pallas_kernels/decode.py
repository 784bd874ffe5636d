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

d_table_l is a scatter-add of T·K rows of R, serial on XLA:CPU (it dominated fwd+bwd), so it
is turned into the forward's fast gather, megablox-style: the (token, slot) pairs are sorted
by latent and laid out as ELL rows of M slots (`ell_layout`): row f holds latent f's first M
(value, token) pairs, further pairs spill into at most T·K / M overflow rows (a static bound).
Gathering rows of g [T, R] with those weights (the forward's fused gather) gives d_table_l
directly; the used overflow rows are gathered and scatter-added into their latents block by
block (`xla_table_grad`). The row dots sum each slot's L - l gathered [T, D] products in one
loop fusion (`xla_row_dots`: XLA:CPU would not fuse the gather into a reduction over R). The
sort and ELL arrays are O(T·K + F·M) per layer: no dense [T, F] array is ever formed; indices
get no cotangent.

Implementations (`impl=`): "xla" (the reference and the CPU path: per source layer, fused
gather-multiply-adds over chunks of slots, so the [T, K, R] gathered rows never exist),
"pallas_tpu" (`tpu_kernel.py`) and "pallas_gpu" (`gpu_kernel.py`). `impl=None` takes the
`use_impl(...)` context, else the `GEMMASCOPE_SPARSE_IMPL` environment variable, else the
default backend's kernel (cpu -> xla, tpu -> pallas_tpu, gpu -> pallas_gpu). A Pallas
implementation forced on a backend that cannot run it natively runs in interpret mode
(TPU: the TPU-faithful `pltpu.InterpretParams()`; GPU: the generic `interpret=True`).
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
            from pallas_kernels.tpu_kernel import default_tiles

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


# ---- the XLA reference ------------------------------------------------------------------------


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


def _tpu_fallback(kernel: Kernel, n_active: int, n_cols: int, dtype, what: str) -> bool:
    """True (after a warning) when the Pallas TPU kernels of the forward or the backward
    cannot run this shape."""
    from pallas_kernels.tpu_kernel import tpu_backward_unsupported, tpu_unsupported

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
