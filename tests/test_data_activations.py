"""Activation stream on the tiny random Gemma 3: alignment, BOS/pad dropping, shuffling,
resume and normalization scalars, each against a direct model call or numpy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemmascope_jax.data import ActivationStream, PackedTokens, estimate_norm_scalars, normalize
from gemmascope_jax.gemma3.config import gemma3_tiny
from gemmascope_jax.gemma3.model import Gemma3
from tests.test_data_packing import BOS, PAD, StubTokenizer, as_source

SITES = ("resid_mid.3", "mlp_out.3", "resid_post.3", "mlp_in.1")


@pytest.fixture(scope="module")
def model():
    """The tiny Gemma 3 with random weights (filled from numpy: eager init compiles per op)."""
    model = nnx.eval_shape(lambda: Gemma3(gemma3_tiny(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    fill = lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)
    nnx.update(model, jax.tree.map(fill, nnx.state(model)))
    return model


@pytest.fixture(scope="module")
def forward(model):
    """One jitted early-exit forward shared by the streams (each `jitted()` compiles anew)."""
    return model.jitted(capture=SITES, logits=False)


@pytest.fixture(scope="module")
def reference(model):
    """The direct model call: the full forward with logits, a separately compiled program."""
    return model.jitted(capture=SITES)


def small_docs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 512, rng.integers(3, 30)).tolist() for _ in range(n)]


def tokens(num_epochs=1, seed=0, batch_size=4, seq_len=16, n_docs=24):
    src = as_source(small_docs(n_docs))
    kw = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=num_epochs)
    return PackedTokens(src, StubTokenizer(), **kw)


def collect(stream):
    batches = list(stream)
    return {s: np.concatenate([b[s] for b in batches]) for s in stream.sites}, batches


def direct_rows(reference, token_iter, sites):
    """Rows of the direct model call at non-<bos>, non-<pad> positions, in order."""
    out = {s: [] for s in sites}
    for t in token_iter:
        keep = ((t != BOS) & (t != PAD)).reshape(-1)
        acts = reference(jnp.asarray(t)).sites
        for s in sites:
            a = np.asarray(acts[s])
            out[s].append(a.reshape(-1, a.shape[-1])[keep])
    return {s: np.concatenate(v) for s, v in out.items()}


def match_rows(got, want):
    """Index into `want` of the nearest row for each row of `got` (must be a bijection)."""
    d = ((got[:, None, :] - want[None, :, :]) ** 2).sum(-1)
    idx = d.argmin(1)
    assert len(set(idx.tolist())) == len(want) == len(got)
    return idx


def test_stream_rows_are_the_model_sites_without_bos_and_aligned(model, reference):
    stream = ActivationStream(
        model, SITES, tokens(), batch_tokens=32, buffer_tokens=100, drop_remainder=False
    )  # its own `model.jitted(capture=SITES, logits=False)`
    got, batches = collect(stream)
    want = direct_rows(reference, tokens(), SITES)
    n_real = sum(len(d) for d in small_docs())
    assert all(v.shape == (n_real, 64) and v.dtype == np.float32 for v in got.values())
    assert all(len(b[SITES[0]]) == 32 for b in batches[:-1])
    idx = match_rows(got["resid_post.3"], want["resid_post.3"])
    assert not (idx == np.arange(len(idx))).all()  # shuffled
    for s in SITES:  # every site permuted the same way
        np.testing.assert_allclose(got[s], want[s][idx], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(  # aligned within a batch: resid_post = resid_mid + mlp_out
        got["resid_post.3"], got["resid_mid.3"] + got["mlp_out.3"], atol=1e-5
    )


def test_mask_drops_padding(forward, reference):
    """Left-padded batches with a mask: padded positions dropped, real ones match the model."""
    rng = np.random.default_rng(1)
    lens = [5, 9, 16, 3]
    toks = np.zeros((4, 16), np.int32)
    mask = np.zeros((4, 16), np.int32)
    for i, k in enumerate(lens):
        toks[i, 16 - k :] = [BOS, *rng.integers(4, 512, k - 1)]
        mask[i, 16 - k :] = 1
    stream = ActivationStream(
        None, SITES, iter([(toks, mask)]), batch_tokens=7, drop_remainder=False, seed=3,
        forward=forward,
    )  # fmt: skip
    got, _ = collect(stream)
    ref = reference(jnp.asarray(toks), jnp.asarray(mask)).sites
    keep = (mask == 1) & (toks != BOS)
    assert got["resid_post.3"].shape == (sum(lens) - 4, 64)
    idx = match_rows(got["resid_post.3"], np.asarray(ref["resid_post.3"])[keep])
    for s in SITES:
        np.testing.assert_allclose(got[s], np.asarray(ref[s])[keep][idx], atol=1e-5, rtol=1e-5)


def provenance_forward(t, mask):
    """A fake forward whose site 'src' is (fingerprint of the sequence, position) per token."""
    t = np.asarray(t, np.int64)
    b, n = t.shape
    seq = (t * np.arange(1, n + 1)).sum(1) % 1_000_003
    src = np.stack([np.broadcast_to(seq[:, None], (b, n)), np.broadcast_to(np.arange(n), (b, n))])
    return {"src": np.moveaxis(src, 0, -1).astype(np.float32)}


def test_shuffle_buffer_mixes_sequences():
    b, t = 4, 16
    stream = ActivationStream(
        None, ("src",), tokens(batch_size=b, seq_len=t, n_docs=120), batch_tokens=64,
        buffer_tokens=8 * 64, forward=provenance_forward, drop_remainder=False,
    )  # fmt: skip
    batches = [x["src"].astype(np.int64) for x in stream]
    seqs_in_chunk = (8 * 64) // (t - 1) + 1  # sequences that filled one buffer (>= 35)
    for batch in batches[:8]:  # the first two chunks are full
        distinct = len(np.unique(batch[:, 0]))
        assert distinct >= 0.6 * min(seqs_in_chunk, 64), distinct
    pairs = np.concatenate(batches)
    keys = pairs[:, 0] * t + pairs[:, 1]
    assert len(keys) == sum(map(len, small_docs(120)))
    assert len(np.unique(keys)) == len(keys)  # each (sequence, position) once
    assert not (np.diff(keys[:64]) > 0).all()


def run_stream(forward, sites=SITES, batch_tokens=24):
    return ActivationStream(
        None, sites, tokens(num_epochs=None, seed=5), batch_tokens=batch_tokens,
        buffer_tokens=60, seed=11, forward=forward,
    )  # fmt: skip


@pytest.mark.parametrize("skip", [0, 1, 2, 5])
def test_resume_exact_with_fake_forward(skip):
    stream = run_stream(provenance_forward, ("src",))
    for _ in range(skip):
        next(stream)
    state = json.loads(json.dumps(stream.get_state()))
    want = [next(stream)["src"] for _ in range(6)]  # crosses several chunk boundaries
    fresh = run_stream(provenance_forward, ("src",))
    fresh.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(fresh)["src"], w)


def test_resume_exact_with_the_model(model, forward):
    stream = run_stream(forward)
    next(stream)
    while stream.get_state()["chunk"] < 1 or stream.get_state()["pos"] == 0:
        next(stream)  # stop inside the second chunk or later
    state = json.loads(json.dumps(stream.get_state()))
    want = [next(stream) for _ in range(5)]
    fresh = run_stream(model.jitted(capture=SITES, logits=False))  # a fresh compile too
    fresh.set_state(state)
    for w in want:
        g = next(fresh)
        for s in SITES:
            np.testing.assert_array_equal(g[s], w[s])
    with pytest.raises(ValueError, match="seed"):
        ActivationStream(None, SITES, tokens(), batch_tokens=24, seed=1, forward=forward).set_state(
            state
        )


def test_norm_scalars_match_numpy(forward):
    scalars = estimate_norm_scalars(run_stream(forward, batch_tokens=40), n_batches=3)
    stream = run_stream(forward, batch_tokens=40)
    first = [next(stream) for _ in range(3)]
    for s in SITES:
        x = np.concatenate([b[s] for b in first]).astype(np.float64)
        want = np.sqrt(np.mean(np.sum(x**2, axis=1)))
        assert scalars[s] == pytest.approx(want, rel=1e-6)
        normed = normalize({s: x.astype(np.float32)}, scalars)[s]
        assert np.mean(np.sum(normed.astype(np.float64) ** 2, 1)) == pytest.approx(1, rel=1e-5)
    assert scalars["resid_post.3"] != pytest.approx(scalars["mlp_in.1"], rel=1e-3)
    with pytest.raises(ValueError, match="empty"):
        estimate_norm_scalars(iter([]), 1)


def test_norm_scalars_sqrt_d_give_mean_squared_norm_d(forward):
    """`normalization="sqrt_d"` (SAELens' convention): E||x/s||^2 = d, s = s_unit / sqrt(d)."""
    unit = estimate_norm_scalars(run_stream(forward, batch_tokens=40), n_batches=3)
    sqrt_d = estimate_norm_scalars(run_stream(forward, batch_tokens=40), 3, "sqrt_d")
    stream = run_stream(forward, batch_tokens=40)
    first = [next(stream) for _ in range(3)]
    for s in SITES:
        x = np.concatenate([b[s] for b in first]).astype(np.float32)
        d = x.shape[1]
        assert sqrt_d[s] == pytest.approx(unit[s] / np.sqrt(d), rel=1e-9)
        normed = normalize({s: x}, sqrt_d)[s].astype(np.float64)
        assert np.mean(np.sum(normed**2, 1)) == pytest.approx(d, rel=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        estimate_norm_scalars(run_stream(forward, batch_tokens=40), 1, "sqrt")
