"""Feature inspection: top_features, streaming max examples + density stats, logit lens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.analysis.common import dictionary_inputs, site_forward
from gemmascope_jax.analysis.features import top_features
from gemmascope_jax.analysis.logit_lens import logit_lens, logit_lens_table
from gemmascope_jax.analysis.max_examples import HIST_EDGES, MaxExamples, scan_corpus
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.formats import load_dictionary, save_dictionary

D_MODEL, LAYERS = 64, 7  # the tiny model (tests/hf_reference.py)


def _cfg(kind, width, layers, **kw):
    return DictionaryConfig(
        kind=kind,
        architecture=kw.pop("architecture", "jumprelu"),
        d_in=D_MODEL,
        d_out=D_MODEL,
        width=width,
        layers=layers,
        model_num_layers=LAYERS,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_dicts():
    return {
        "sae": random_dictionary(_cfg("sae", 48, (3,)), 0),
        "skip_transcoder": random_dictionary(_cfg("skip_transcoder", 40, (2,)), 1),
        "clt": random_dictionary(_cfg("clt", 16, tuple(range(LAYERS))), 2),
        "crosscoder": random_dictionary(_cfg("crosscoder", 16, (1, 3, 5), architecture="relu"), 3),
    }


@pytest.fixture(scope="module")
def prompt():
    ids = np.random.RandomState(1).randint(4, 512, size=12).tolist()
    return [2, *ids]  # <bos> first


def _dense_reference(model, d, ids):
    """Codes [T, L, F] and predictions/targets [T, L, D] from captured sites, BOS dropped."""
    cfg = d.cfg
    sites = site_forward(model, (*cfg.input_sites, *cfg.output_sites))(jnp.asarray([ids])).sites
    x = np.stack([np.asarray(sites[s][0, 1:]) for s in cfg.input_sites], axis=1)
    y = np.stack([np.asarray(sites[s][0, 1:]) for s in cfg.output_sites], axis=1)
    x_in = x if cfg.multilayer else x[:, 0]
    codes = np.asarray(d.encode(jnp.asarray(x_in))).reshape(len(x), len(cfg.layers), -1)
    y_hat = np.asarray(d(jnp.asarray(x_in))).reshape(y.shape)
    return codes, y, y_hat


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder", "clt", "crosscoder"])
def test_top_features_matches_dense(tiny_model, tiny_dicts, prompt, kind):
    d = tiny_dicts[kind]
    rep = top_features(tiny_model, None, d, prompt, k=5, splice=True)
    codes, y, y_hat = _dense_reference(tiny_model, d, prompt)
    layers = np.asarray(d.cfg.layers)
    assert rep.tokens[0] == f"<id {prompt[1]}>" and len(rep.tokens) == len(prompt) - 1
    for t in range(len(rep.tokens)):
        flat = codes[t].reshape(-1)
        order = np.argsort(-flat, kind="stable")[:5]
        order = order[flat[order] > 0]
        np.testing.assert_allclose(rep.top_values[t][: len(order)], flat[order], rtol=1e-5)
        got = list(zip(rep.top_layers[t][: len(order)], rep.top_ids[t][: len(order)], strict=True))
        want = [(layers[i // d.cfg.width], i % d.cfg.width) for i in order]
        assert got == want
        assert (rep.top_ids[t][len(order) :] == -1).all()
    totals = np.where(codes > 0, codes, 0).sum(0).reshape(-1)
    assert len(rep.ranked_ids) == int((totals > 0).sum())
    flat_ranked = np.searchsorted(layers, rep.ranked_layers) * d.cfg.width + rep.ranked_ids
    np.testing.assert_allclose(rep.ranked_totals, totals[flat_ranked], rtol=1e-5)
    assert (np.diff(rep.ranked_totals) <= 0).all()
    err = np.linalg.norm(y - y_hat, axis=-1)
    np.testing.assert_allclose(rep.error_norm, err, rtol=1e-4)
    np.testing.assert_allclose(rep.relative_error, err / np.linalg.norm(y, axis=-1), rtol=1e-4)
    assert '"ranked"' in rep.to_json()


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.RandomState(0)
    batches = [rng.randint(4, 512, size=(3, 16)).astype(np.int32) for _ in range(4)]
    starts = iter(range(4, 512))  # distinct tokens after every <bos>: no two equal prefixes
    for b in batches:
        b[:, 0] = 2
        b[1, 7] = 2  # a document boundary inside a window
        b[:, 1] = [next(starts) for _ in range(3)]
        b[1, 8] = next(starts)
    batches[-1][2, 9:] = 0  # right padding of the last window
    return batches


@pytest.fixture(scope="module")
def scanned(tiny_model, tiny_dicts, corpus):
    return scan_corpus(
        tiny_model, tiny_dicts["clt"], corpus, top_n=6, left=3, right=2, progress=False
    )


def test_streaming_top_n_equals_brute_force(tiny_model, tiny_dicts, corpus, scanned):
    d, ex = tiny_dicts["clt"], scanned
    tokens = np.concatenate(corpus)
    forward, encode = site_forward(tiny_model, d.cfg.input_sites), jax.jit(d.encode)
    codes = np.concatenate(  # the same per-batch forward and encoding: exact equality below
        [np.asarray(encode(dictionary_inputs(forward(jnp.asarray(b)).sites, d))) for b in corpus]
    ).reshape(*tokens.shape, -1)  # [R, T, L*F]
    keep = ~np.isin(tokens, (0, 2))
    codes = np.where(keep[..., None], codes, 0.0)
    left, right, n = 3, 2, 6
    padded_tok = np.pad(tokens, ((0, 0), (left, right)))
    padded_codes = np.pad(codes, ((0, 0), (left, right), (0, 0)))
    for f in range(codes.shape[-1]):
        v = codes[..., f].reshape(-1)
        fire = np.flatnonzero(v > 0)
        top = fire[np.argsort(-v[fire], kind="stable")][:n]
        assert len(np.unique(v[fire])) == len(fire)  # tie-free, so the order is unique
        np.testing.assert_array_equal(ex.values[f][: len(top)], v[top].astype(np.float32))
        assert np.isneginf(ex.values[f][len(top) :]).all()
        rows, pos = np.divmod(top, tokens.shape[1])
        np.testing.assert_array_equal(ex.rows[f][: len(top)], rows)
        np.testing.assert_array_equal(ex.positions[f][: len(top)], pos)
        win = pos[:, None] + np.arange(left + 1 + right)
        np.testing.assert_array_equal(ex.context_ids[f][: len(top)], padded_tok[rows[:, None], win])
        np.testing.assert_allclose(
            ex.context_values[f][: len(top)], padded_codes[rows[:, None], win, f], rtol=1e-6
        )
    # density statistics over the same pass
    assert ex.n_tokens == int(keep.sum())
    flat_codes = codes.reshape(-1, codes.shape[-1])
    np.testing.assert_array_equal(ex.fire_counts, (flat_codes > 0).sum(0))
    sums = np.where(flat_codes > 0, flat_codes, 0).sum(0)
    np.testing.assert_allclose(ex.activation_sums, sums, rtol=1e-5)  # float32 summation order
    np.testing.assert_allclose(ex.density, (flat_codes > 0).mean(0) * len(flat_codes) / keep.sum())
    for f in range(codes.shape[-1]):
        v = flat_codes[:, f][flat_codes[:, f] > 0]
        want, _ = np.histogram(np.clip(v, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
        np.testing.assert_array_equal(ex.histograms[f], want)


def test_max_examples_save_load_round_trip(scanned, tmp_path):
    path = scanned.save(tmp_path / "ex")
    back = MaxExamples.load(path)
    for name in ("values", "rows", "context_ids", "context_values", "histograms", "fire_counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(scanned, name))
    assert (back.n_tokens, back.layers, back.width) == (
        scanned.n_tokens,
        scanned.layers,
        scanned.width,
    )
    assert back.latent_name(16 * 3 + 5) == "L3/5"
    (path / "max_examples.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="malformed"):
        MaxExamples.load(path)
    with pytest.raises(ValueError, match="not a max-examples folder"):
        MaxExamples.load(tmp_path)


def test_logit_lens_matches_direct_computation(tiny_model, tiny_dicts):
    embed = np.asarray(tiny_model.embed_tokens[...], np.float64)
    scale = 1.0 + np.asarray(tiny_model.norm.weight[...], np.float64)
    sae, clt = tiny_dicts["sae"], tiny_dicts["clt"]
    cases = [
        (sae, 7, None, np.asarray(sae.w_dec[...])[7]),
        (clt, 4, 2, np.asarray(clt.w_dec[2][...])[4].sum(0)),  # all target layers of source 2
    ]
    for d, latent, layer, direction in cases:
        # through the final RMSNorm as if it were the whole residual stream
        rms = np.sqrt(np.mean(direction.astype(np.float64) ** 2) + 1e-6)
        logits = (direction / rms * scale) @ embed.T
        lens = logit_lens(tiny_model, d, latent, layer=layer, k=5)
        np.testing.assert_array_equal(lens.promoted_ids, np.argsort(-logits)[:5])
        np.testing.assert_array_equal(lens.suppressed_ids, np.argsort(logits)[:5])
        np.testing.assert_allclose(lens.promoted_values, np.sort(logits)[::-1][:5], rtol=1e-4)
        np.testing.assert_allclose(lens.suppressed_values, np.sort(logits)[:5], rtol=1e-4)
    promoted, _, _, _ = logit_lens_table(tiny_model, sae, [7, 3, 7], k=5, chunk=2)
    np.testing.assert_array_equal(promoted[0], promoted[2])


def test_logit_lens_scale_is_independent_of_the_decoder_norm(tiny_model, tiny_dicts):
    """A direction's lens logits do not change when its decoder row is scaled (raw-unit
    exports have rows of norm ~ the residual stream's): the same values at x1 and x1000."""
    from flax import nnx

    sae = tiny_dicts["sae"]
    base = logit_lens(tiny_model, sae, 7, k=5)
    big = nnx.clone(sae)
    big.w_dec[...] = big.w_dec[...] * 1000.0
    scaled = logit_lens(tiny_model, big, 7, k=5)
    np.testing.assert_array_equal(base.promoted_ids, scaled.promoted_ids)
    np.testing.assert_allclose(base.promoted_values, scaled.promoted_values, rtol=1e-4)


def test_bad_input_errors(tiny_model, tiny_dicts, prompt):
    wide = random_dictionary(
        DictionaryConfig(kind="sae", architecture="relu", d_in=32, d_out=32, width=8, layers=(3,))
    )
    with pytest.raises(ValueError, match="d_in is 32"):
        top_features(tiny_model, None, wide, prompt)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(tiny_model, tiny_dicts["sae"], 48)
    with pytest.raises(ValueError, match="say which"):
        logit_lens(tiny_model, tiny_dicts["clt"], 0)
    with pytest.raises(ValueError, match="out of range for vocab"):
        top_features(tiny_model, None, tiny_dicts["sae"], [2, 9999])
    with pytest.raises(ValueError, match="tokenizer is needed"):
        top_features(tiny_model, None, tiny_dicts["sae"], "text")


def test_gemma_scope_2_dictionary_on_real_model(real_model, tmp_path):
    """A GS2-layout 640-wide SAE at resid_post.9 of the embedded 270M, on text and on a chat."""
    model, tok = real_model
    cfg = DictionaryConfig(
        kind="sae",
        architecture="jumprelu",
        d_in=640,
        d_out=640,
        width=640,
        layers=(9,),
        model_num_layers=18,
    )
    save_dictionary(random_dictionary(cfg, 0), tmp_path / "gs2", format="gemma-scope-2")
    d = load_dictionary(tmp_path / "gs2")
    rep = top_features(model, tok, d, "The Eiffel Tower is in Paris", k=4, splice=True)
    assert rep.tokens[-1] == " Paris" and rep.top_values.shape == (len(rep.tokens), 4)
    assert (rep.top_layers[rep.top_ids >= 0] == 9).all() and rep.error_norm.shape[1] == 1
    chat = [{"role": "user", "content": "Hi"}]
    assert "<start_of_turn>" in top_features(model, tok, d, chat, k=2).tokens
    with pytest.raises(ValueError, match="roles out of order"):
        top_features(model, tok, d, [{"role": "model", "content": "Hi"}])
    lens = logit_lens(model, d, 5, k=3, tokenizer=tok)
    assert len(lens.promoted_tokens) == 3 and lens.promoted_values[0] >= lens.promoted_values[-1]
    # on the model's own logit scale (tens), not ±34,000 (issue 13)
    assert 1 < lens.promoted_values[0] < 200 and -200 < lens.suppressed_values[0] < -1
