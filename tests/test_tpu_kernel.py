"""Pallas TPU kernels in the TPU-faithful interpreter (`pltpu.InterpretParams`): column
windows, lane-aligned tiles, SMEM-bounded token chunks, the row-dot kernel, the TPU backward
with overflow rows, tile defaults per generation and the XLA fallback; and the
latent-sharded decode on 8 simulated devices (in a subprocess) against one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_decode
from pallas_kernels.tpu_kernel import tpu_gather_rows, tpu_latent_rows, tpu_row_dots
from pallas_kernels.tpu_tiles import (
    SCOPED_VMEM,
    TpuTiles,
    column_tile,
    default_tiles,
    generation,
    tpu_unsupported,
)


def _rows_reference(values, indices, table, offset, n_cols):
    rows = np.asarray(table, np.float64)[indices][..., offset : offset + n_cols]
    return np.einsum("tk,tkr->tr", np.asarray(values, np.float64), rows)


def test_generations_and_tiles():
    assert generation("TPU v5 lite") == "v5e" and generation("TPU v5p") == "v5p"
    assert generation("TPU v6 lite") == "v6e" and generation("TPU v4") == "v4"
    v5e, v6e = default_tiles("TPU v5 lite"), default_tiles("TPU v6 lite")
    assert v5e.vmem_budget == SCOPED_VMEM["v5e"] // 4 and v6e.vmem_budget == 2 * v5e.vmem_budget
    # 270M CLT layer 0: R = 18·640 = 11520 columns, K = 64, bf16: [8, 64, tile] within 4 MiB
    tile = column_tile(11520, 64, 2, v5e)
    assert tile % 128 == 0 and 11520 % tile == 0 and 8 * 64 * tile * 2 <= v5e.vmem_budget
    assert column_tile(11520, 64, 2, v6e) > tile
    assert column_tile(6, 3, 4, v5e) == 6  # narrower than a lane tile: whole width
    assert "no column tile" in tpu_unsupported(3, 130, jnp.float32, v5e)
    with pytest.raises(ValueError, match="token_tile"):
        TpuTiles(token_tile=12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_rows_column_window_and_token_chunks(dtype):
    """A window of 256 of 512 columns at offset 128 (two 128-lane tiles under a small VMEM
    budget), 21 tokens split into SMEM-sized calls of 8 tokens (ragged last call)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((21, 3))
    indices = rng.integers(0, 16, (21, 3)).astype(np.int32)
    table = rng.standard_normal((16, 512))
    tiles = TpuTiles(vmem_budget=8 * 3 * 128 * 4, max_prefetch=24)
    cast = lambda a: jnp.asarray(a, dtype)
    got = tpu_gather_rows(
        cast(values), jnp.asarray(indices), cast(table), col_offset=128, n_cols=256, tiles=tiles
    )
    rounded = lambda a: np.asarray(cast(a), np.float64)
    want = _rows_reference(rounded(values), indices, rounded(table), 128, 256)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("offset", [0, 256, 128])
def test_row_dots_read_g_in_place_or_sliced(offset):
    """offset 256 with R = 256: g's window is read in place by 128- or 256-wide tiles; offset
    128 with R = 256 under a 128-column budget: still aligned; every case equals numpy."""
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 10, (13, 4)).astype(np.int32)
    table = rng.standard_normal((10, 256))
    g = rng.standard_normal((13, 512))
    tiles = TpuTiles(vmem_budget=8 * 4 * 128 * 4 if offset == 128 else 1 << 20, max_prefetch=32)
    got = tpu_row_dots(
        jnp.asarray(indices),
        jnp.asarray(table, jnp.float32),
        jnp.asarray(g, jnp.float32),
        g_offset=offset,
        tiles=tiles,
    )
    want = np.einsum("tkr,tr->tk", table[indices], g[:, offset : offset + 256])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _problem(n_tokens, n_layers, k, width, d_out, hot: bool, seed=3):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_tokens, n_layers, k))
    indices = rng.integers(0, width, (n_tokens, n_layers, k))
    if hot:  # ~90% of pairs on latent 3: many overflow ELL rows
        indices = np.where(rng.random(indices.shape) < 0.9, 3, indices)
    blocks = [rng.standard_normal((width, n_layers - layer, d_out)) for layer in range(n_layers)]
    cot = rng.standard_normal((n_tokens, n_layers, d_out))
    return values, indices.astype(np.int32), blocks, cot


def _grads(values, indices, blocks, cot, impl, dtype=jnp.float32, mesh=None):
    def loss(v, b):
        out = sparse_decode(v, jnp.asarray(indices), b, impl=impl, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32) * cot)

    v = jnp.asarray(values, dtype)
    b = tuple(jnp.asarray(x, dtype) for x in blocks)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(v, b)


@pytest.mark.parametrize("max_prefetch", [1 << 15, 24])
def test_latent_rows_sum_each_latents_rows(max_prefetch):
    """The decoder gradient per latent: 13 latents (not a whole latent tile), one latent in
    every token's first slot (a run longer than a batch of rows), a 256-column window at
    offset 128, token chunks of 8 accumulated in place when SMEM allows 24 pairs per call."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((21, 3)).astype(np.float32)
    indices = rng.integers(0, 13, (21, 3)).astype(np.int32)
    indices[:, 0] = 2
    g = rng.standard_normal((21, 512)).astype(np.float32)
    tiles = TpuTiles(vmem_budget=1 << 20, max_prefetch=max_prefetch)
    got = tpu_latent_rows(
        jnp.asarray(values), jnp.asarray(indices), jnp.asarray(g), n_latents=13,
        col_offset=128, n_cols=256, tiles=tiles,
    )  # fmt: skip
    want = np.zeros((13, 256))
    np.add.at(want, indices.ravel(), (values[..., None] * g[:, None, 128:384]).reshape(-1, 256))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hot", [False, True])
def test_tpu_backward_matches_xla(hot):
    """3 source layers, D = 128 (lane-aligned column windows of g at offsets 0/128/256), with
    and without a hot latent (the XLA path's overflow rows): the Pallas TPU backward equals
    the XLA one."""
    problem = _problem(24, 3, 5, 12, 128, hot)
    want = _grads(*problem, "xla")
    got = _grads(*problem, "pallas_tpu")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_unsupported_shape_falls_back_to_xla_with_a_warning():
    """D = 130: not a multiple of 128 lanes and wider than one tile."""
    problem = _problem(8, 2, 3, 6, 130, False)
    want = _grads(*problem, "xla")
    with pytest.warns(UserWarning, match="Pallas TPU kernel skipped, XLA used"):
        got = _grads(*problem, "pallas_tpu")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


SHARDED = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from gemmascope_jax.sharding import make_mesh
    from pallas_kernels import sparse_decode
    from jax.sharding import NamedSharding, PartitionSpec as P

    impl, K, G = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh = make_mesh(data=2, model=4)
    rng = np.random.default_rng(0)
    T, L, F, D = 16, 3, 32, 8
    v = jnp.asarray(rng.standard_normal((T, L, K)), jnp.float32)
    # G slot groups: slots [g K/G, (g+1) K/G) hold latents of range [g F/G, (g+1) F/G)
    i = rng.integers(0, F // G, (T, L, K)) + np.repeat(np.arange(G) * (F // G), K // G)
    i = jnp.asarray(i, jnp.int32)
    b = tuple(jnp.asarray(rng.standard_normal((F, L - l, D)), jnp.float32) for l in range(L))
    g = jnp.asarray(rng.standard_normal((T, L, D)), jnp.float32)
    decode = lambda v, b, mesh: sparse_decode(v, i, b, impl=impl, mesh=mesh, slot_groups=G)
    loss = lambda v, b, mesh=None: jnp.sum(decode(v, b, mesh) * g)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(v, b)
    bs = tuple(jax.device_put(x, NamedSharding(mesh, P("model"))) for x in b)
    vs = jax.device_put(v, NamedSharding(mesh, P("data")))

    def sharded(v, b):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss, argnums=(0, 1))(v, b)

    text = str(jax.make_jaxpr(sharded)(vs, bs))
    assert "shard_map" in text and "psum" in text, "decode did not run per latent shard"
    # grouped slots: each device receives only its own shard's K/model slots
    assert (f"f32[8,3,{K // 4}]" in text) == (G % 4 == 0), "slot axis split iff G % model == 0"
    got = jax.jit(sharded)(vs, bs)
    for a, c in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
    assert got[1][1][0].sharding.spec == P("model"), got[1][1][0].sharding
    print("ok")
    """
)


@pytest.mark.parametrize(
    "impl, k, groups",
    [("xla", 4, 1), ("xla", 12, 1), ("xla", 16, 2), ("xla", 16, 8), ("pallas_tpu", 8, 4)],
)
def test_latent_sharded_decode_equals_one_device(impl, k, groups):
    """On a data=2 x model=4 mesh of simulated devices the decode runs in `shard_map` over the
    latent shards (psum over `model`), and its value and gradients equal the unsharded op;
    the decoder gradient keeps the latent sharding. K = 12 takes the XLA path's scan over
    slot chunks (its carry must be varying over the mesh axes); the Pallas TPU kernels run
    interpreted, so K = 4 keeps them fast. Slots in latent-range groups (`slot_groups`, G a
    multiple of model = 4) reach each device as its own K/4 slots only; G = 2 takes the
    masked path."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, impl, str(k), str(groups)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
