"""`evaluate` and the quality card: SAEBench core metric definitions against hand computations
(a perfect reconstruction scores 1, a zero dictionary 0, numpy over the masked tokens, CE
against `splice_eval`), the absorption formulas, a card for every dictionary kind on the tiny
Gemma 3, and the `gemmascope-jax evaluate` command (exit codes, `--json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.registry import dictionary_class
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.evals import absorption as ab
from gemmascope_jax.evals.card import write_card
from gemmascope_jax.evals.saebench import keep_mask, max_cosine_sim
from gemmascope_jax.evals.saebench_run import core_metrics
from gemmascope_jax.evals.splice import splice_eval
from gemmascope_jax.gemma3.tokenizer import BOS_ID, EOS_ID, PAD_ID

D, L = 64, 3


@pytest.fixture(scope="module")
def tiny_model():
    """A 3-layer random Gemma 3 (both layer types): fewer layers to compile than the shared
    7-layer fixture, which is what dominates this file's time."""
    import dataclasses

    from flax import nnx

    from gemmascope_jax.gemma3.config import FULL, SLIDING, gemma3_tiny
    from gemmascope_jax.gemma3.model import Gemma3

    cfg = dataclasses.replace(gemma3_tiny(), num_layers=L, layer_types=(SLIDING, SLIDING, FULL))
    return Gemma3(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    t = np.random.RandomState(3).randint(4, 512, size=(2, 12))
    t[:, 0] = BOS_ID
    t[1, 6] = EOS_ID  # a special token mid-sequence: neither spliced nor counted
    return t


def _cfg(kind, **kw):
    base = dict(kind=kind, architecture="jumprelu", d_in=D, d_out=D, width=32, layers=(1,))
    return DictionaryConfig(**{**base, "model_num_layers": L, **kw})


def _identity_sae():
    """ReLU SAE with latents +e_d and -e_d: x = relu(x) - relu(-x), exactly."""
    cfg = _cfg("sae", architecture="relu", width=2 * D)
    eye = np.eye(D, dtype=np.float32)
    arrays = {
        "w_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * D, np.float32),
        "w_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(D, np.float32),
    }
    return dictionary_class("sae").from_arrays(cfg, arrays)


def _site(model, tokens, site):
    return np.asarray(model.jitted(capture=(site,), logits=False)(jnp.asarray(tokens)).sites[site])


def test_keep_mask_drops_special_and_padding():
    t = np.array([[BOS_ID, 7, EOS_ID, 9, PAD_ID]])
    np.testing.assert_array_equal(keep_mask(t), [[False, True, False, True, False]])
    np.testing.assert_array_equal(
        keep_mask(t, np.array([[1, 1, 1, 0, 0]])), [[False, True, False, False, False]]
    )


def test_perfect_reconstruction_scores_one(tiny_model, tokens):
    core, density = core_metrics(tiny_model, _identity_sae(), [tokens])
    x = _site(tiny_model, tokens, "resid_post.1")
    x = x[keep_mask(tokens)]
    rq, sh, sp = core["reconstruction_quality"], core["shrinkage"], core["sparsity"]
    assert rq["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rq["mse"] == pytest.approx(0.0, abs=1e-6 * float(np.mean(np.sum(x**2, -1))))
    assert rq["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert sh["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert sh["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert sh["l2_norm_in"] == pytest.approx(np.mean(np.linalg.norm(x, axis=-1)), rel=1e-5)
    assert core["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert core["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert core["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    # sparsity by hand: latent d fires where x_d > 0, latent D + d where x_d < 0
    assert sp["l0"] == pytest.approx(np.mean(np.sum(x != 0, -1)))
    assert sp["l1"] == pytest.approx(np.mean(np.sum(np.abs(x), -1)), rel=1e-5)
    want = np.concatenate([np.mean(x > 0, 0), np.mean(x < 0, 0)])
    np.testing.assert_allclose(density, want, atol=1e-12)
    misc = core["misc_metrics"]
    assert misc["frac_alive"] == pytest.approx(np.mean(want > 0))
    assert misc["freq_over_10_percent"] == pytest.approx(np.mean(want > 0.1))
    assert misc["average_max_encoder_cosine_sim"] == pytest.approx(0.0, abs=1e-6)
    assert misc["average_max_decoder_cosine_sim"] == pytest.approx(0.0, abs=1e-6)
    assert core["token_stats"]["total_tokens_eval_sparsity_variance"] == len(x) == 21
    assert core["token_stats"]["total_tokens_eval_reconstruction"] == 21


def test_zero_dictionary_scores_zero(tiny_model, tokens):
    cfg = _cfg("sae")
    zero = dictionary_class("sae")(cfg)  # all-zero parameters: prediction 0 everywhere
    core, density = core_metrics(tiny_model, zero, [tokens], zero_ablate_all_positions=False)
    mpp, mbp = core["model_performance_preservation"], core["model_behavior_preservation"]
    assert mpp["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert mbp["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    x = _site(tiny_model, tokens, "resid_post.1")
    x = x[keep_mask(tokens)].astype(np.float64)
    ev = 1 - np.sum(x**2) / np.sum((x - x.mean(0)) ** 2)
    assert core["reconstruction_quality"]["explained_variance"] == pytest.approx(ev, rel=1e-6)
    assert core["reconstruction_quality"]["cossim"] == 0.0
    assert core["shrinkage"]["l2_ratio"] == 0.0
    assert core["sparsity"]["l0"] == 0.0 and core["misc_metrics"]["frac_alive"] == 0.0
    assert not density.any()


def test_random_sae_against_numpy_and_splice_eval(tiny_model):
    t = np.random.RandomState(4).randint(4, 512, size=(2, 12))
    t[:, 0] = BOS_ID
    d = random_dictionary(_cfg("sae"), seed=2)
    core, density = core_metrics(tiny_model, d, [t[:1], t[1:]], zero_ablate_all_positions=False)
    x = _site(tiny_model, t, "resid_post.1")
    x = x[keep_mask(t)].astype(np.float64)
    f = np.asarray(d.encode(jnp.asarray(x, jnp.float32)), np.float64)
    xh = np.asarray(d(jnp.asarray(x, jnp.float32)), np.float64)
    rq, sh = core["reconstruction_quality"], core["shrinkage"]
    n_in, n_out = np.linalg.norm(x, axis=-1), np.linalg.norm(xh, axis=-1)
    ev = 1 - np.sum((x - xh) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert rq["explained_variance"] == pytest.approx(ev, rel=1e-5)
    assert rq["mse"] == pytest.approx(np.mean(np.sum((x - xh) ** 2, -1)), rel=1e-5)
    assert rq["cossim"] == pytest.approx(np.mean(np.sum(x * xh, -1) / n_in / n_out), rel=1e-5)
    assert sh["l2_ratio"] == pytest.approx(np.mean(n_out / n_in), rel=1e-5)
    rrb = np.mean(n_out**2) / np.mean(np.sum(x * xh, -1))
    assert sh["relative_reconstruction_bias"] == pytest.approx(rrb, rel=1e-5)
    assert core["sparsity"]["l1"] == pytest.approx(np.mean(f.sum(-1)), rel=1e-5)
    np.testing.assert_allclose(density, np.mean(f > 0, 0))
    w = np.asarray(d.w_dec[...], np.float64)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    sims = w @ w.T - 3 * np.eye(len(w))
    want = np.mean(sims.max(1))
    assert core["misc_metrics"]["average_max_decoder_cosine_sim"] == pytest.approx(want, rel=1e-5)
    # CE on the same positions as splice.py (no special tokens after BOS here)
    ref = splice_eval(tiny_model, d, [t], zero_ablation=True)
    mpp = core["model_performance_preservation"]
    assert mpp["ce_loss_without_sae"] == pytest.approx(ref["ce_clean"], rel=1e-5)
    assert mpp["ce_loss_with_sae"] == pytest.approx(ref["ce_spliced"], rel=1e-5)
    assert mpp["ce_loss_with_ablation"] == pytest.approx(ref["ce_zero"], rel=1e-5)


def test_max_cosine_sim_against_brute_force():
    v = np.random.default_rng(0).standard_normal((300, 5))  # 300: crosses a 256-row chunk
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    sims = u @ u.T - 3 * np.eye(300)
    np.testing.assert_allclose(max_cosine_sim(v), sims.max(1), atol=1e-5)
    neg = np.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(max_cosine_sim(neg), [-1.0, -1.0], atol=1e-6)


# ---- absorption -------------------------------------------------------------------------------


def test_absorption_fraction_by_hand():
    cos = np.array([0.9, 0.5, 0.05, 0.3])
    # main latent 0 carries everything: no absorption
    assert ab.absorption_fraction(1.0, 1.0, np.array([1.0, 0, 0, 0]), cos, [0]) == 0.0
    # main latent silent, latents 1 and 3 carry 0.5 + 0.3 of P = 1: full absorption fraction
    proj = np.array([0.0, 0.5, 0.02, 0.3])
    assert ab.absorption_fraction(1.0, 0.0, proj, cos, [0]) == 1.0
    # main carries 0.2, absorbers 0.5 + 0.3 (>= 40 % of P): A = min(0.8, 0.8) -> 0.8 / 1.0
    assert ab.absorption_fraction(1.0, 0.2, proj, cos, [0]) == pytest.approx(0.8)
    # absorbers below 40 % of P: 0
    assert ab.absorption_fraction(1.0, 0.2, proj * 0.4, cos, [0]) == 0.0
    codes = np.array([0.0, 1.0, 0.4, 1.0])
    assert ab.is_full_absorption(1.0, codes, proj, cos, [0])
    assert not ab.is_full_absorption(1.0, codes + [1e-3, 0, 0, 0], proj, cos, [0])


def test_absorption_planted():
    """26 letter directions plus noise; a dictionary whose latents are the letter directions
    finds every letter with one main latent and no absorption. Moving the 's' words onto a
    separate latent (same direction) makes their absorption fraction 1."""
    rng = np.random.default_rng(0)
    n, dim = 26 * 30, 40
    letters = np.repeat(np.arange(26), 30)
    dirs = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:26]
    acts = 3 * dirs[letters] + 0.05 * rng.standard_normal((n, dim))
    codes = np.maximum(acts @ dirs.T, 0)
    codes[codes < 1] = 0
    out = ab.absorption_from_arrays(acts, codes, dirs, letters, max_k=3)
    assert out["letters_evaluated"] == 26
    assert out["mean_absorption_fraction_score"] == pytest.approx(0.0, abs=1e-9)
    assert out["mean_num_split_features"] == 0
    # a latent with a direction partly along 's' takes over from the 's' latent on half of
    # the 's' test words (and never fires in training): those words are fully absorbed
    s = ab.LETTERS.index("s")
    train = np.zeros(n, bool)
    train[np.flatnonzero(np.arange(n) % 30 < 20)] = True
    absorbed = np.flatnonzero((letters == s) & ~train)[::2]
    extra = 0.6 * dirs[s] + 0.8 * np.linalg.qr(rng.standard_normal((dim, dim)))[0][0]
    codes2 = np.concatenate([codes, np.zeros((n, 1))], 1)
    codes2[absorbed, 26], codes2[absorbed, s] = 3.0, 0.0
    w_dec = np.concatenate([dirs, extra[None] / np.linalg.norm(extra)])
    out2 = ab.absorption_from_arrays(acts, codes2, w_dec, letters, train=train)
    row = next(r for r in out2["per_letter"] if r["letter"] == "s")
    assert row["split_feats"] == [s] and row["num_probe_true_positives"] == 10
    assert row["mean_absorption_fraction"] == pytest.approx(0.5)
    assert row["full_absorption_rate"] == pytest.approx(0.5)


# ---- cards for every kind --------------------------------------------------------------------


def _kinds():
    set_members = [
        random_dictionary(_cfg("transcoder", layers=(i,), width=16), seed=i) for i in range(L)
    ]
    return {
        "sae": random_dictionary(_cfg("sae"), seed=1),
        "transcoder": random_dictionary(_cfg("transcoder"), seed=1),
        "skip_transcoder": random_dictionary(_cfg("skip_transcoder"), seed=1),
        "clt": random_dictionary(_cfg("clt", layers=(0, 1, 2)), seed=1),
        "crosscoder": random_dictionary(_cfg("crosscoder", layers=(0, 2)), seed=1),
        "transcoder_set": TranscoderSet.from_transcoders(set_members),
    }


@pytest.mark.parametrize(
    "kind", ["sae", "transcoder", "skip_transcoder", "clt", "crosscoder", "transcoder_set"]
)
def test_card_for_every_kind(tiny_model, tokens, tmp_path, kind):
    d = _kinds()[kind]
    card = write_card(d, tiny_model, tokens, tmp_path)
    saved = json.loads((tmp_path / "card.json").read_text())
    assert saved == card and saved["dictionary"]["kind"] == kind
    core = card["saebench_core"]
    for group, key in [
        ("model_behavior_preservation", "kl_div_score"),
        ("model_performance_preservation", "ce_loss_score"),
        ("reconstruction_quality", "explained_variance"),
        ("shrinkage", "relative_reconstruction_bias"),
        ("sparsity", "l0"),
        ("misc_metrics", "freq_over_10_percent"),
        ("misc_metrics", "average_max_decoder_cosine_sim"),
    ]:
        assert isinstance(core[group][key], float), (group, key)
    n_layers = {"clt": L, "crosscoder": 2, "transcoder_set": L}.get(kind, 1)
    assert len(card["gemma_scope"]["fvu_per_layer"]) == n_layers
    assert "frequency_histogram.png" in card["plots"]
    assert ("fvu_per_layer.png" in card["plots"]) == (n_layers > 1)
    for name in ("card.md", *card["plots"]):
        assert (tmp_path / name).stat().st_size > 0
    assert "ce_loss_score" in (tmp_path / "card.md").read_text()
    assert "skipped" in card["absorption"]  # no tokenizer here


class _WordTokenizer:
    """Each word of a prompt -> an id of the tiny vocabulary (BOS first)."""

    def encode(self, text):
        return [BOS_ID, *(4 + sum(map(ord, word)) % 500 for word in text.split())]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_card_graph_scores(tiny_model, tokens, tmp_path, monkeypatch):
    """Transcoders for every layer get circuit-tracer's graph scores; an SAE says why not."""
    from gemmascope_jax.analysis.attribution import graph_quality

    monkeypatch.setattr(graph_quality, "DEFAULT_PROMPTS", ("the cat sat on the mat",))
    kinds, kw = _kinds(), {"tokenizer": _WordTokenizer(), "absorption": False}
    card = write_card(kinds["transcoder_set"], tiny_model, tokens, tmp_path / "set", **kw)
    scores = card["graph_scores"]
    assert scores["n_prompts"] == 1
    assert scores["per_prompt"][0]["prompt"] == "the cat sat on the mat"
    for which in ("unpruned", "pruned"):
        for name in ("replacement", "completeness"):
            assert 0.0 <= scores[which][name]["min"] <= scores[which][name]["mean"] <= 1.0
    assert "replacement (mean / min)" in (tmp_path / "set" / "card.md").read_text()
    sae = write_card(kinds["sae"], tiny_model, tokens, tmp_path / "sae", **kw)
    assert "not a replacement model" in sae["graph_scores"]["skipped"]
    off = write_card(kinds["clt"], tiny_model, tokens, tmp_path / "off", graph_scores=False, **kw)
    assert off["graph_scores"] == {"skipped": "disabled"}


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_vocab_dir(tmp_path_factory, gguf_path):
    """A tiny random Gemma 3 with the real vocabulary and tokenizer (as tests/test_trainer.py)."""
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf
    from tests.hf_reference import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny_full_vocab")
    tiny_causal_lm(seed=1, vocab_size=262_144).save_pretrained(path)
    load_tokenizer_from_gguf(gguf_path).save(path)
    return path


def test_cli_evaluate_saelens_sae(full_vocab_dir, tmp_path, capsys):
    from gemmascope_jax.cli import main
    from gemmascope_jax.formats import save_dictionary

    d = random_dictionary(_cfg("sae", layers=(2,)), seed=5)
    save_dictionary(d, tmp_path / "sae", format="saelens")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat.\n\nA second paragraph, about dogs and parks.\n")
    argv = ["evaluate", str(tmp_path / "sae"), "--model", str(full_vocab_dir)]
    argv += ["--text-file", str(text), "--tokens", "64", "--seq-len", "16", "--out"]
    argv += [str(tmp_path / "card"), "--json", "--no-absorption"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    card = json.loads(last)
    assert card["dictionary"]["kind"] == "sae" and card["data"]["seq_len"] == 16
    assert card == json.loads((tmp_path / "card" / "card.json").read_text())
    assert main(argv) == 0  # our own earlier card is replaced
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    argv[argv.index(str(tmp_path / "card"))] = str(user)
    assert main(argv) == 2  # a folder we did not make: refused before evaluating
    assert "--force" in capsys.readouterr().err and (user / "notes.txt").read_text() == "mine"


def test_cli_evaluate_bad_paths(full_vocab_dir, tmp_path, capsys):
    from gemmascope_jax.cli import main
    from gemmascope_jax.formats import save_dictionary

    assert main(["evaluate", str(tmp_path / "nope"), "--model", str(full_vocab_dir)]) == 2
    assert capsys.readouterr().err.startswith("gemmascope-jax evaluate: error: ")
    save_dictionary(random_dictionary(_cfg("sae"), seed=5), tmp_path / "sae")
    assert main(["evaluate", str(tmp_path / "sae"), "--model", str(tmp_path / "no_model")]) == 2
    assert capsys.readouterr().err.startswith("gemmascope-jax evaluate: error: ")
    wide = random_dictionary(_cfg("sae", d_in=32, d_out=32), seed=5)  # wrong model width
    save_dictionary(wide, tmp_path / "wide")
    assert main(["evaluate", str(tmp_path / "wide"), "--model", str(full_vocab_dir)]) == 2
    assert "hidden size" in capsys.readouterr().err


def test_first_letter_absorption_runs_on_gemma_vocabulary(full_vocab_dir):
    from gemmascope_jax.gemma3.loading import load_gemma3

    model, tok = load_gemma3(full_vocab_dir, progress=False)
    vocab = ab.alpha_vocab(tok)
    assert len(vocab) > 10_000 and all(w.strip().isalpha() for w, _ in vocab[:50])
    d = random_dictionary(_cfg("sae", layers=(2,)), seed=5)
    out = ab.first_letter_absorption(model, tok, d, words_per_letter=4)
    assert out["words"] == 26 * 4 and len(out["per_letter"]) == 26
    assert out["site"] == "resid_post.2"


# ---- SAEBench 0.6.0 itself (interop venv) ------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = Path(
    os.environ.get("GEMMASCOPE_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python")
)
SAEBENCH_HARNESS = REPO / "scripts" / "interop" / "saebench_core.py"
SAME_DEFINITION = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": (
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    ),
    "reconstruction_quality": ("cossim",),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio"),
    "sparsity": ("l0", "l1"),
    "misc_metrics": (
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
    ),
}


def test_core_metrics_agree_with_saebench(tmp_path):
    """The same SAE (SAELens format), model and token batches through SAEBench 0.6.0's core
    eval (TransformerLens' Gemma 3) and ours: every metric with SAEBench's definition agrees to
    1e-3 relative; `mse`, `explained_variance` and `relative_reconstruction_bias`, whose
    SAEBench formulas depend on the batching, agree with `saebench_0_6_0` (docs/evaluate.md)."""
    import subprocess

    from gemmascope_jax.formats import load_dictionary, save_dictionary
    from gemmascope_jax.gemma3.loading import load_gemma3
    from tests.hf_reference import tiny_causal_lm

    probe = (
        subprocess.run(
            [str(INTEROP_PYTHON), "-c", "import sae_bench.evals.core.main"], capture_output=True
        )
        if INTEROP_PYTHON.exists()
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip(f"sae-bench 0.6.0 is not importable with {INTEROP_PYTHON} (docs/evaluate.md)")
    # TransformerLens' Gemma 3 has no RoPE scaling and scales attention by head_dim
    hf = tiny_causal_lm(
        seed=0,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
        sliding_window=64,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    hf.save_pretrained(tmp_path / "model")
    d = random_dictionary(_cfg("sae", width=96, model_name="gemma-3-tiny"), seed=3)
    d = d.with_arrays(threshold=d.threshold[...] * 12)  # sparse enough for the density metrics
    save_dictionary(d, tmp_path / "sae", format="saelens")
    t = np.random.RandomState(0).randint(4, 512, size=(4, 16))
    t[:, 0], t[2, 7] = BOS_ID, EOS_ID
    np.save(tmp_path / "tokens.npy", t)
    argv = [str(tmp_path / "model"), str(tmp_path / "sae"), str(tmp_path / "tokens.npy")]
    argv += [str(tmp_path / "sb.json"), "--batch-size", "2", "--ignore", "0", "1", "2", "105"]
    argv += ["106"]
    proc = subprocess.run(
        [str(INTEROP_PYTHON), str(SAEBENCH_HARNESS), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peer = json.loads((tmp_path / "sb.json").read_text())
    assert peer["tl_vs_hf_max_abs"] < 1e-4 and peer["hook_name"] == "blocks.1.hook_resid_post"
    model, _ = load_gemma3(tmp_path / "model", tokenizer=False, progress=False)
    ours, _ = core_metrics(model, load_dictionary(tmp_path / "sae"), [t[:2], t[2:]])
    sb = peer["metrics"]
    for group, keys in SAME_DEFINITION.items():
        for key in keys:
            assert ours[group][key] == pytest.approx(sb[group][key], rel=1e-3, abs=1e-9), key
    assert 0 < sb["misc_metrics"]["freq_over_10_percent"] < 1  # a non-trivial density test
    quirks = ours["saebench_0_6_0"]
    for group, key in [
        ("reconstruction_quality", "mse"),
        ("reconstruction_quality", "explained_variance"),
        ("shrinkage", "relative_reconstruction_bias"),
    ]:
        assert quirks[key] == pytest.approx(sb[group][key], rel=1e-3), key
    # SAEBench counts every token it reads; we count the kept ones (4 x 16 - 4 BOS - 1 EOS)
    assert sb["token_stats"]["total_tokens_eval_reconstruction"] == 64
    assert ours["token_stats"]["total_tokens_eval_reconstruction"] == 59
