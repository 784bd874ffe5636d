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
                                                                    scatter-add of rows

so no dense [T, F] array is ever formed; indices get no cotangent.

Implementations (`impl=`): "xla" (the reference and the CPU path: per source layer, fused
gather-multiply-adds over chunks of slots, so the [T, K, R] gathered rows never exist;
the backward's scatter-add is serial on XLA:CPU and dominates fwd+bwd there),
"pallas_tpu" (`tpu_kernel.py`) and "pallas_gpu" (`gpu_kernel.py`). `impl=None` takes the
`use_impl(...)` context, else the `GEMMASCOPE_SPARSE_IMPL` environment variable, else the
default backend's kernel (cpu -> xla, tpu -> pallas_tpu, gpu -> pallas_gpu). A Pallas
implementation forced on a backend that cannot run it natively runs in interpret mode
(TPU: the TPU-faithful `pltpu.InterpretParams()`; GPU: the generic `interpret=True`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
IMPL_ENV = "GEMMASCOPE_SPARSE_IMPL"
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


def resolve_impl(impl: str | None = None) -> str:
    """The implementation an `impl=None` call would use (see the module docstring)."""
    if impl is not None:
        return _check_impl(impl)
    if _forced:
        return _forced[-1]
    if env := os.environ.get(IMPL_ENV):
        return _check_impl(env.strip())
    return _DEFAULT_FOR_BACKEND.get(jax.default_backend(), "xla")


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
# (L = 6, K = 32, d = 640): 8 is the fastest forward, 4 the fastest backward, and small
# chunks keep compile times of deep CLTs down (L = 26: 16 -> 4 halves the compile time).
FORWARD_CHUNK = 8
BACKWARD_CHUNK = 4


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
    init = jnp.zeros((values.shape[0], table.shape[1]), jnp.float32)
    body = lambda acc, chunk: (acc + _fused_rows(*chunk, table), None)
    return jax.lax.scan(body, init, _chunked(values, indices, FORWARD_CHUNK))[0]


def _fused_row_dots(indices, table, g):
    return jnp.stack(
        [
            jnp.sum(jnp.take(table, indices[:, k], axis=0, mode="clip") * g, axis=-1)
            for k in range(indices.shape[1])
        ],
        axis=-1,
    )


def xla_row_dots(indices: jax.Array, table: jax.Array, g: jax.Array) -> jax.Array:
    """`d_values[t, k] = ⟨g[t], table[indices[t, k]]⟩`: [T, K], [F, R], [T, R] f32 -> [T, K]."""
    n_active = indices.shape[1]
    if n_active <= BACKWARD_CHUNK:
        return _fused_row_dots(indices, table, g)
    _, chunks = _chunked(jnp.zeros(indices.shape, jnp.float32), indices, BACKWARD_CHUNK)
    out = jax.lax.map(lambda idx: _fused_row_dots(idx, table, g), chunks)  # [C, T, chunk]
    return out.transpose(1, 0, 2).reshape(indices.shape[0], -1)[:, :n_active]


def _fused_scatter(acc, values, indices, g):
    for k in range(values.shape[1]):
        acc = acc.at[indices[:, k]].add(values[:, k, None] * g, mode="drop")
    return acc


def xla_scatter_rows(values, indices, g, n_rows: int) -> jax.Array:
    """`d_table[f] = Σ_{(t, k): indices[t, k] = f} values[t, k] · g[t]` -> [F, R] float32."""
    init = jnp.zeros((n_rows, g.shape[1]), jnp.float32)
    values = values.astype(jnp.float32)
    if values.shape[1] <= BACKWARD_CHUNK:
        return _fused_scatter(init, values, indices, g)
    body = lambda acc, chunk: (_fused_scatter(acc, *chunk, g), None)
    return jax.lax.scan(body, init, _chunked(values, indices, BACKWARD_CHUNK))[0]


def _layer_forward(impl: str):
    if impl == "xla":
        return xla_gather_rows
    if impl == "pallas_tpu":
        from pallas_kernels.tpu_kernel import tpu_gather_rows

        return tpu_gather_rows
    from pallas_kernels.gpu_kernel import gpu_gather_rows

    return gpu_gather_rows


def _forward(values, indices, blocks, impl):
    """values/indices [T, L, K] -> out [T, L, D] float32."""
    n_tokens, n_layers, _ = values.shape
    d_out = blocks[0].shape[-1]
    gather_rows = _layer_forward(impl)
    values, indices = jax.lax.optimization_barrier((values, indices))  # as in _backward
    out = jnp.zeros((n_tokens, n_layers, d_out), jnp.float32)
    for layer, block in enumerate(blocks):
        table = block.reshape(block.shape[0], -1)
        part = gather_rows(values[:, layer], indices[:, layer], table)
        out = out.at[:, layer:].add(part.reshape(n_tokens, n_layers - layer, d_out))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _decode(values, indices, blocks, impl):
    return _forward(values, indices, blocks, impl).astype(values.dtype)


def _decode_fwd(values, indices, blocks, impl):
    return _decode(values, indices, blocks, impl), (values, indices, blocks)


@jax.jit
def _backward(values, indices, blocks, g):
    n_tokens = values.shape[0]
    # The barrier keeps XLA from fusing the producers of g / values (the rest of the
    # model's backward) into the serial scatter loops, where they would be recomputed
    # per element (measured 3x slower CLT train steps on CPU without it).
    values, indices, g = jax.lax.optimization_barrier((values, indices, g.astype(jnp.float32)))
    d_values, d_blocks = [], []
    for layer, block in enumerate(blocks):
        table = block.reshape(block.shape[0], -1)
        g_layer = g[:, layer:].reshape(n_tokens, -1)  # [T, R]
        idx = indices[:, layer]
        d_values.append(xla_row_dots(idx, table, g_layer))
        d_table = xla_scatter_rows(values[:, layer], idx, g_layer, table.shape[0])
        d_blocks.append(d_table.reshape(block.shape).astype(block.dtype))
    d_values = jnp.stack(d_values, axis=1).astype(values.dtype)
    return d_values, tuple(d_blocks)


def _decode_bwd(impl, residuals, g):
    d_values, d_blocks = _backward(*residuals, g)
    return d_values, None, d_blocks


_decode.defvjp(_decode_fwd, _decode_bwd)
_jitted_decode = jax.jit(_decode, static_argnums=(3,))


# ---- public API -------------------------------------------------------------------------------


def sparse_decode(
    values: jax.Array, indices: jax.Array, w_dec_blocks, *, impl: str | None = None
) -> jax.Array:
    """Causal sparse decode: values/indices [..., L, K], blocks[l] [F, L - l, D] -> [..., L, D].

    Output dtype: the result type of values and blocks (accumulated in float32). No bias or
    skip term. Differentiable in values and blocks (see the module docstring).
    """
    blocks = tuple(jnp.asarray(b) for b in w_dec_blocks)
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    n_layers, _, d_out = check_inputs(values, indices, blocks)
    impl = resolve_impl(impl)
    dtype = jnp.result_type(values.dtype, *(b.dtype for b in blocks))
    lead = values.shape[:-2]
    flat_v = values.reshape(-1, *values.shape[-2:]).astype(dtype)
    flat_i = indices.reshape(-1, *indices.shape[-2:]).astype(jnp.int32)
    blocks = tuple(b.astype(dtype) for b in blocks)
    out = _jitted_decode(flat_v, flat_i, blocks, impl)
    return out.reshape(*lead, n_layers, d_out)


def sparse_decode_single(
    values: jax.Array, indices: jax.Array, w_dec: jax.Array, *, impl: str | None = None
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
        values[..., None, :], indices[..., None, :], (w_dec[:, None, :],), impl=impl
    )
    return out[..., 0, :]
