"""Evals: FVU accumulated over batches against numpy over the whole set (and unlike the
mean of per-batch ratios), L0 / dead / dense / histogram on hand-made codes, `evaluate` on a
random dictionary, and splicing into the tiny random Gemma 3 (identity -> delta 0 and KL 0,
zero -> positive delta, error term, BOS kept clean, transcoder and CLT against a
layer-by-layer reference built from constant interventions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemmascope_jax.dictionaries import KINDS, DictionaryConfig, random_dictionary
from gemmascope_jax.evals import (
    EvalAccumulator,
    FVUAccumulator,
    dead_fraction,
    dense_fraction,
    eval_batch,
    evaluate,
    fvu_stats,
    l0,
    log10_frequency_histogram,
)
from gemmascope_jax.evals.splice import splice_batch, splice_eval
from gemmascope_jax.gemma3.config import gemma3_tiny
from gemmascope_jax.gemma3.generate import generate
from gemmascope_jax.gemma3.model import Gemma3

# ---- FVU ------------------------------------------------------------------------------------


def _batches(offset=0.0, seed=0):
    """Four batches whose means differ a lot, so batch-local and global FVU differ."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate((50, 70, 30, 90)):
        y = rng.standard_normal((n, 6)) + 3.0 * i + offset
        out.append(
            (y.astype(np.float32), (y + 0.5 * rng.standard_normal((n, 6))).astype(np.float32))
        )
    return out


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_fvu_over_batches_matches_whole_set(offset):
    batches = _batches(offset)
    acc = FVUAccumulator()
    for y, y_hat in batches:
        acc.add(fvu_stats(jnp.asarray(y), jnp.asarray(y_hat)))
    y = np.concatenate([b[0] for b in batches]).astype(np.float64)
    y_hat = np.concatenate([b[1] for b in batches]).astype(np.float64)
    want = np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2)
    np.testing.assert_allclose(acc.value(), want, rtol=1e-5)
    per_batch = np.mean(
        [np.sum((a - b) ** 2) / np.sum((a - a.mean(0)) ** 2) for a, b in batches]
    )  # the definition we do not use: it is several times larger here
    assert per_batch > 3 * want


def test_fvu_per_layer_for_multilayer_targets():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((40, 3, 5)) * np.array([1.0, 2.0, 5.0])[:, None]
    y_hat = y + rng.standard_normal(y.shape)
    acc = FVUAccumulator()
    for part in np.array_split(np.arange(40), 3):
        acc.add(fvu_stats(jnp.asarray(y[part], jnp.float32), jnp.asarray(y_hat[part], jnp.float32)))
    sse = np.sum((y - y_hat) ** 2, axis=(0, 2))
    sst = np.sum((y - y.mean(0)) ** 2, axis=(0, 2))
    np.testing.assert_allclose(acc.per_group(), sse / sst, rtol=1e-5)
    np.testing.assert_allclose(acc.value(), sse.sum() / sst.sum(), rtol=1e-5)


# ---- L0, dead, dense, histogram ---------------------------------------------------------


def test_l0_dead_dense_and_histogram_on_hand_made_codes():
    codes = np.zeros((20, 5), np.float32)
    codes[:, 0] = 1.0  # fires always: dense
    codes[:3, 1] = 0.5  # 3/20 = 0.15: dense (> 0.1)
    codes[:2, 2] = 2.0  # 2/20 = 0.10: not dense (the cut is strict)
    codes[7, 3] = 0.1  # 1/20
    # latent 4 never fires: dead
    assert float(l0(jnp.asarray(codes))) == pytest.approx((20 + 3 + 2 + 1) / 20)
    freq = (codes != 0).mean(0)
    assert dead_fraction(freq) == pytest.approx(1 / 5)
    assert dense_fraction(freq) == pytest.approx(2 / 5)
    counts, edges, dead = log10_frequency_histogram(freq, bins=8, low=-4.0)
    assert dead == 1 and counts.sum() == 4 and len(edges) == 9
    # log10 freq = 0, -0.82, -1, -1.30 with bins of 0.5 from -4: bins 7 (right edge), 6, 6, 5
    np.testing.assert_array_equal(counts, [0, 0, 0, 0, 0, 1, 2, 1])
    multi = np.stack([codes, codes[:, ::-1]], axis=1)  # [N, L=2, F]
    assert float(l0(jnp.asarray(multi), latent_ndim=2)) == pytest.approx(2 * 26 / 20)


def test_evaluate_matches_numpy_for_a_random_dictionary():
    cfg = DictionaryConfig(kind="transcoder", architecture="jumprelu", d_in=8, d_out=6,
                           width=24, layers=(0,))  # fmt: skip
    d = random_dictionary(cfg, seed=2)
    rng = np.random.default_rng(3)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    batches = [(draw(n, 8), draw(n, 6)) for n in (32, 17, 50)]
    summary = evaluate(d, batches)
    p = {k: np.asarray(v, np.float64) for k, v in d.arrays().items()}
    x = np.concatenate([b[0] for b in batches]).astype(np.float64)
    y = np.concatenate([b[1] for b in batches]).astype(np.float64)
    pre = x @ p["w_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * np.maximum(pre, 0)
    y_hat = f @ p["w_dec"] + p["b_dec"]
    fvu = np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2)
    assert summary["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert summary["l0"] == pytest.approx((f > 0).sum(1).mean())
    assert summary["dead_fraction"] == pytest.approx(np.mean((f > 0).sum(0) == 0))
    assert summary["tokens"] == 99
    acc = EvalAccumulator().add(eval_batch(d, batches[0][0], batches[0][1]))
    np.testing.assert_array_equal(acc.fire_counts, (f[:32] > 0).sum(0))


# ---- splicing into the tiny Gemma 3 ----------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return Gemma3(gemma3_tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens(model):
    """BOS + 3 random tokens, continued greedily by the model: the clean model predicts
    these tokens better than any perturbed one is likely to."""
    rng = np.random.default_rng(0)
    prompts = [[2, *rng.integers(3, 512, 3).tolist()] for _ in range(3)]
    new = generate(model, prompts, max_new_tokens=13, stop_ids=())
    return np.asarray([p + n for p, n in zip(prompts, new, strict=True)], np.int32)


D = gemma3_tiny().hidden_size


def _identity_sae(zero_decoder=False, layer=3):
    """relu([x, -x]) @ [I; -I] = x exactly (a zero decoder gives 0 instead)."""
    cfg = DictionaryConfig(kind="sae", architecture="jumprelu", d_in=D, d_out=D, width=2 * D,
                           layers=(layer,))  # fmt: skip
    eye = np.eye(D, dtype=np.float32)
    w_dec = np.zeros((2 * D, D), np.float32) if zero_decoder else np.concatenate([eye, -eye])
    return KINDS["sae"].from_arrays(cfg, dict(
        w_enc=np.concatenate([eye, -eye], 1), b_enc=np.zeros(2 * D), threshold=np.zeros(2 * D),
        w_dec=w_dec, b_dec=np.zeros(D)))  # fmt: skip


def test_identity_reconstruction_gives_zero_delta_and_kl(model, tokens):
    out = splice_eval(model, _identity_sae(), [tokens])
    assert out["delta_loss"] == 0.0 and abs(out["kl"]) < 1e-7
    assert out["positions"] == tokens.shape[0] * (tokens.shape[1] - 2)


def test_zero_reconstruction_gives_positive_delta(model, tokens):
    out = splice_eval(model, _identity_sae(zero_decoder=True), [tokens], zero_ablation=True)
    print(out)
    assert out["delta_loss"] > 0.05 and out["kl"] > 1e-3
    assert out["ce_zero"] == pytest.approx(out["ce_spliced"])  # it *is* the zero ablation
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)


def _ref_ce_kl(model, tokens, mask, interventions):
    """CE/KL sums by hand from clean and patched logits (positions t >= first real + 1 whose
    token is not <bos>)."""
    clean = np.asarray(model(tokens, attention_mask=mask).logits, np.float64)
    patched = np.asarray(model(tokens, attention_mask=mask, interventions=interventions).logits,
                         np.float64)  # fmt: skip
    valid = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    ce = {"clean": 0.0, "spliced": 0.0}
    kl, count = 0.0, 0
    for b in range(tokens.shape[0]):
        first = np.argmax(valid[b])
        for t in range(first + 1, tokens.shape[1] - 1):
            if not valid[b, t + 1] or tokens[b, t] == 2:
                continue
            lp = {k: v[b, t] - np.log(np.sum(np.exp(v[b, t] - v[b, t].max()))) - v[b, t].max()
                  for k, v in (("clean", clean), ("spliced", patched))}  # fmt: skip
            for k in ce:
                ce[k] -= lp[k][tokens[b, t + 1]]
            kl += np.sum(np.exp(lp["clean"]) * (lp["clean"] - lp["spliced"]))
            count += 1
    return ce["clean"] / count, ce["spliced"] / count, kl / count


def test_sae_splice_matches_reference_and_keeps_every_bos_clean(model, tokens):
    cfg = DictionaryConfig(kind="sae", architecture="jumprelu", d_in=D, d_out=D, width=96,
                           layers=(2,))  # fmt: skip
    d = random_dictionary(cfg, seed=1)
    mask = np.ones(tokens.shape, np.int32)
    mask[1, :3] = 0  # row 1 is left-padded: its BOS sits at position 3
    toks = tokens.copy()
    toks[1, :3], toks[1, 3] = 0, 2
    toks[0, 9] = 2  # a packed row: a second document starts at 9 with its own BOS
    scale = 2.5
    first = np.argmax(mask, axis=1)
    keep = (np.arange(toks.shape[1])[None] > first[:, None]) & (mask > 0) & (toks != 2)

    def fn(x, keep=keep):
        return jnp.where(keep[..., None], d(x / scale) * scale, x)

    want = _ref_ce_kl(model, toks, mask, {"resid_post.2": fn})
    got = splice_eval(model, d, [(toks, mask)], input_scale=scale, output_scale=scale)
    np.testing.assert_allclose([got["ce_clean"], got["ce_spliced"], got["kl"]], want, rtol=2e-5)
    all_pos = _ref_ce_kl(model, toks, mask, {"resid_post.2": lambda x: d(x / scale) * scale})
    assert abs(all_pos[1] - want[1]) > 1e-3  # splicing BOS too would have changed the loss
    inner = keep | ((np.arange(toks.shape[1])[None] == 9) & (np.arange(3)[:, None] == 0))
    mid_bos = _ref_ce_kl(model, toks, mask, {"resid_post.2": lambda x: jnp.where(
        inner[..., None], d(x / scale) * scale, x)})  # fmt: skip
    assert abs(mid_bos[1] - want[1]) > 1e-6  # so was splicing the mid-row BOS


def test_error_term_restores_the_clean_run(model, tokens):
    cfg = DictionaryConfig(kind="skip_transcoder", architecture="jumprelu", d_in=D, d_out=D,
                           width=96, layers=(4,))  # fmt: skip
    out = splice_eval(model, random_dictionary(cfg), [tokens], use_error_term=True)
    assert abs(out["delta_loss"]) < 1e-5 and abs(out["kl"]) < 1e-6
    assert abs(splice_eval(model, random_dictionary(cfg), [tokens])["delta_loss"]) > 1e-3


@pytest.mark.parametrize("kind", ["transcoder", "clt", "crosscoder"])
def test_splice_matches_layer_by_layer_reference(model, tokens, kind):
    """Reference: splice output layer j with the prediction from the inputs seen in a run
    where layers < j are already replaced by constants (causal dictionaries only ever see
    earlier layers; a crosscoder reads each site's value before its replacement), then run
    once more with every layer fixed."""
    multi = kind != "transcoder"
    layers = (1, 2, 4) if multi else (2,)
    cfg = DictionaryConfig(kind=kind, architecture="topk" if kind == "clt" else "jumprelu",
                           d_in=D, d_out=D, width=48, layers=layers, model_num_layers=7,
                           k=5 if kind == "clt" else None)  # fmt: skip
    d = random_dictionary(cfg, seed=4)
    keep = np.arange(tokens.shape[1])[None, :, None] > 0
    fixed: dict[str, jax.Array] = {}
    for j in range(len(layers)):
        seen = {}  # the value each site had before it was replaced (eager run, no jit)

        def site_fn(x, s, seen=seen):
            seen[s] = x
            return jnp.where(keep, fixed[s], x) if s in fixed else x

        sites = dict.fromkeys((*cfg.input_sites, *cfg.output_sites))
        model(tokens, interventions={s: (lambda x, s=s: site_fn(x, s)) for s in sites})
        xs = [seen[s] for s in cfg.input_sites]
        if multi:
            x = jnp.stack(
                [xs[i] if i <= j else jnp.zeros_like(xs[0]) for i in range(len(layers))], -2
            )
            fixed[cfg.output_sites[j]] = d(x)[..., j, :]
        else:
            fixed[cfg.output_sites[j]] = d(xs[0])
    final = {s: (lambda x, v=v: jnp.where(keep, v, x)) for s, v in fixed.items()}
    want = _ref_ce_kl(model, tokens, None, final)
    got = splice_batch(model, d, tokens)
    n = float(got["count"])
    np.testing.assert_allclose(
        [float(got["ce_clean"]) / n, float(got["ce_spliced"]) / n, float(got["kl"]) / n],
        want,
        rtol=1e-4,
    )
    assert want[2] > 1e-3  # the splice changed the model
