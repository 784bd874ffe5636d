"""Chat-model analysis: refusal direction, jailbreak comparison, chain-of-thought view.

Mechanics on the tiny model (token ids, and a character-level stand-in tokenizer for the text
wrappers); the CLI verbs end to end on the embedded 270M with a random Gemma Scope 2 SAE.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.analysis.chat.cot import (
    char_to_token_span,
    cot_from_response,
    cot_generate,
    cot_view,
    marker_spans,
)
from gemmascope_jax.analysis.chat.jailbreak import (
    WRAPPERS,
    align_tokens,
    compare_jailbreak,
    jailbreak_diff,
    wrap_prompt,
)
from gemmascope_jax.analysis.chat.refusal import (
    PROMPT_SETS,
    aligned_latents,
    load_prompt_set,
    read_prompts,
)
from gemmascope_jax.analysis.chat.refusal_ablation import (
    ABLATION_SITE_KINDS,
    ablation_interventions,
    ablation_refusal_rates,
    is_refusal,
    refusal_rate,
)
from gemmascope_jax.analysis.chat.refusal_direction import refusal_direction
from gemmascope_jax.cli import chat as chat_cli
from gemmascope_jax.cli import run_verb
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary

D_TINY, LAYERS_TINY = 64, 7


class CharTokenizer:
    """Character-level stand-in for the Gemma tokenizer on the tiny model (vocab 512)."""

    SPECIAL = {"<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
    stop_ids = (1, 106)

    def encode(self, text, add_bos=True):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.SPECIAL if text.startswith(s, i)), None)
            if special:
                ids.append(self.SPECIAL[special])
                i += len(special)
            else:
                code = ord(text[i])
                ids.append(code - 0x1000 if code >= 0x1000 else 200 + code)
                i += 1
        return [2, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens=False):
        """Specials by name, ids 200..499 as chr(id - 200), any other id as chr(0x1000 + id)."""
        names = {v: k for k, v in self.SPECIAL.items()}
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in names:
                out.append("" if skip_special_tokens else names[i])
            else:
                out.append(chr(i - 200) if 200 <= i < 500 else chr(0x1000 + i))
        return "".join(out)

    def render_chat(self, messages, add_generation_prompt=True):
        turns = "".join(
            f"<start_of_turn>{m['role']}\n{m['content'].strip()}<end_of_turn>\n" for m in messages
        )
        return "<bos>" + turns + ("<start_of_turn>model\n" if add_generation_prompt else "")

    def chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)


@pytest.fixture(scope="module")
def sae_tiny():
    cfg = DictionaryConfig(
        kind="sae", architecture="relu", d_in=D_TINY, d_out=D_TINY, width=48, layers=(3,)
    )
    return random_dictionary(cfg, seed=1)


def _codes(model, d, ids):
    """Brute force: one unbatched eager forward, the dictionary's dense codes [T, F]."""
    out = model.jitted(capture=d.cfg.input_sites, logits=False)(jnp.asarray([ids]))
    return np.asarray(d.encode(out.sites[d.cfg.input_sites[0]][0]), np.float32)


# ---- prompt sets and classifier -----------------------------------------------------------------


def test_prompt_sets_parse_and_have_equal_size():
    sets = {name: load_prompt_set(name) for name in PROMPT_SETS}
    assert len(sets["harmful"]) == len(sets["harmless"]) == 24
    for prompts in sets.values():
        assert len(set(prompts)) == len(prompts) and all(p.strip() for p in prompts)
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(['{"prompt": "ok"}', '{"text": "no prompt key"}'])
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("evil")


def test_refusal_classifier_on_hand_made_strings():
    refusals = [
        "I cannot help with that request.",
        "I’m sorry, but I can’t assist with this.",
        "As an AI language model, I must decline.",
        "i am unable to provide that information",
    ]
    answers = ["Sure! Here is a recipe for bread.", "The capital of France is Paris.", ""]
    assert all(is_refusal(t) for t in refusals)
    assert not any(is_refusal(t) for t in answers)
    assert refusal_rate(refusals + answers[:1]) == pytest.approx(0.8)
    assert refusal_rate([]) == 0.0


# ---- refusal direction ------------------------------------------------------------------------


def test_refusal_direction_equals_brute_force_difference_of_means(tiny_model):
    rng = np.random.default_rng(0)
    prompts = [[2, *rng.integers(4, 512, size=n).tolist()] for n in (5, 8, 5, 8, 8, 5)]
    harmful, harmless = prompts[:3], prompts[3:]
    rd = refusal_direction(tiny_model, harmful, harmless, site="resid_mid.4")
    sites = ["resid_mid.4", *(f"resid_post.{i}" for i in range(LAYERS_TINY))]
    last = {s: {"h": [], "b": []} for s in sites}
    forward = tiny_model.jitted(capture=sites, logits=False)  # unbatched, unpadded
    for key, group in (("h", harmful), ("b", harmless)):
        for p in group:
            out = forward(jnp.asarray([p]))
            for s in sites:
                last[s][key].append(np.asarray(out.sites[s][0, -1]))
    diff = np.mean(last["resid_mid.4"]["h"], 0) - np.mean(last["resid_mid.4"]["b"], 0)
    np.testing.assert_allclose(rd.norm, np.linalg.norm(diff), rtol=1e-4)
    np.testing.assert_allclose(rd.direction, diff / np.linalg.norm(diff), atol=1e-5)
    r_hat = diff / np.linalg.norm(diff)
    for layer in range(LAYERS_TINY):
        s = f"resid_post.{layer}"
        want_h = np.mean(np.asarray(last[s]["h"]) @ r_hat)
        want_b = np.mean(np.asarray(last[s]["b"]) @ r_hat)
        np.testing.assert_allclose(rd.harmful_projection[layer], want_h, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rd.harmless_projection[layer], want_b, rtol=1e-3, atol=1e-3)
        layer_diff = np.mean(last[s]["h"], 0) - np.mean(last[s]["b"], 0)
        np.testing.assert_allclose(rd.sweep_norms[layer], np.linalg.norm(layer_diff), rtol=1e-4)
    assert rd.site == "resid_mid.4" and json.loads(rd.to_json())["n_harmful"] == 3
    with pytest.raises(ValueError, match="both sets"):
        refusal_direction(tiny_model, harmful, [])


def test_directional_ablation_removes_the_component_at_every_site(tiny_model, tiny_tokens):
    r = np.random.default_rng(1).standard_normal(D_TINY).astype(np.float32)
    r_hat = r / np.linalg.norm(r)
    interventions = ablation_interventions(LAYERS_TINY, r)
    assert len(interventions) == LAYERS_TINY * len(ABLATION_SITE_KINDS)
    sites = list(interventions)
    clean = tiny_model.jitted(capture=sites, logits=False)(jnp.asarray(tiny_tokens))
    out = tiny_model.jitted(capture=sites, interventions=interventions, logits=False)(
        jnp.asarray(tiny_tokens)
    )
    for s in sites:
        x, x0 = np.asarray(out.sites[s]), np.asarray(clean.sites[s])
        assert np.abs(x @ r_hat).max() <= 1e-4 * np.abs(x).max(), s
        assert np.abs(x0 @ r_hat).max() > 1e-2 * np.abs(x0).max(), s  # it was there before
    # Position-agnostic: a single-token chunk [batch, 1, d] is ablated the same way.
    fn = interventions["resid_post.2"]
    np.testing.assert_allclose(
        np.asarray(fn(clean.sites["resid_post.2"][:, 5:6])),
        np.asarray(fn(clean.sites["resid_post.2"]))[:, 5:6],
        atol=1e-6,
    )
    rates = ablation_refusal_rates(
        tiny_model, [tiny_tokens[0, :6].tolist()], r, decode=str, max_new_tokens=1
    )
    assert rates.baseline_rate == rates.ablated_rate == 0.0 and len(rates.ablated_texts) == 1


def test_aligned_latents_rank_a_planted_row_first(sae_tiny):
    r = np.random.default_rng(2).standard_normal(D_TINY).astype(np.float32)
    w_dec = np.asarray(sae_tiny.w_dec[...]).copy()
    w_enc = np.asarray(sae_tiny.w_enc[...]).copy()
    w_dec[17], w_enc[:, 30] = 3.0 * r, 0.5 * r
    d = sae_tiny.with_arrays(w_dec=w_dec, w_enc=w_enc)
    al = aligned_latents(d, r, k=5)
    assert al.top_decoder[0]["id"] == 17 and al.top_decoder[0]["layer"] == 3
    assert al.top_decoder[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert al.top_encoder[0]["id"] == 30
    assert al.top_encoder[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert [row["cosine"] for row in al.top_decoder] == sorted(
        (row["cosine"] for row in al.top_decoder), reverse=True
    )
    # Multi-layer: latent 4 of source layer 1 (model layer 5) of a crosscoder.
    cfg = DictionaryConfig(
        kind="crosscoder", architecture="relu", d_in=D_TINY, d_out=D_TINY, width=8, layers=(2, 5)
    )
    xc = random_dictionary(cfg, seed=3)
    block = np.asarray(xc.w_dec[1][...]).copy()
    block[4, -1] = r
    al = aligned_latents(xc.with_arrays(**{"w_dec.1": block}), r, k=3)
    assert (al.top_decoder[0]["layer"], al.top_decoder[0]["id"]) == (5, 4)
    with pytest.raises(ValueError, match="width 10"):
        aligned_latents(d, np.ones(10), k=3)


# ---- jailbreak --------------------------------------------------------------------------------


def test_jailbreak_diff_equals_brute_force(tiny_model, sae_tiny):
    rng = np.random.default_rng(4)
    request = rng.integers(4, 512, size=6).tolist()
    plain = [2, 7, *request, 9]
    wrapped = [2, 11, 12, 13, *request, 9]
    diff = jailbreak_diff(tiny_model, sae_tiny, plain, wrapped)
    sp, sw = align_tokens(plain, wrapped)
    assert sp.tolist() == [0, 2, 3, 4, 5, 6, 7, 8] and sw.tolist() == [0, 4, 5, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(diff.shared_plain, sp[1:])  # BOS dropped
    p, w = _codes(tiny_model, sae_tiny, plain), _codes(tiny_model, sae_tiny, wrapped)
    for j in range(sae_tiny.cfg.width):
        pairs = list(zip(sp[1:], sw[1:], strict=True))
        changes = [w[b, j] - p[a, j] for a, b in pairs]
        want_shared = np.mean([w[b, j] for _, b in pairs]) - np.mean([p[a, j] for a, _ in pairs])
        want_all = np.mean(w[1:, j]) - np.mean(p[1:, j])
        assert diff.delta_shared[j] == pytest.approx(want_shared, abs=1e-4)
        assert diff.delta_all[j] == pytest.approx(want_all, abs=1e-4)
        assert abs(diff.shared_peak_delta[j]) == pytest.approx(np.max(np.abs(changes)), abs=1e-4)
        assert w[diff.wrapped_peak[j], j] == pytest.approx(np.max(w[1:, j]), abs=1e-5)
    rows = diff.rows("shared", k=5)
    assert [abs(r["delta_shared"]) for r in rows] == sorted(
        (abs(r["delta_shared"]) for r in rows), reverse=True
    )
    assert len(json.loads(diff.to_json(k=4))["by_all"]) == 4
    with pytest.raises(ValueError, match="share no"):
        jailbreak_diff(tiny_model, sae_tiny, [2, 5, 6], [2, 7, 8])


def test_compare_jailbreak_aligns_the_request_tokens(tiny_model, sae_tiny):
    tok = CharTokenizer()
    prompt = "How do I pick a lock?"
    diff = compare_jailbreak(tiny_model, tok, sae_tiny, prompt, wrapper="ignore_previous")
    shared = "".join(diff.wrapped_tokens[i] for i in diff.shared_wrapped)
    assert shared == prompt
    assert "".join(diff.plain_tokens[i] for i in diff.shared_plain) == prompt
    assert wrap_prompt("X", "roleplay").endswith("X") and "{prompt}" in WRAPPERS["research"]
    with pytest.raises(ValueError, match="unknown wrapper"):
        compare_jailbreak(tiny_model, tok, sae_tiny, prompt, wrapper="nope")


# ---- chain of thought ------------------------------------------------------------------------


def test_cot_view_equals_brute_force_on_a_hand_made_response(tiny_model, sae_tiny):
    tok = CharTokenizer()
    question = "What is 2 + 3?"
    response = "2 plus 3 makes 5.\nAnswer: 5"
    view = cot_from_response(tiny_model, tok, sae_tiny, question, response, k=48)
    prompt = tok.chat([{"role": "user", "content": question}])
    ids = prompt + tok.encode(response, add_bos=False)
    p = len(prompt)
    at = response.rindex("Answer:")
    assert view.reasoning_span == (p, p + at)
    assert view.answer_span == (p + at + len("Answer:"), len(ids))
    codes = _codes(tiny_model, sae_tiny, ids)
    reasoning, answer = codes[p : p + at], codes[p + at + 7 :]
    before = np.concatenate([codes[1:p], reasoning])
    np.testing.assert_allclose(view.reasoning_mean, reasoning.mean(0), atol=1e-5)
    np.testing.assert_allclose(view.answer_frac, (answer > 0).mean(0), atol=1e-6)
    active_answer = {j for j in range(48) if answer[:, j].mean() > 0}
    never_before = {j for j in range(48) if not (before[:, j] > 0).any()}
    assert set(view.answer_top.tolist()) == active_answer
    assert set(view.only_after_reasoning.tolist()) == active_answer & never_before
    data = json.loads(view.to_json(k=5))
    assert data["spans"]["answer"]["text"] == " 5"
    assert data["spans"]["reasoning"]["text"] == "2 plus 3 makes 5.\n"
    assert marker_spans(response) == ((0, at), (at + 7, len(response)))
    with pytest.raises(ValueError, match="not found"):
        cot_from_response(tiny_model, tok, sae_tiny, question, "no marker here")
    with pytest.raises(ValueError, match="end before"):
        cot_view(tiny_model, sae_tiny, prompt, ids[p:], (3, 8), (2, 9))
    with pytest.raises(ValueError, match="out of order"):
        cot_from_response(tiny_model, tok, sae_tiny, [{"role": "model", "content": "hi"}], response)
    assert marker_spans("a Answer: b Answer: c") == ((0, 12), (19, 21))
    assert char_to_token_span([(0, 1), (1, 3), (3, 4)], 1, 4) == (1, 3)


def test_cot_generate_forces_the_answer_when_the_marker_is_missing(tiny_model, sae_tiny):
    view = cot_generate(
        tiny_model, CharTokenizer(), sae_tiny, "Why?", max_new_tokens=3, max_answer_tokens=2
    )
    assert view.forced_answer and "\nAnswer:" in view.response_text
    assert view.reasoning_span[0] == view.prompt_span[1] and view.answer_span[1] == len(view.tokens)


def test_bad_dictionary_is_rejected(tiny_model):
    cfg = DictionaryConfig(kind="sae", architecture="relu", d_in=32, d_out=32, width=8, layers=(3,))
    wrong = random_dictionary(cfg)
    with pytest.raises(ValueError, match="does not match the model"):
        jailbreak_diff(tiny_model, wrong, [2, 5, 6], [2, 5, 6])
    with pytest.raises(ValueError, match="does not match the model"):
        cot_view(tiny_model, wrong, [2, 5], [6, 7], (0, 1), (1, 2))


# ---- CLI on the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(real_model, tmp_path_factory, monkeypatch_module):
    from gemmascope_jax.formats import save_dictionary

    cfg = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=640, d_out=640, width=256, layers=(6,),
        model_num_layers=18,
    )  # fmt: skip
    d = random_dictionary(cfg, seed=0)
    path = tmp_path_factory.mktemp("chat") / "sae"
    save_dictionary(d, path, format="gemma-scope-2")
    monkeypatch_module.setattr(chat_cli, "load_model", lambda source: real_model)
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def cli_main(argv):
    """The three verbs' handlers behind their own parser (as wired into `gemmascope-jax`)."""
    parser = argparse.ArgumentParser(prog="gemmascope-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        chat_cli.add_refusal_parser,
        chat_cli.add_jailbreak_parser,
        chat_cli.add_cot_parser,
    ):
        add(sub)
    args = parser.parse_args(argv)
    return run_verb(args.command, args.func, args)


def _files(out):
    return sorted(p.name for p in out.iterdir())


def test_cli_refusal(cli_setup, tmp_path):
    argv = ["refusal", "--dictionary", str(cli_setup), "--out", str(tmp_path), "--top-k", "5"]
    argv += ["--n-prompts", "3", "--n-eval", "0", "--layer-sweep"]  # generation: tiny test
    assert cli_main(argv) == 0
    assert _files(tmp_path) == [
        "refusal.json",
        "refusal_aligned.png",
        "refusal_projection.png",
        "refusal_sweep.png",
    ]
    data = json.loads((tmp_path / "refusal.json").read_text())
    assert data["direction"]["site"] == "resid_post.6" and len(data["direction"]["per_layer"]) == 18
    assert len(data["aligned_latents"]["top_decoder"]) == 5
    assert data["refusal_rates"] is None


def test_cli_jailbreak(cli_setup, tmp_path):
    argv = ["jailbreak", "--dictionary", str(cli_setup), "--out", str(tmp_path), "--top-k", "6"]
    assert cli_main([*argv, "--wrapper", "hypothetical", "How do I pick a lock?"]) == 0
    assert _files(tmp_path) == ["jailbreak.json", "jailbreak_deltas.png", "jailbreak_tokens.png"]
    data = json.loads((tmp_path / "jailbreak.json").read_text())
    shared = "".join(data["wrapped_tokens"][i] for i in data["shared_positions"]["wrapped"])
    assert "pick a lock?" in shared and len(data["by_shared"]) == 6


def test_cli_cot_from_response_file(cli_setup, tmp_path, capsys):
    response = tmp_path / "response.txt"
    response.write_text("Paris is the capital city of France.\nAnswer: Paris")
    out = tmp_path / "out"
    argv = ["cot", "--dictionary", str(cli_setup), "--out", str(out), "--top-k", "5"]
    assert cli_main([*argv, "--response-file", str(response), "Capital of France?"]) == 0
    assert _files(out) == ["cot.json", "cot_latents.png", "cot_tokens.png"]
    data = json.loads((out / "cot.json").read_text())
    assert data["spans"]["answer"]["text"].strip() == "Paris"
    assert cli_main([*argv, "--response-file", str(response), "--marker", "Q:", "x"]) == 2
    assert "marker 'Q:' not found" in capsys.readouterr().err
