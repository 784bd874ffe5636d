"""Dictionaries of every kind against independent float64 numpy implementations of the GS2
formulas; CLT causality and linear parameter count; sparse decode; folds; Matryoshka
prefixes; BatchTopK -> JumpReLU; jit/grad in float32 and bfloat16; the 1B CLT by
`eval_shape`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemmascope_jax.dictionaries import (
    KINDS,
    DictionaryConfig,
    MultiLayerDictionary,
    SingleLayerDictionary,
    make_dictionary,
    random_dictionary,
)

D_IN, D_OUT, F = 12, 10, 32


def _cfg(kind, architecture="jumprelu", **kw):
    multi = kind in ("clt", "crosscoder")
    same = kind in ("sae", "crosscoder")
    base = dict(
        kind=kind,
        architecture=architecture,
        d_in=D_IN,
        d_out=D_IN if same else D_OUT,
        width=F,
        layers=(0, 1, 2, 3) if kind == "clt" else (1, 3, 4) if multi else (2,),
        model_num_layers=6,
        k=4 if "topk" in architecture else None,
    )
    return DictionaryConfig(**{**base, **kw})


def _x(cfg, batch=(3, 5), seed=1):
    shape = (*batch, cfg.num_layers, cfg.d_in) if cfg.multilayer else (*batch, cfg.d_in)
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _np_params(d):
    return {k: np.asarray(v, np.float64) for k, v in d.arrays().items()}


def _np_act(cfg, pre, th):
    if cfg.architecture == "jumprelu":
        return (pre > th) * np.maximum(pre, 0)
    if cfg.architecture == "relu":
        return np.maximum(pre, 0)
    out = np.zeros_like(pre)
    if cfg.architecture == "topk":
        idx = np.argsort(-pre, axis=-1)[..., : cfg.k]
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out
    raise NotImplementedError


def np_single(cfg, p, x):
    """GS2 single-layer formulas in float64: returns (codes, prediction)."""
    x = x.astype(np.float64)
    pre = (x - p["b_pre"]) @ p["w_enc"] + p["b_enc"]
    f = _np_act(cfg, pre, p.get("threshold"))
    y = f @ p["w_dec"] + p["b_dec"]
    if "w_skip" in p:
        y = y + x @ p["w_skip"]
    return f, y


def np_dense_decoder(cfg, p):
    """Zero-padded dense decoder [L_in, F, L_out, D_out] built from the causal blocks."""
    n = cfg.num_layers
    dense = np.zeros((n, cfg.width, n, cfg.d_out))
    for l_in in range(n):
        dense[l_in, :, l_in:, :] = p[f"w_dec.{l_in}"]
    return dense


def np_multi(cfg, p, x, codes=None):
    x = x.astype(np.float64)
    pre = np.einsum("...li,lif->...lf", x - p["b_pre"], p["w_enc"]) + p["b_enc"]
    f = _np_act(cfg, pre, p.get("threshold")) if codes is None else codes
    y = np.einsum("...lf,lfod->...od", f, np_dense_decoder(cfg, p)) + p["b_dec"]
    if "w_skip" in p:
        y = y + np.einsum("...li,lio->...lo", x, p["w_skip"])
    return f, y


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [
    ("sae", "jumprelu", {}),
    ("transcoder", "jumprelu", {}),
    ("skip_transcoder", "jumprelu", {}),
    ("sae", "relu", {}),
    ("transcoder", "topk", {}),
    ("clt", "jumprelu", {}),
    ("clt", "jumprelu", {"skip": True}),
    ("clt", "relu", {"skip": True}),
    ("crosscoder", "jumprelu", {}),
    ("crosscoder", "topk", {}),
]


@pytest.mark.parametrize("kind,arch,kw", CASES)
def test_matches_numpy_reference(kind, arch, kw):
    cfg = _cfg(kind, arch, **kw)
    d = random_dictionary(cfg, seed=3, pre_bias=True)
    assert isinstance(d, KINDS[kind])
    x = _x(cfg)
    p = _np_params(d)
    ref = np_multi if cfg.multilayer else np_single
    f_ref, y_ref = ref(cfg, p, x)
    if arch == "jumprelu":  # no pre-activation within rounding distance of its threshold
        pre = np.asarray(d.pre_activations(jnp.asarray(x)), np.float64)
        assert np.abs(pre - p["threshold"]).min() > 1e-5
    f = d.encode(jnp.asarray(x))
    y = d(jnp.asarray(x))
    assert f.shape == f_ref.shape and y.shape == y_ref.shape and y.dtype == jnp.float32
    assert 0 < (f_ref != 0).mean() < 0.6
    assert _rel(f, f_ref) <= 1e-6
    assert _rel(y, y_ref) <= 1e-6
    assert _rel(d.decode(f, jnp.asarray(x)), y_ref) <= 1e-6


def test_clt_decode_equals_dense_einsum_on_arbitrary_codes():
    cfg = _cfg("clt", skip=True)
    d = random_dictionary(cfg, seed=4)
    x = _x(cfg, batch=(7,))
    codes = np.abs(np.random.RandomState(2).randn(7, cfg.num_layers, F)).astype(np.float32)
    _, y_ref = np_multi(cfg, _np_params(d), x, codes=codes.astype(np.float64))
    assert _rel(d.decode(jnp.asarray(codes), jnp.asarray(x)), y_ref) <= 1e-6


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
def test_multilayer_decoder_is_causal(kind):
    cfg = _cfg(kind, skip=kind == "clt")
    d = random_dictionary(cfg, seed=5)
    x = jnp.asarray(_x(cfg, batch=(4,)))
    codes = d.encode(x)
    base = np.asarray(d.decode(codes, x))
    for layer in range(cfg.num_layers):
        bumped = codes.at[:, layer, :].add(1.0)
        out = np.asarray(d.decode(bumped, x))
        np.testing.assert_array_equal(out[:, :layer], base[:, :layer])
        assert np.abs(out[:, layer:] - base[:, layer:]).min() > 0
    if kind == "crosscoder":
        return
    # Through the whole forward: the Jacobian of outputs < l w.r.t. input layer l is zero.
    jac = jax.jit(jax.jacobian(lambda xx: d(xx)))(x[0])  # [L_out, D_out, L_in, D_in]
    for l_out in range(cfg.num_layers):
        assert float(jnp.abs(jac[l_out, :, l_out + 1 :]).max(initial=0.0)) == 0.0


@pytest.fixture(scope="module")
def gs2_clt():
    """A GS2-initialised CLT (initialisation compiles the RNG once per config: share it)."""
    return make_dictionary(_cfg("clt", skip=True), nnx.Rngs(0))


def test_clt_parameters_are_causal_blocks_only(gs2_clt):
    d, cfg = gs2_clt, gs2_clt.cfg
    shapes = {k: v.shape for k, v in d.arrays().items()}
    n = cfg.num_layers
    assert shapes["w_enc"] == (n, D_IN, F) and shapes["w_skip"] == (n, D_IN, D_OUT)
    assert shapes["b_dec"] == (n, D_OUT) and shapes["threshold"] == (n, F)
    for layer in range(n):
        assert shapes[f"w_dec.{layer}"] == (F, n - layer, D_OUT)
        full = np.asarray(d.full_decoder(layer))
        assert full.shape == (F, n, D_OUT) and not full[:, :layer].any()
        np.testing.assert_array_equal(full[:, layer:], np.asarray(d.w_dec[layer][...]))
    assert d.w_dec[0].logical_axes == ("latents", "layers", "embed")
    assert d.w_enc.logical_axes == ("layers", "embed", "latents")


def test_gemma3_1b_clt_by_eval_shape():
    """The released 1B CLT (26 layers x 10080 latents, d 1152): L(L+1)/2 decoder blocks, and no
    dense [L, F, L, D] array among the parameters or the forward's intermediates."""
    n, f, dm = 26, 10080, 1152
    cfg = DictionaryConfig(
        kind="clt", architecture="jumprelu", d_in=dm, d_out=dm, width=f,
        layers=tuple(range(n)), model_num_layers=n, skip=True,
    )  # fmt: skip
    d = nnx.eval_shape(lambda: make_dictionary(cfg, nnx.Rngs(0)))
    shapes = {
        ".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(d))
    }
    dec = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("w_dec"))
    assert dec == n * (n + 1) // 2 * f * dm == 4_075_868_160
    other = (
        n * dm * f + 2 * n * f + n * dm + n * dm * dm + n * dm
    )  # enc, b_enc+θ, b_dec, skip, b_pre
    assert sum(int(np.prod(s)) for s in shapes.values()) == dec + other
    assert max(int(np.prod(s)) for s in shapes.values()) == f * n * dm  # w_dec.0
    assert all(len(s) <= 3 for s in shapes.values())

    graphdef, state = nnx.split(d)
    x = jax.ShapeDtypeStruct((2, n, dm), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, xx: nnx.merge(graphdef, s)(xx))(state, x)
    assert jax.eval_shape(lambda s, xx: nnx.merge(graphdef, s)(xx), state, x).shape == (2, n, dm)
    largest = max(int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars)
    assert largest < f * n * dm  # intermediates are per-token, never decoder-sized


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder", "clt", "crosscoder"])
def test_sparse_codes_decode_like_dense(kind):
    cfg = _cfg(kind, skip=True if kind == "clt" else None)
    d = random_dictionary(cfg, seed=6)
    x = jnp.asarray(_x(cfg))
    dense = d.encode(x)
    active = np.asarray((dense != 0).sum(-1))
    full = d.encode_sparse(x, F)
    np.testing.assert_array_equal(np.asarray(full.to_dense(F)), np.asarray(dense))
    assert _rel(d.decode_sparse(full, x), d.decode(dense, x)) <= 1e-6
    k = 3
    assert active.max() > k
    sp = d.encode_sparse(x, k)
    lead = dense.shape[:-1]
    assert sp.values.shape == (*lead, k) and sp.overflow.shape == lead
    np.testing.assert_array_equal(np.asarray(sp.overflow), np.maximum(active - k, 0))
    truncated = sp.to_dense(F)  # the k largest per row, the rest dropped
    assert _rel(d.decode_sparse(sp, x), d.decode(truncated, x)) <= 1e-6
    assert _rel(d.decode_sparse(sp, x, prefix=9), d.decode(truncated, x, prefix=9)) <= 1e-6


@pytest.mark.parametrize("kind", ["sae", "transcoder", "clt", "crosscoder"])
def test_matryoshka_prefix_decode_zeroes_later_latents(kind):
    cfg = _cfg(kind, matryoshka_widths=(4, 16))
    assert cfg.matryoshka_widths == (4, 16, F)
    d = random_dictionary(cfg, seed=7)
    x = jnp.asarray(_x(cfg))
    codes = d.encode(x)
    for n in (*cfg.matryoshka_widths, 5):
        zeroed = codes.at[..., n:].set(0)
        assert _rel(d.decode(codes, x, prefix=n), d.decode(zeroed, x)) <= 1e-6
    assert _rel(d(x, prefix=F), d(x)) == 0
    with pytest.raises(ValueError, match="prefix must be an int in 1..32"):
        d.decode(codes, x, prefix=F + 1)


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder", "clt", "crosscoder"])
def test_folds_preserve_outputs(kind):
    cfg = _cfg(kind, skip=True if kind == "clt" else None)
    d = random_dictionary(cfg, seed=8, pre_bias=True)
    x = jnp.asarray(_x(cfg) * 3.0)
    if cfg.multilayer:
        s_in = jnp.linspace(1.5, 4.0, cfg.num_layers)
        s_out = s_in if kind == "crosscoder" else jnp.linspace(0.5, 2.0, cfg.num_layers)
        scale_in, scale_out = s_in[:, None], s_out[:, None]
    else:
        s_in = 2.5
        s_out = s_in if kind == "sae" else 0.7
        scale_in, scale_out = s_in, s_out
    want_codes = d.encode(x / scale_in)
    want = d(x / scale_in) * scale_out
    folded = d.fold_input_scale(s_in, None if kind in ("sae", "crosscoder") else s_out)
    assert folded is not d and type(folded) is type(d)
    assert _rel(folded.encode(x), want_codes) <= 1e-6
    assert _rel(folded(x), want) <= 1e-6
    np.testing.assert_array_equal(np.asarray(folded.threshold[...]), np.asarray(d.threshold[...]))

    unbiased = folded.fold_pre_encoder_bias()
    assert not np.asarray(unbiased.b_pre[...]).any()
    assert np.asarray(folded.b_pre[...]).any()  # the original is not mutated
    assert _rel(unbiased.pre_activations(x), folded.pre_activations(x)) <= 1e-6
    assert _rel(unbiased(x), want) <= 1e-6


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_batchtopk_converts_to_jumprelu(kind):
    cfg = _cfg(kind, "batchtopk", k=3)
    d = random_dictionary(cfg, seed=9)
    x = jnp.asarray(_x(cfg, batch=(16, 4)))
    codes = d.encode(x)
    per_layer = (np.asarray(codes) != 0).reshape(64, cfg.num_layers, F).sum((0, 2))
    np.testing.assert_array_equal(per_layer, 3 * 64)  # k*N per source layer
    for per_latent in (True, False):
        j = d.to_jumprelu(x, per_latent=per_latent)
        assert j.cfg.architecture == "jumprelu" and j.cfg.k is None
        assert j.cfg.extra["batchtopk_k"] == 3
        assert j.threshold[...].shape == ((cfg.num_layers, F) if cfg.multilayer else (F,))
        np.testing.assert_array_equal(np.asarray(j.encode(x)), np.asarray(codes))
        assert _rel(j(x), d(x)) == 0
    with pytest.raises(ValueError, match="converts batchtopk"):
        j.to_jumprelu(x)


def test_gs2_init(gs2_clt):
    cfg = _cfg("sae")
    d = make_dictionary(cfg, nnx.Rngs(1))
    w_dec = np.asarray(d.w_dec[...])
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(d.w_enc[...]), w_dec.T)
    np.testing.assert_array_equal(np.asarray(d.threshold[...]), np.float32(0.001))
    for name in ("b_enc", "b_dec", "b_pre"):
        assert not np.asarray(getattr(d, name)[...]).any()
    assert d.w_enc.logical_axes == ("embed", "latents")
    assert d.w_dec.logical_axes == ("latents", "embed")
    # Transcoder with d_in != d_out: independent unit-norm encoder columns, zero skip.
    t = make_dictionary(_cfg("skip_transcoder"), nnx.Rngs(1))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(t.w_enc[...]), axis=0), 1, rtol=1e-6)
    assert not np.asarray(t.w_skip[...]).any() and t.w_skip.logical_axes == ("embed", "embed")
    norms = [np.linalg.norm(np.asarray(b[...]).reshape(F, -1), axis=1) for b in gs2_clt.w_dec]
    np.testing.assert_allclose(np.concatenate(norms), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(gs2_clt.w_enc[...], axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(gs2_clt.threshold[...]), np.float32(0.001))
    assert not np.asarray(gs2_clt.w_skip[...]).any()


def test_arrays_round_trip_and_shape_errors():
    cfg = _cfg("clt", skip=True)
    d = random_dictionary(cfg, seed=10)
    arrays = d.arrays()
    assert sorted(arrays) == sorted(
        ["w_enc", "b_enc", "threshold", "b_dec", "w_skip", "b_pre"]
        + [f"w_dec.{i}" for i in range(4)]
    )
    again = MultiLayerDictionary.from_arrays(cfg, {k: np.asarray(v) for k, v in arrays.items()})
    x = jnp.asarray(_x(cfg))
    assert _rel(again(x), d(x)) == 0
    no_pre = {k: v for k, v in arrays.items() if k != "b_pre"}
    assert not np.asarray(MultiLayerDictionary.from_arrays(cfg, no_pre).b_pre[...]).any()
    bad = {**arrays, "w_dec.2": np.zeros((F, 4, D_OUT)), "extra": np.zeros(3)}
    bad.pop("threshold")
    with pytest.raises(ValueError) as e:
        MultiLayerDictionary.from_arrays(cfg, bad)
    msg = str(e.value)
    assert "w_dec.2 has shape (32, 4, 10), expected (32, 2, 10)" in msg
    assert "unknown tensors ['extra']" in msg and "missing tensors ['threshold']" in msg
    with pytest.raises(ValueError, match="handles kinds"):
        SingleLayerDictionary(cfg)
    with pytest.raises(ValueError, match=r"expected inputs \[..., 4, 12\]"):
        d(jnp.zeros((3, 12)))
    with pytest.raises(ValueError, match="needs the input x"):
        d.decode(d.encode(x))


@pytest.mark.parametrize(
    "kind,dtype", [("skip_transcoder", "bfloat16"), ("clt", "float32"), ("clt", "bfloat16")]
)
def test_jit_and_grad(kind, dtype):
    cfg = _cfg(kind, dtype=dtype, skip=True if kind == "clt" else None)
    d = random_dictionary(cfg, seed=11)
    x = jnp.asarray(_x(cfg), dtype)
    target = jnp.asarray(_x(cfg, seed=2)[..., : cfg.d_out], dtype)

    @nnx.jit
    def loss_and_grad(model, xx, yy):
        def loss(m):
            f = m.encode(xx, bandwidth=0.5)
            y = m.decode(f, xx)
            l0 = m.activate(m.pre_activations(xx), bandwidth=0.5)
            return jnp.mean((y - yy).astype(jnp.float32) ** 2) + 1e-3 * jnp.mean(l0)

        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grad(d, x, target)
    assert np.isfinite(float(value))
    assert grads["w_enc"][...].dtype == jnp.dtype(dtype)
    assert float(jnp.abs(grads["threshold"][...].astype(jnp.float32)).sum()) > 0
    for _, g in nnx.to_flat_state(grads):
        assert bool(jnp.isfinite(g[...].astype(jnp.float32)).all())
    graphdef, state = nnx.split(d)  # plain jax.grad over the parameter state
    plain = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(x).astype(jnp.float32).sum()))
    assert float(jnp.abs(plain(state)["w_enc"][...].astype(jnp.float32)).sum()) > 0
    eager = d(x)
    jitted = jax.jit(lambda m, xx: m(xx))(d, x)
    assert eager.dtype == jnp.dtype(dtype)
    tol = 0 if dtype == "float32" else 2e-2
    assert _rel(jitted.astype(jnp.float32), eager.astype(jnp.float32)) <= max(tol, 1e-6)
