"""Training core: the JumpReLU STE gradient of the full loss against the docs/recipe.md
formula (numpy), recovery of a known sparse dictionary, Matryoshka levels, aux-k revival of
dead TopK latents, the decoder constraint, every kind in one multi-dictionary step,
schedules and the Adam(b1=0) shortcut, BatchTopK -> JumpReLU export."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemmascope_jax.dictionaries import KINDS, DictionaryConfig, random_dictionary
from gemmascope_jax.evals.metrics import evaluate
from gemmascope_jax.training import (
    DictionaryTraining,
    LossConfig,
    OptimizerConfig,
    dictionary_loss,
    lr_schedule,
    make_optimizer,
    make_train_step,
    matryoshka_widths,
    prefix_reconstructions,
)
from gemmascope_jax.training.optimizer import decoder_norm_axes, project_decoder_grads

# ---- synthetic sparse data with a known dictionary ----------------------------------------


def sparse_data(n, d=64, atoms=128, active=4, seed=0, zipf=0.0):
    """x = codes @ atoms [n, d], ~`active` of the unit-norm atoms per sample with magnitudes
    U(0.5, 1.5), scaled to unit mean squared norm (the GS2 normalisation). Atom i fires with
    probability ∝ (i + 1)^-zipf. The atoms are fixed (seed 0); `seed` draws the codes."""
    dic = np.random.default_rng(0).standard_normal((atoms, d))
    dic /= np.linalg.norm(dic, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    p = (np.arange(atoms) + 1.0) ** -zipf
    p = np.minimum(active * p / p.sum(), 1.0)
    codes = (rng.random((n, atoms)) < p) * rng.uniform(0.5, 1.5, (n, atoms))
    x = codes @ dic
    return (x / np.sqrt(np.mean(np.sum(x**2, -1)))).astype(np.float32), dic


def sae_cfg(d, width, arch="jumprelu", **kw):
    k = {"k": kw.pop("k", 4)} if "topk" in arch else {}
    return DictionaryConfig(
        kind="sae", architecture=arch, d_in=d, d_out=d, width=width, layers=(0,), **k, **kw
    )


def train(training, x, steps, batch, seed=0, state=None, every=None):
    ts = make_train_step([training])
    state = ts.init(seed=seed) if state is None else state
    rng = np.random.default_rng(seed + 1)
    site = training.cfg.input_sites[0]
    history = []
    for i in range(steps):
        state, m = ts(state, {site: x[rng.integers(0, len(x), batch)]})
        if every and i % every == 0:
            history.append(jax.tree.map(np.asarray, m[training.label]))
    return ts, state, history


# ---- STE gradient of the full loss ---------------------------------------------------------


@pytest.mark.parametrize("form", ["batch", "token"])
def test_threshold_gradient_matches_reference_formula(form):
    """d loss / d θ with Matryoshka levels and the quadratic L0 penalty, against the
    docs/recipe.md STE formulas written out in numpy (encoder = identity, so the
    pre-activations are the hand-made inputs themselves)."""
    eps, lam, target = 0.1, 0.7, 1.5
    theta = np.array([0.5, 0.3, 0.2], np.float32)
    x = np.array(
        [[0.52, 0.10, 0.24], [0.47, 0.33, 0.00], [0.90, 0.26, 0.19], [0.40, 0.34, 0.60]],
        np.float32,
    )  # several entries inside the windows |x - θ| < ε/2, several outside
    w_dec = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    b_dec = np.array([0.1, -0.2, 0.05], np.float32)
    y = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    cfg = DictionaryConfig(
        kind="transcoder", architecture="jumprelu", d_in=3, d_out=3, width=3, layers=(0,),
        matryoshka_widths=(2, 3),
    )  # fmt: skip
    arrays = dict(w_enc=np.eye(3), b_enc=np.zeros(3), w_dec=w_dec, b_dec=b_dec)
    lcfg = LossConfig(
        bandwidth=eps, sparsity_coeff=lam, sparsity_warmup_steps=0, l0_target=target,
        l0_penalty=form, matryoshka_weights=(0.5, 1.0),
    )  # fmt: skip

    def loss_of(th):
        d = KINDS["transcoder"].from_arrays(cfg, {**arrays, "threshold": th})
        loss, _ = dictionary_loss(
            d, x, y, lcfg, step=jnp.int32(0), steps_since_fired=jnp.zeros(3, jnp.int32)
        )
        return loss

    got = np.asarray(jax.grad(loss_of)(jnp.asarray(theta)))

    # numpy reference (float64)
    z, th, n = x.astype(np.float64), theta.astype(np.float64), len(x)
    kernel = (np.abs((z - th) / eps) < 0.5).astype(np.float64)  # K((z - θ)/ε) [N, F]
    f = (z > th) * z
    g = np.zeros_like(z)  # d recon / d f
    for width, w in zip((2, 3), (0.5, 1.0), strict=True):
        y_hat = f[:, :width] @ w_dec[:width] + b_dec
        g[:, :width] += w * (2.0 / n) * (y_hat - y) @ w_dec[:width].T
    d_recon = np.sum(-(th / eps) * kernel * g, axis=0)
    l0 = (z > th).sum(1)
    d_step = -(1.0 / eps) * kernel  # d H(z - θ) / d θ
    if form == "batch":
        d_sparse = lam * (2 / target) * 2 * (l0.mean() - target) * d_step.mean(0)
    else:
        d_sparse = lam * (2 / target) * np.mean(2 * (l0 - target)[:, None] * d_step, axis=0)
    want = d_recon + d_sparse
    assert np.abs(want).min() > 0.1  # every latent has a non-trivial gradient here
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- recovery of a known dictionary --------------------------------------------------------


def test_jumprelu_recovers_known_dictionary():
    """GS2 recipe (ε 0.001, Adam(0, 0.999), quadratic L0, unit-norm decoder) on synthetic
    data: 128 atoms in 64 dims, 4 active per sample, a 256-latent SAE with target L0 4."""
    x, atoms = sparse_data(200_000)
    training = DictionaryTraining(
        sae_cfg(64, 256, l0_target=4),
        LossConfig(sparsity_coeff=1.0, sparsity_warmup_steps=500),
        OptimizerConfig(lr=3e-3, warmup_steps=100),
    )
    ts, state, _ = train(training, x, steps=2500, batch=1024)
    (d,) = ts.dictionaries(state)
    cos = (atoms @ np.asarray(d.w_dec[...]).T).max(1)  # best latent per true atom
    held_out, _ = sparse_data(20_000, seed=7)
    summary = evaluate(d, [(held_out, held_out)])
    print(f"recovered {np.mean(cos > 0.9):.3f}, median cos {np.median(cos):.4f}, "
          f"L0 {summary['l0']:.2f}, FVU {summary['fvu']:.3f}")  # fmt: skip
    assert np.mean(cos > 0.9) >= 0.85
    assert abs(summary["l0"] - 4) <= 0.8


# ---- Matryoshka -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sae", "clt"])
def test_prefix_reconstructions_equal_prefix_decodes(kind):
    multi = kind == "clt"
    cfg = DictionaryConfig(
        kind=kind, architecture="jumprelu", d_in=6, d_out=6 if kind == "sae" else 5,
        width=64, layers=(0, 1, 2) if multi else (0,), matryoshka_widths=matryoshka_widths(64),
    )  # fmt: skip
    d = random_dictionary(cfg, seed=3)
    x = np.random.default_rng(0).standard_normal((7, 3, 6) if multi else (7, 6))
    codes = d.encode(jnp.asarray(x, jnp.float32))
    assert cfg.matryoshka_widths == (2, 6, 14, 30, 64)
    got = prefix_reconstructions(d, codes, x, cfg.matryoshka_widths)
    for n, y in zip(cfg.matryoshka_widths, got, strict=True):
        np.testing.assert_allclose(y, d.decode(codes, x, prefix=n), atol=2e-5)


def test_matryoshka_every_prefix_loss_decreases():
    """Zipf-distributed atoms: every level's loss falls, and the small prefixes reconstruct
    much better than the same prefixes of a plain SAE trained alike."""
    x, _ = sparse_data(50_000, d=32, zipf=1.0)
    widths = matryoshka_widths(128)
    ends = {}
    for mat in (True, False):
        cfg = sae_cfg(32, 128, l0_target=4, matryoshka_widths=widths if mat else None)
        training = DictionaryTraining(
            cfg, LossConfig(sparsity_warmup_steps=100), OptimizerConfig(lr=3e-3, warmup_steps=20)
        )
        ts, state, hist = train(training, x, steps=401, batch=512, every=100)
        if mat:
            levels = [f"mse_prefix_{n}" for n in widths]
            print({k: [round(float(h[k]), 3) for h in hist] for k in levels})
            for key in levels:
                assert hist[-1][key] < 0.9 * hist[0][key], key
        (d,) = ts.dictionaries(state)
        codes = d.encode(x[:4096])
        ends[mat] = [float(np.mean(np.sum((d.decode(codes, prefix=n) - x[:4096]) ** 2, -1)))
                     for n in widths]  # fmt: skip
    print("prefix MSE matryoshka", np.round(ends[True], 3), "plain", np.round(ends[False], 3))
    assert ends[True][0] < 0.8 * ends[False][0] and ends[True][1] < 0.8 * ends[False][1]


# ---- TopK aux-k ----------------------------------------------------------------------------


def _dead_topk_state(ts, training, x):
    """Half of the latents get encoder columns scaled by 0.02: positive but never in the
    top k, so they never fire."""
    state = ts.init(seed=0)
    (d,) = ts.dictionaries(state)
    w_enc = np.asarray(d.w_enc[...]).copy()
    w_enc[:, ::2] *= 0.02
    return ts.init([d.with_arrays(w_enc=w_enc)])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_aux_k_revives_dead_latents(arch):
    x, _ = sparse_data(50_000, d=32)
    dead_after = {}
    for coeff in (0.0, 1 / 32):
        training = DictionaryTraining(
            sae_cfg(32, 128, arch, k=4),
            LossConfig(aux_coeff=coeff, dead_steps=10, aux_k=16),
            OptimizerConfig(lr=3e-3, warmup_steps=10),
        )
        ts = make_train_step([training])
        state = _dead_topk_state(ts, training, x)
        _, state, hist = train(training, x, steps=400, batch=512, state=state, every=1)
        num_dead = [int(h["num_dead"]) for h in hist]
        dead_after[coeff] = num_dead[-1]
        assert max(num_dead[11:20]) >= 60  # the crippled half is dead after 10 steps
        if coeff == 0:
            assert all(h["aux_loss"] == 0 for h in hist)
    print(arch, dead_after)
    assert dead_after[1 / 32] < 0.5 * dead_after[0.0]


# ---- decoder constraint, optimizer, schedules ----------------------------------------------


def test_project_decoder_grads_removes_parallel_component():
    rng = np.random.default_rng(0)
    w = {"w_dec": jnp.asarray(rng.standard_normal((5, 4))), "b_dec": jnp.zeros(4)}
    g = {"w_dec": jnp.asarray(rng.standard_normal((5, 4))), "b_dec": jnp.ones(4)}
    out, _ = project_decoder_grads({"w_dec": (-1,)}).update(g, optax.EmptyState(), w)
    unit = np.asarray(w["w_dec"]) / np.linalg.norm(w["w_dec"], axis=1, keepdims=True)
    np.testing.assert_allclose(np.sum(np.asarray(out["w_dec"]) * unit, axis=1), 0, atol=1e-6)
    perp = np.asarray(g["w_dec"]) - np.sum(np.asarray(g["w_dec"]) * unit, 1, keepdims=True) * unit
    np.testing.assert_allclose(out["w_dec"], perp, atol=1e-6)
    np.testing.assert_array_equal(out["b_dec"], g["b_dec"])


def test_adam_b1_zero_matches_optax_adam():
    rng = np.random.default_rng(0)
    params = {"w_dec": jnp.ones((3, 2)) / np.sqrt(2), "b": jnp.zeros(3)}
    ours = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), {})
    ref = optax.adam(1e-2, b1=0.0, b2=0.999, eps=1e-8)
    s_ours, s_ref = ours.init(params), ref.init(params)
    for _ in range(5):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_ours, u_ref)


def test_lr_schedule_cosine_warmup_from_a_tenth():
    f = lr_schedule(1.0, warmup_steps=100)
    np.testing.assert_allclose([f(0), f(50), f(100), f(5000)], [0.1, 0.55, 1.0, 1.0], atol=1e-6)
    g = lr_schedule(2.0, warmup_steps=10, total_steps=110, final_fraction=0.0)
    np.testing.assert_allclose([g(10), g(60), g(110)], [2.0, 1.0, 0.0], atol=1e-5)


# ---- every kind, several dictionaries in one step -------------------------------------------


def _all_kinds():
    common = dict(model_num_layers=4, width=32)
    cfgs = [
        DictionaryConfig(kind="sae", architecture="jumprelu", d_in=16, d_out=16, layers=(1,),
                         l0_target=4, matryoshka_widths=(8, 32), **common),
        DictionaryConfig(kind="transcoder", architecture="topk", d_in=16, d_out=16,
                         layers=(1,), k=4, **common),
        DictionaryConfig(kind="skip_transcoder", architecture="batchtopk", d_in=16, d_out=16,
                         layers=(2,), k=4, **common),
        DictionaryConfig(kind="clt", architecture="jumprelu", d_in=16, d_out=16,
                         layers=(0, 1, 2), l0_target=6, skip=True, **common),
        DictionaryConfig(kind="crosscoder", architecture="batchtopk", d_in=16, d_out=16,
                         layers=(0, 1, 3), k=3, **common),
    ]  # fmt: skip
    loss = LossConfig(sparsity_warmup_steps=0, bandwidth=0.05)
    return [DictionaryTraining(c, loss, OptimizerConfig(lr=3e-3, warmup_steps=1)) for c in cfgs]


def _site_batch(n=256, seed=0):
    """Correlated sites of a fake 4-layer model: mlp_out.l = tanh(mlp_in.l @ A_l)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for layer in range(4):
        a = rng.standard_normal((n, 16)).astype(np.float32)
        batch[f"mlp_in.{layer}"] = a
        mix = rng.standard_normal((16, 16)).astype(np.float32) / 4
        batch[f"mlp_out.{layer}"] = np.tanh(a @ mix)
        batch[f"resid_post.{layer}"] = a + batch[f"mlp_out.{layer}"]
    return batch


def test_every_kind_trains_in_one_step():
    trainings = _all_kinds()
    ts = make_train_step(trainings)
    assert set(ts.sites) == {f"{s}.{i}" for s in ("mlp_in", "mlp_out") for i in range(3)} | {
        "resid_post.0", "resid_post.1", "resid_post.3"}  # fmt: skip
    state = ts.init(seed=0)
    batch = ts.put_batch(_site_batch())
    first = None
    for _ in range(40):
        state, metrics = ts(state, batch)
        first = first or {k: float(m["loss"]) for k, m in metrics.items()}
    last = {k: float(m["loss"]) for k, m in metrics.items()}
    print({k: (round(first[k], 3), round(last[k], 3)) for k in first})
    assert set(last) == {t.label for t in trainings}
    for k in first:
        assert np.isfinite(last[k]) and last[k] < 0.9 * first[k], k
    assert int(state.step) == 40
    for t, d in zip(trainings, ts.dictionaries(state), strict=True):
        for name, axes in decoder_norm_axes(t.cfg).items():
            w = np.asarray(d.arrays()[name])
            np.testing.assert_allclose(np.sqrt(np.sum(w**2, axis=axes)), 1.0, atol=1e-5)
        if d.threshold is not None:
            assert np.all(np.asarray(d.threshold[...]) >= 0)
    m = metrics["clt.mlp_in.0"]
    assert m["fire_counts"].shape == (3, 32) and m["fvu_stats"].sse.shape == (3,)


def test_init_from_dictionaries_keeps_their_function():
    """The tied pre-encoder bias (SAE: x - b_dec) and the free one (transcoder) both rewrite
    b_enc so that a given dictionary's outputs are unchanged."""
    trainings = _all_kinds()[:2]
    ts = make_train_step(trainings)
    ds = [random_dictionary(t.cfg, seed=i, pre_bias=True) for i, t in enumerate(trainings)]
    back = ts.dictionaries(ts.init(ds))
    assert "b_pre" not in ts.init(ds).params[0] and "b_pre" in ts.init(ds).params[1]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 16)), jnp.float32)
    for d, e in zip(ds, back, strict=True):
        np.testing.assert_allclose(e(x), d(x), atol=1e-5)
    np.testing.assert_array_equal(back[0].b_pre[...], back[0].b_dec[...])


def test_batchtopk_exports_to_jumprelu_with_its_l0():
    x, _ = sparse_data(50_000, d=32)
    training = DictionaryTraining(
        sae_cfg(32, 128, "batchtopk", k=4), optimizer=OptimizerConfig(lr=3e-3, warmup_steps=10)
    )
    ts, state, _ = train(training, x, steps=300, batch=512)
    (d,) = ts.dictionaries(state)
    jump = d.to_jumprelu(jnp.asarray(x[:8192]))
    held_out, _ = sparse_data(8192, d=32, seed=5)
    summary = evaluate(jump, [(held_out, held_out)])
    print("exported JumpReLU L0", summary["l0"], "FVU", summary["fvu"])
    assert jump.cfg.architecture == "jumprelu" and abs(summary["l0"] - 4) < 0.8


def test_mean_batch_init_centres_the_biases():
    trainings = _all_kinds()
    ts = make_train_step(trainings)
    batch = _site_batch(seed=3)
    for t, d in zip(trainings, ts.dictionaries(ts.init(mean_batch=batch)), strict=True):
        means = np.stack(
            [[batch[s].mean(0) for s in ss] for ss in (t.cfg.input_sites, t.cfg.output_sites)]
        )
        means = means if t.cfg.multilayer else means[:, 0]  # [2 (in, out), (L,) d]
        np.testing.assert_allclose(d.b_dec[...], means[1], atol=1e-6)
        np.testing.assert_allclose(
            d.b_pre[...], means[0 if t.bias_mode == "free" else 1], atol=1e-6
        )


def test_threshold_init_sets_every_jumprelu_threshold():
    """`LossConfig.threshold_init` replaces the GS2 θ init (0.001) of JumpReLU kinds (SAE, CLT)
    and leaves the other parameters and the non-JumpReLU kinds as the GS2 init makes them."""
    trainings = _all_kinds()
    moved = [dataclasses.replace(t, loss=dataclasses.replace(t.loss, threshold_init=0.01))
             for t in trainings]  # fmt: skip
    base = make_train_step(trainings).init(seed=1)
    new = make_train_step(moved).init(seed=1)
    for p0, p1 in zip(base.params, new.params, strict=True):
        assert set(p0) == set(p1)
        for name in p0:
            if name == "threshold":
                np.testing.assert_array_equal(np.asarray(p0[name]), np.float32(0.001))
                np.testing.assert_array_equal(np.asarray(p1[name]), np.float32(0.01))
            else:
                np.testing.assert_array_equal(np.asarray(p0[name]), np.asarray(p1[name]))
    assert sum("threshold" in p for p in new.params) == 2  # the JumpReLU SAE and CLT
    with pytest.raises(ValueError, match="threshold_init"):
        bad = dataclasses.replace(trainings[0].loss, threshold_init=-1.0)
        make_train_step([dataclasses.replace(trainings[0], loss=bad)])
