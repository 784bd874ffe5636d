"""The default recipe's high-frequency penalty removes every latent above 10 % firing
frequency (Gemma Scope 2 TR: no dense latents), on synthetic data with four dense directions
that an unpenalised JumpReLU SAE learns as latents firing on ~70 % of tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gemmascope_jax.dictionaries import DictionaryConfig
from gemmascope_jax.training import DictionaryTraining, LossConfig, OptimizerConfig, make_train_step
from gemmascope_jax.training.config_sections import TrainConfig
from gemmascope_jax.training.losses import freq_step


def dense_data(n, d=64, atoms=128, active=4, dense=4, p_dense=0.7, seed=0):
    """128 sparse unit atoms (~4 active per token) plus 4 dense ones (each on 70 % of
    tokens), magnitudes U(0.5, 1.5), scaled to unit mean squared norm."""
    dic = np.random.default_rng(0).standard_normal((atoms + dense, d))
    dic /= np.linalg.norm(dic, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    p = np.r_[np.full(atoms, active / atoms), np.full(dense, p_dense)]
    codes = (rng.random((n, atoms + dense)) < p) * rng.uniform(0.5, 1.5, (n, atoms + dense))
    x = codes @ dic
    return (x / np.sqrt(np.mean(np.sum(x**2, -1)))).astype(np.float32)


def firing_frequencies(freq_penalty_coeff, steps=800):
    x, held = dense_data(100_000), dense_data(20_000, seed=5)
    cfg = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=64, d_out=64, width=256, layers=(0,),
        l0_target=8,
    )  # fmt: skip
    t = TrainConfig()
    training = DictionaryTraining(
        cfg,
        LossConfig(
            sparsity_coeff=1.0,
            sparsity_warmup_steps=200,
            freq_penalty_coeff=freq_penalty_coeff,
            freq_penalty_max=t.freq_penalty_max,
        ),
        OptimizerConfig(lr=3e-3, warmup_steps=50),
    )
    ts = make_train_step([training])
    state, rng = ts.init(seed=0), np.random.default_rng(1)
    site = training.cfg.input_sites[0]
    for _ in range(steps):
        state, _ = ts(state, {site: x[rng.integers(0, len(x), 1024)]})
    (d,) = ts.dictionaries(state)
    pre = np.asarray(d.pre_activations(held))
    return (pre > np.asarray(d.threshold[...])).mean(0)


def test_default_recipe_has_the_penalty_on():
    t = TrainConfig()
    assert t.freq_penalty_coeff > 0 and t.freq_penalty_max == pytest.approx(0.1)


def test_freq_penalty_pushes_every_latent_below_ten_percent():
    off = firing_frequencies(0.0)
    on = firing_frequencies(TrainConfig().freq_penalty_coeff)
    print(f"\nmax firing frequency: off {off.max():.3f} ({(off > 0.1).sum()} above 10%), "
          f"on {on.max():.3f} ({(on > 0.1).sum()} above 10%)")  # fmt: skip
    assert off.max() > 0.5 and (off > 0.1).sum() >= 4  # the dense directions, unpenalised
    assert on.max() < 0.1


def test_freq_step_gradient_reaches_threshold_and_pre():
    pre = jax.numpy.asarray([[0.1000, 0.5], [0.1002, -0.2]])
    theta = jax.numpy.asarray([0.1001, 0.0])
    g_pre, g_th = jax.grad(lambda p, t: freq_step(p, t, 0.001).sum(), argnums=(0, 1))(pre, theta)
    np.testing.assert_allclose(np.asarray(g_pre), [[1000, 0], [1000, 0]], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(g_th), [-2000, 0], rtol=1e-3)
