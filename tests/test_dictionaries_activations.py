"""Activation functions (JumpReLU + STE, TopK, BatchTopK and its JumpReLU conversion) and
fixed-size sparse codes, against numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.dictionaries import activations as A
from gemmascope_jax.dictionaries.sparse import decode_rows, sparsify, to_dense


def _pre(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_jumprelu_inference_formula():
    pre = _pre((4, 7, 16))
    th = np.abs(_pre((16,), 1))
    want = (pre > th) * np.maximum(pre, 0)
    np.testing.assert_array_equal(np.asarray(A.jumprelu(jnp.asarray(pre), th)), want)
    # A negative threshold never lets negative pre-activations through (relu inside).
    neg = np.asarray(A.jumprelu(jnp.asarray(pre), -np.ones(16, np.float32)))
    np.testing.assert_array_equal(neg, np.maximum(pre, 0))


@pytest.mark.parametrize("bandwidth", [0.5, 0.001])
def test_jumprelu_ste_gradients_match_formula(bandwidth):
    rng = np.random.RandomState(1)
    th = rng.uniform(0.2, 1.0, 8).astype(np.float32)
    # Half the entries sit inside the rectangle window around θ, half anywhere.
    pre = rng.randn(6, 8).astype(np.float32)
    near = th + rng.uniform(-0.4, 0.4, (6, 8)).astype(np.float32) * bandwidth
    pre[::2] = near[::2]
    g = rng.randn(6, 8).astype(np.float32)

    def loss(p, t):
        return jnp.sum(jnp.asarray(g) * A.jumprelu_ste(p, t, bandwidth))

    out = A.jumprelu_ste(jnp.asarray(pre), jnp.asarray(th), bandwidth)
    np.testing.assert_array_equal(np.asarray(out), (pre > th) * np.maximum(pre, 0))
    d_pre, d_th = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(pre), jnp.asarray(th))
    rect = (np.abs((pre - th) / bandwidth) < 0.5).astype(np.float64)
    assert rect.sum() >= 20  # the window is exercised
    want_th = (-(th / bandwidth) * rect * g).sum(0)
    np.testing.assert_allclose(np.asarray(d_pre), g * (pre > th), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(d_th), want_th, rtol=1e-5, atol=1e-5 / bandwidth)


def test_heaviside_ste_gradients_match_formula():
    rng = np.random.RandomState(2)
    bw = 0.3
    th = rng.uniform(0.2, 1.0, (5,)).astype(np.float32)
    pre = (th + rng.uniform(-0.4, 0.4, (3, 4, 5)) * bw).astype(np.float32)
    pre[0] = rng.randn(4, 5)
    g = rng.randn(3, 4, 5).astype(np.float32)
    step = A.heaviside_ste(jnp.asarray(pre), jnp.asarray(th), bw)
    np.testing.assert_array_equal(np.asarray(step), (pre > th).astype(np.float32))
    loss = lambda p, t: jnp.sum(jnp.asarray(g) * A.heaviside_ste(p, t, bw))
    d_pre, d_th = jax.grad(loss, argnums=(0, 1))(jnp.asarray(pre), jnp.asarray(th))
    rect = np.abs((pre - th) / bw) < 0.5
    np.testing.assert_array_equal(np.asarray(d_pre), 0)
    np.testing.assert_allclose(np.asarray(d_th), (-(1 / bw) * rect * g).sum((0, 1)), rtol=1e-5)


def test_ste_in_bfloat16_keeps_dtypes():
    pre = jnp.asarray(_pre((4, 8)), jnp.bfloat16)
    th = jnp.full((8,), 0.3, jnp.bfloat16)
    d_pre, d_th = jax.grad(lambda p, t: A.jumprelu_ste(p, t, 0.5).sum(), argnums=(0, 1))(pre, th)
    assert d_pre.dtype == jnp.bfloat16 and d_th.dtype == jnp.bfloat16
    assert float(jnp.abs(d_th).sum()) > 0


def test_topk_keeps_k_largest_positive_per_token():
    pre = _pre((3, 5, 20))
    pre[0, 0] = -np.abs(pre[0, 0])
    pre[0, 0, :2] = [0.5, 0.25]  # only two positive entries in this token
    out = np.asarray(A.topk(jnp.asarray(pre), 4))
    for row_pre, row_out in zip(pre.reshape(-1, 20), out.reshape(-1, 20), strict=True):
        top = np.argsort(-row_pre)[:4]
        want = np.zeros(20, np.float32)
        want[top] = np.maximum(row_pre[top], 0)
        np.testing.assert_array_equal(row_out, want)
    assert (out[0, 0] != 0).sum() == 2
    assert ((out != 0).sum(-1)[1:] == 4).all()


def test_batchtopk_selects_k_times_batch_over_the_batch():
    pre = _pre((4, 6, 32))
    out = np.asarray(A.batchtopk(jnp.asarray(pre), 3))
    flat = pre.reshape(-1)
    keep = np.argsort(-flat)[: 3 * 24]
    want = np.zeros_like(flat)
    want[keep] = np.maximum(flat[keep], 0)
    np.testing.assert_array_equal(out.reshape(-1), want)
    per_token = (out != 0).sum(-1)
    assert per_token.sum() == 72 and per_token.min() != per_token.max()


@pytest.mark.parametrize("per_latent", [True, False])
def test_batchtopk_threshold_reproduces_batchtopk_on_calibration_batch(per_latent):
    pre = jnp.asarray(_pre((64, 48), 3) + 0.3 * _pre((48,), 4))
    th = A.batchtopk_threshold(pre, 5, per_latent=per_latent)
    assert th.shape == (48,) and bool((th >= 0).all())
    np.testing.assert_array_equal(np.asarray(A.jumprelu(pre, th)), np.asarray(A.batchtopk(pre, 5)))
    if not per_latent:
        assert np.unique(np.asarray(th)).size == 1


def test_batchtopk_threshold_when_nothing_is_positive():
    pre = -jnp.abs(jnp.asarray(_pre((8, 6))))
    th = A.batchtopk_threshold(pre, 2)
    np.testing.assert_array_equal(np.asarray(A.jumprelu(pre, th)), 0)


def test_registry_and_aliases():
    assert set(A.ACTIVATIONS) == {"jumprelu", "relu", "topk", "batchtopk"}
    assert A.canonical_architecture("jump_relu") == "jumprelu"
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        A.canonical_architecture("gated")
    pre = jnp.asarray(_pre((2, 10)))
    with pytest.raises(ValueError, match="needs k"):
        A.apply_activation("topk", pre)
    with pytest.raises(ValueError, match="needs a threshold"):
        A.apply_activation("jumprelu", pre)
    with pytest.raises(ValueError, match="k must be an int"):
        A.topk(pre, 11)
    np.testing.assert_array_equal(
        np.asarray(A.apply_activation("relu", pre)), np.maximum(np.asarray(pre), 0)
    )


def test_sparsify_matches_dense_and_counts_overflow():
    pre = _pre((5, 7, 24), 5)
    dense = np.asarray(A.jumprelu(jnp.asarray(pre), np.full(24, 1.0, np.float32)))
    active = (dense != 0).sum(-1)
    assert active.max() > 4 and active.min() < 4  # both overflow and padding happen

    big = sparsify(jnp.asarray(dense), 24)
    np.testing.assert_array_equal(np.asarray(big.to_dense(24)), dense)
    np.testing.assert_array_equal(np.asarray(big.overflow), 0)

    sp = sparsify(jnp.asarray(dense), 4)
    values, indices = np.asarray(sp.values), np.asarray(sp.indices)
    assert sp.indices.dtype == jnp.int32 and sp.overflow.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sp.overflow), np.maximum(active - 4, 0))
    np.testing.assert_array_equal(np.asarray(sp.l0()), active)
    assert (np.diff(values, axis=-1) <= 0).all()  # descending
    assert ((indices >= 0) & (indices < 24)).all()
    assert (np.sort(indices, -1)[..., 1:] != np.sort(indices, -1)[..., :-1]).all()  # distinct
    for v, i, d in zip(
        values.reshape(-1, 4), indices.reshape(-1, 4), dense.reshape(-1, 24), strict=True
    ):
        n = min((d != 0).sum(), 4)
        np.testing.assert_array_equal(v[:n], np.sort(d)[::-1][:n])  # the K largest
        np.testing.assert_array_equal(d[i[:n]], v[:n])
        np.testing.assert_array_equal(v[n:], 0)  # padding
    with pytest.raises(ValueError, match="k must be an int"):
        sparsify(jnp.asarray(dense), 0)


def test_sparsify_groups_keep_the_largest_of_each_latent_range():
    """groups = 3 over 24 latents, k = 6: slots [2g, 2g + 2) hold the 2 largest codes of
    latents [8g, 8g + 8); overflow sums what each range drops; groups = 1 is plain top-k."""
    pre = _pre((5, 7, 24), 7)
    dense = np.asarray(A.jumprelu(jnp.asarray(pre), np.full(24, 0.5, np.float32)))
    sp = sparsify(jnp.asarray(dense), 6, groups=3)
    assert sp.groups == 3 and sp.values.shape == (5, 7, 6)
    values, indices = np.asarray(sp.values), np.asarray(sp.indices)
    want_overflow = np.zeros((5, 7), np.int64)
    for g in range(3):
        part = dense[..., 8 * g : 8 * g + 8]
        v, i = values[..., 2 * g : 2 * g + 2], indices[..., 2 * g : 2 * g + 2]
        assert ((i >= 8 * g) & (i < 8 * g + 8)).all()
        np.testing.assert_array_equal(v, np.sort(part, -1)[..., ::-1][..., :2])
        want_overflow += np.maximum((part != 0).sum(-1) - 2, 0)
        rows = np.take_along_axis(dense, i, -1)
        np.testing.assert_array_equal(np.where(v != 0, rows, 0), v)
    assert want_overflow.max() > 0
    np.testing.assert_array_equal(np.asarray(sp.overflow), want_overflow)
    np.testing.assert_array_equal(np.asarray(sp.l0()), (dense != 0).sum(-1))
    plain = sparsify(jnp.asarray(dense), 6, groups=1)
    np.testing.assert_array_equal(np.asarray(plain.values), np.asarray(sparsify(dense, 6).values))
    for bad in (4, 0, 5):  # must divide k = 6 and the width 24
        with pytest.raises(ValueError, match="groups must divide"):
            sparsify(jnp.asarray(dense), 6, groups=bad)


def test_decode_rows_and_to_dense():
    rng = np.random.RandomState(6)
    w = rng.randn(10, 3, 4).astype(np.float32)
    values = rng.rand(2, 5, 3).astype(np.float32)
    indices = rng.randint(0, 10, (2, 5, 3)).astype(np.int32)
    out = np.asarray(decode_rows(jnp.asarray(values), jnp.asarray(indices), jnp.asarray(w)))
    want = np.einsum("bsk,bskjd->bsjd", values, w[indices])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    from gemmascope_jax.dictionaries.sparse import SparseCodes

    codes = SparseCodes(jnp.asarray(values), jnp.asarray(indices), jnp.zeros((2, 5), jnp.int32))
    dense = np.zeros((2, 5, 10), np.float32)
    for b, s, k in np.ndindex(2, 5, 3):
        dense[b, s, indices[b, s, k]] += values[b, s, k]
    np.testing.assert_allclose(np.asarray(to_dense(codes, 10)), dense, rtol=1e-6)
