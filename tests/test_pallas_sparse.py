"""Sparse causal decode (`pallas_kernels`): XLA reference, Pallas TPU / GPU kernels in
interpret mode, the custom VJP, sparse encoders and the sparse training path, against float64
numpy references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries import activations as act_lib
from gemmascope_jax.dictionaries.sparse import fire_counts, sparsify, topk_codes
from gemmascope_jax.training.losses import LossConfig, dictionary_loss
from pallas_kernels import IMPL_ENV, resolve_impl, sparse_decode, sparse_decode_single, use_impl
from pallas_kernels.gpu_kernel import gpu_gather_rows
from pallas_kernels.tpu_kernel import tpu_gather_rows
from pallas_kernels.xla_decode import ell_layout, sort_by_latent, xla_table_grad

F, D = 7, 6
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _problem(n_layers, k, n_tokens=6, seed=0):
    """Random values, indices (token 0 repeats one latent), blocks and a cotangent."""
    rng = np.random.default_rng(seed + 10 * n_layers + k)
    values = rng.standard_normal((n_tokens, n_layers, k))
    indices = rng.integers(0, F, (n_tokens, n_layers, k)).astype(np.int32)
    indices[0, :, : min(k, 3)] = 2
    blocks = [rng.standard_normal((F, n_layers - layer, D)) for layer in range(n_layers)]
    cot = rng.standard_normal((n_tokens, n_layers, D))
    return values, indices, blocks, cot


def _reference(values, indices, blocks, cot):
    """float64 out [T, L, D] and the gradients of Σ out·cot w.r.t. values and blocks."""
    n_layers = len(blocks)
    out = np.zeros(cot.shape)
    d_values = np.zeros(values.shape)
    d_blocks = [np.zeros(b.shape) for b in blocks]
    for layer, block in enumerate(blocks):
        rows = block[indices[:, layer]]  # [T, K, L - l, D]
        out[:, layer:] += np.einsum("tk,tkjd->tjd", values[:, layer], rows)
        d_values[:, layer] = np.einsum("tjd,tkjd->tk", cot[:, layer:], rows)
        upd = np.einsum("tk,tjd->tkjd", values[:, layer], cot[:, layer:])
        np.add.at(d_blocks[layer], indices[:, layer].reshape(-1), upd.reshape(-1, *block.shape[1:]))
    assert n_layers == out.shape[1]
    return out, d_values, d_blocks


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)


def _run(values, indices, blocks, cot, impl, dtype):
    values = jnp.asarray(values, dtype)
    blocks = tuple(jnp.asarray(b, dtype) for b in blocks)
    idx = jnp.asarray(indices)

    def loss(v, b):
        out = sparse_decode(v, idx, b, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        values, blocks
    )
    return out, grads


def _check(impl, n_layers, k, dtype, n_tokens=6, grads=True):
    values, indices, blocks, cot = _problem(n_layers, k, n_tokens)
    cast = lambda a: np.asarray(
        jnp.asarray(a, dtype), np.float64
    )  # reference on the rounded inputs
    want, want_dv, want_db = _reference(cast(values), indices, [cast(b) for b in blocks], cot)
    tol = TOL[dtype]
    if not grads:
        blocks = tuple(jnp.asarray(b, dtype) for b in blocks)
        out = sparse_decode(jnp.asarray(values, dtype), indices, blocks, impl=impl)
        assert out.dtype == dtype and _rel(out, want) <= tol
        return
    out, (d_values, d_blocks) = _run(values, indices, blocks, cot, impl, dtype)
    assert out.dtype == dtype and out.shape == want.shape
    assert _rel(out, want) <= tol
    assert _rel(d_values, want_dv) <= tol
    for got, ref in zip(d_blocks, want_db, strict=True):
        assert got.dtype == dtype and _rel(got, ref) <= tol


@pytest.mark.parametrize(
    "n_layers,k,dtype,grads",
    [
        (1, 5, jnp.float32, True),
        (2, 11, jnp.float32, True),
        (2, 19, jnp.float32, True),  # K > FORWARD_CHUNK: the chunked scan path
        (5, 3, jnp.bfloat16, True),
        (18, 3, jnp.float32, False),  # deep CLTs: forward only (compile time)
        (26, 2, jnp.bfloat16, False),
    ],
)
def test_xla_matches_float64_reference(n_layers, k, dtype, grads):
    _check("xla", n_layers, k, dtype, grads=grads)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("n_layers,k,dtype", [(1, 5, jnp.float32), (2, 3, jnp.bfloat16)])
def test_pallas_kernels_interpret_match_reference(impl, n_layers, k, dtype):
    """Forced Pallas impls run in interpret mode on CPU (TPU: `pltpu.InterpretParams`,
    which rejects what Mosaic rejects and NaN-fills uninitialised memory)."""
    _check(impl, n_layers, k, dtype, n_tokens=9)


@pytest.mark.parametrize("kernel", [tpu_gather_rows, gpu_gather_rows])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_write_every_row_over_poisoned_output(kernel, dtype):
    """Output buffer pre-filled with NaN (aliased to the output): every row is written,
    across token padding, a K that is not a power of two or a multiple of 8, and R that
    does not fill the GPU kernel's column tiles."""
    rng = np.random.default_rng(3)
    n_tokens, k, n_rows, n_cols = 19, 5, 9, 40
    values = rng.standard_normal((n_tokens, k))
    indices = rng.integers(0, n_rows, (n_tokens, k)).astype(np.int32)
    indices[1] = 4  # one latent repeated in every slot
    table = rng.standard_normal((n_rows, n_cols))
    cast = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)
    want = np.einsum("tk,tkr->tr", cast(values), cast(table)[indices])
    got = kernel(
        jnp.asarray(values, dtype), jnp.asarray(indices), jnp.asarray(table, dtype), poison=True
    )
    assert got.shape == want.shape and not np.isnan(np.asarray(got)).any()
    assert _rel(got, want) <= TOL[dtype]


def test_check_grads_and_single_layer():
    values, indices, blocks, _ = _problem(3, 4)
    idx = jnp.asarray(indices)
    fn = lambda v, b: sparse_decode(v, idx, b, impl="xla")
    args = (jnp.asarray(values, jnp.float32), tuple(jnp.asarray(b, jnp.float32) for b in blocks))
    check_grads(fn, args, order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)

    w = jnp.asarray(blocks[0][:, 0], jnp.float32)  # [F, D]
    single = sparse_decode_single(args[0][:, 0], idx[:, 0], w, impl="xla")
    np.testing.assert_allclose(
        np.asarray(single),
        np.einsum("tk,tkd->td", values[:, 0], np.asarray(w)[indices[:, 0]]),
        rtol=1e-5,
        atol=1e-5,
    )


def _largest_intermediate(fn, *args) -> int:
    """The largest array size in the jaxpr of `fn(*args)`, sub-jaxprs (scan, while) included."""

    def sizes(jp):
        for eqn in jp.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    return max(sizes(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("n_tokens,width,n_layers,k", [(16, 512, 1, 2), (32, 64, 2, 8)])
def test_backward_never_forms_token_by_latent_arrays(n_tokens, width, n_layers, k):
    """The sort / ELL intermediates stay below T·F (the second case: ELL rows of M = 2 slots,
    blocks of 128 overflow rows, each gathered to [128, R], bounded by ~2x dW, not by T·F);
    a dense [T, F] code array fails the same check."""
    values = jnp.ones((n_tokens, n_layers, k))
    idx = jnp.zeros((n_tokens, n_layers, k), jnp.int32)
    w = tuple(jnp.ones((width, n_layers - layer, 4)) for layer in range(n_layers))
    grad = jax.grad(lambda v, b: sparse_decode(v, idx, b, impl="xla").sum(), argnums=(0, 1))
    assert _largest_intermediate(grad, values, w) < n_tokens * width  # dW [F, D] yes, [T, F] no

    def dense(v, b):
        codes = jnp.zeros((n_tokens, n_layers, width)).at[..., 0].set(v.sum(-1))
        return sum(
            jnp.sum(codes[:, layer] @ b[layer].reshape(width, -1)) for layer in range(n_layers)
        )

    assert _largest_intermediate(jax.grad(dense, argnums=(0, 1)), values, w) >= n_tokens * width


def _skewed_indices(kind, shape, rng):
    """[T, L, K] latent ids: "hot" (latent 3 takes ~90% of the pairs), "one" (all on latent
    5), "each_once" (every latent exactly once per layer, T·K = F) or "uniform"."""
    if kind == "hot":
        return np.where(rng.random(shape) < 0.9, 3, rng.integers(0, F, shape)).astype(np.int32)
    if kind == "one":
        return np.full(shape, 5, np.int32)
    if kind == "each_once":
        perms = [rng.permutation(F).reshape(shape[0], shape[2]) for _ in range(shape[1])]
        return np.stack(perms, axis=1).astype(np.int32)
    return rng.integers(0, F, shape).astype(np.int32)


@pytest.mark.parametrize(
    "kind,shape",
    [
        ("hot", (24, 2, 5)),
        ("one", (24, 2, 5)),
        ("each_once", (7, 2, 1)),
        ("uniform", (24, 2, 5)),
        ("uniform", (1, 2, 1)),
    ],
)
def test_decoder_grad_skewed_latents_matches_float64_reference(kind, shape):
    """d(W_dec) when one latent spills over many overflow ELL rows (T·K = 120 pairs per layer,
    M = 8), all pairs share one latent, each latent is used once (T·K = F), or there is a
    single pair (no overflow rows at all)."""
    rng = np.random.default_rng(7)
    n_tokens, n_layers, k = shape
    values = rng.standard_normal((n_tokens, n_layers, k))
    indices = _skewed_indices(kind, (n_tokens, n_layers, k), rng)
    blocks = [rng.standard_normal((F, n_layers - layer, D)) for layer in range(n_layers)]
    cot = rng.standard_normal((n_tokens, n_layers, D))
    _, want_dv, want_db = _reference(values, indices, blocks, cot)
    _, (d_values, d_blocks) = _run(values, indices, blocks, cot, "xla", jnp.float32)
    assert _rel(d_values, want_dv) <= 1e-5
    for got, ref in zip(d_blocks, want_db, strict=True):
        assert _rel(got, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["hot", "one", "each_once", "uniform"])
@pytest.mark.parametrize("width,block", [(1, 1), (3, 4), (8, 512)])
def test_ell_table_grad_matches_scatter(kind, width, block):
    """`ell_layout` + `xla_table_grad` at explicit ELL widths and overflow block sizes (several
    loop steps, a partly used last block) against a float64 scatter-add."""
    rng = np.random.default_rng(11)
    n_tokens, k = (7, 1) if kind == "each_once" else (13, 3)
    values = rng.standard_normal((n_tokens, k))
    indices = _skewed_indices(kind, (n_tokens, 1, k), rng)[:, 0]
    g = rng.standard_normal((n_tokens, 14))  # d_table reads its last 10 columns
    want = np.zeros((F, 10))
    np.add.at(want, indices.reshape(-1), (values[..., None] * g[:, None, 4:]).reshape(-1, 10))
    ell = ell_layout(jnp.asarray(values, jnp.float32), jnp.asarray(indices), F, width, block)
    assert ell[0].shape == (F + -(-((n_tokens * k - 1) // width) // block) * block, width)
    got = xla_table_grad(*ell, jnp.asarray(g, jnp.float32), 10, block)
    assert _rel(got, want) <= 1e-5


def test_sort_by_latent_both_paths_are_stable():
    """The packed uint32 key sort and the argsort fallback (latent·n would not fit) agree with
    numpy's stable argsort."""
    latents = np.random.default_rng(2).integers(0, 5, 200).astype(np.int32)
    order = np.argsort(latents, kind="stable")
    for n_latents in (5, 2**30):
        got_sorted, got_order = sort_by_latent(jnp.asarray(latents), n_latents)
        np.testing.assert_array_equal(np.asarray(got_order), order)
        np.testing.assert_array_equal(np.asarray(got_sorted), latents[order])


def test_bad_inputs_raise():
    values, indices, blocks, _ = _problem(2, 3)
    with pytest.raises(ValueError, match="indices must lie in"):
        sparse_decode(values, np.where(indices == 2, F, indices), blocks)
    with pytest.raises(ValueError, match="differ in shape"):
        sparse_decode(values[..., :2], indices, blocks)
    with pytest.raises(ValueError, match="decoder blocks for 2"):
        sparse_decode(values, indices, blocks[:1])
    with pytest.raises(ValueError, match="decoder block 1 has shape"):
        sparse_decode(values, indices, [blocks[0], blocks[0]])
    with pytest.raises(ValueError, match="unknown sparse decode impl"):
        sparse_decode(values, indices, blocks, impl="cuda")
    with pytest.raises(ValueError, match="w_dec"):
        sparse_decode_single(values[:, 0], indices[:, 0], blocks[1])


def test_impl_selection(monkeypatch):
    native = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")
    assert resolve_impl() == native  # xla on CPU; this test also runs on a GPU
    assert resolve_impl(platform="cpu") == "xla"
    assert resolve_impl(platform="gpu") == "pallas_gpu"
    assert resolve_impl(platform="tpu") == "pallas_tpu"
    monkeypatch.setenv(IMPL_ENV, "pallas_gpu")
    assert resolve_impl() == "pallas_gpu"
    with use_impl("pallas_tpu"):
        assert resolve_impl() == "pallas_tpu" and resolve_impl("xla") == "xla"
    monkeypatch.setenv(IMPL_ENV, "nope")
    with pytest.raises(ValueError, match="unknown sparse decode impl"):
        resolve_impl()


def test_sparse_encoders():
    rng = np.random.default_rng(4)
    pre = jnp.asarray(rng.standard_normal((5, 3, 20)), jnp.float32)
    codes = topk_codes(pre, 4)
    dense = act_lib.topk(pre, 4)
    np.testing.assert_array_equal(np.asarray(codes.to_dense(20)), np.asarray(dense))
    assert (np.asarray(codes.overflow) == 0).all()
    approx = topk_codes(pre, 4, recall_target=0.95)
    np.testing.assert_allclose(np.sort(approx.values, -1), np.sort(codes.values, -1))
    counts = fire_counts(codes, 20)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray((dense > 0).sum(0)))
    jump = act_lib.jumprelu(pre, jnp.full((20,), 0.5))
    sp = sparsify(jump, 3)
    np.testing.assert_array_equal(np.asarray(sp.l0()), np.asarray((jump > 0).sum(-1)))
    g = jax.grad(lambda p: topk_codes(p, 4).values.sum())(pre)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(dense > 0, np.float32))


@pytest.mark.parametrize(
    "kind,arch",
    [("sae", "topk"), ("clt", "topk"), ("clt", "jumprelu"), ("sae", "batchtopk")],
)
def test_sparse_training_loss_matches_dense(kind, arch):
    """TopK trains sparse by default; JumpReLU and BatchTopK with sparse_k = width lose
    nothing. Loss, metrics and gradients equal the dense path's."""
    multi = kind == "clt"
    cfg = DictionaryConfig(
        kind=kind,
        architecture=arch,
        d_in=8,
        d_out=8,
        width=32,
        k=4 if arch in ("topk", "batchtopk") else None,
        l0_target=4.0 if arch == "jumprelu" else None,
        layers=(0, 1, 2) if multi else (1,),
        model_num_layers=4,
        matryoshka_widths=(8, 32),
    )
    if arch in ("jumprelu", "batchtopk"):  # sparse_k = width keeps every active latent
        cfg = cfg.replace(width=16, matryoshka_widths=None)
    d = random_dictionary(cfg, seed=1)
    rng = np.random.default_rng(5)
    shape = (24, 3, 8) if multi else (24, 8)
    x, y = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    if arch in ("jumprelu", "batchtopk"):
        sparse_cfg, dense_cfg = LossConfig(sparse_k=16), LossConfig()
    else:
        sparse_cfg, dense_cfg = LossConfig(), LossConfig(sparse_topk=False)
    ssf = jnp.zeros((3, cfg.width) if multi else (cfg.width,), jnp.int32)

    def run(lcfg):
        from flax import nnx

        graphdef, state = nnx.split(d)

        def loss(state):
            return dictionary_loss(
                nnx.merge(graphdef, state), x, y, lcfg, step=jnp.asarray(10), steps_since_fired=ssf
            )

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (loss_s, m_s), g_s = run(sparse_cfg)
    (loss_d, m_d), g_d = run(dense_cfg)
    assert _rel(loss_s, loss_d) <= 1e-5
    np.testing.assert_array_equal(np.asarray(m_s["fire_counts"]), np.asarray(m_d["fire_counts"]))
    assert float(m_s["l0"]) == float(m_d["l0"])
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d), strict=True):
        assert _rel(a, b) <= 1e-4
    with pytest.raises(ValueError, match="sparse_k"):
        LossConfig(sparse_k=2).check(cfg.replace(architecture="topk", k=2, l0_target=None))
