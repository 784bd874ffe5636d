"""Steering, clamping, ablation and splicing interventions on the tiny model, and the
`steer` CLI on a tiny checkpoint with a character-level tokenizer."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.analysis.steering import (
    ablate_interventions,
    clamp_interventions,
    decoder_direction,
    splice_interventions,
    steer,
    steer_interventions,
)
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary

LATENTS = [3, 11]


def _dictionary(kind, layers, width=32, seed=0, d=64):
    cfg = DictionaryConfig(
        kind=kind,
        architecture="jumprelu",
        d_in=d,
        d_out=d,
        width=width,
        layers=layers,
        model_num_layers=7,
    )
    return random_dictionary(cfg, seed)


@pytest.fixture(scope="module")
def sae():
    return _dictionary("sae", (3,))


@pytest.fixture(scope="module")
def transcoder():
    return _dictionary("skip_transcoder", (2,), seed=1)


@pytest.fixture(scope="module")
def clt():
    return _dictionary("clt", (1, 2, 4), seed=2)


@pytest.fixture(scope="module")
def tokens(tiny_tokens):
    return jnp.asarray(tiny_tokens[:, :12])


def _sites(model, tokens, interventions=None, sites=("resid_post.3",)):
    out = model(tokens, capture=sites, interventions=interventions, logits=False)
    return {s: np.asarray(out.sites[s], np.float32) for s in sites}


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_raw_and_norm_steering_add_the_direction(tiny_model, tokens, sae):
    x = _sites(tiny_model, tokens)["resid_post.3"]
    d_f = _unit(sae.w_dec[LATENTS[0]]) + _unit(sae.w_dec[LATENTS[1]])
    raw = _sites(tiny_model, tokens, steer_interventions(sae, LATENTS, 4.0, mode="raw"))
    np.testing.assert_allclose(
        raw["resid_post.3"] - x, np.broadcast_to(4.0 * d_f, x.shape), atol=1e-5
    )
    norm = _sites(tiny_model, tokens, steer_interventions(sae, LATENTS, 0.5, mode="norm"))
    expected = 0.5 * np.linalg.norm(x, axis=-1, keepdims=True) * d_f
    np.testing.assert_allclose(norm["resid_post.3"] - x, expected, rtol=1e-5, atol=1e-4)


def test_clamp_and_ablate_on_an_sae(tiny_model, tokens, sae):
    x = _sites(tiny_model, tokens)["resid_post.3"]
    codes = np.asarray(sae.encode(jnp.asarray(x)))[..., LATENTS]
    assert (codes > 0).any()  # the ablation below removes something
    rows = np.asarray(sae.w_dec[...])[LATENTS]
    clamped = _sites(tiny_model, tokens, clamp_interventions(sae, LATENTS, 7.0))["resid_post.3"]
    np.testing.assert_allclose(clamped - x, (7.0 - codes) @ rows, atol=1e-4)
    ablated = _sites(tiny_model, tokens, ablate_interventions(sae, LATENTS))["resid_post.3"]
    np.testing.assert_allclose(ablated - x, -codes @ rows, atol=1e-4)


def test_transcoder_clamp_reads_input_writes_output(tiny_model, tokens, transcoder):
    sites = ("mlp_in.2", "mlp_out.2")
    base = _sites(tiny_model, tokens, sites=sites)
    new = _sites(tiny_model, tokens, clamp_interventions(transcoder, [5], 3.0), sites=sites)
    np.testing.assert_array_equal(new["mlp_in.2"], base["mlp_in.2"])
    f = np.asarray(transcoder.encode(jnp.asarray(base["mlp_in.2"])))[..., 5:6]
    expected = (3.0 - f) * np.asarray(transcoder.w_dec[5])
    np.testing.assert_allclose(new["mlp_out.2"] - base["mlp_out.2"], expected, atol=1e-4)


def test_splice(tiny_model, tokens, sae, transcoder):
    x = _sites(tiny_model, tokens)["resid_post.3"]
    same = _sites(tiny_model, tokens, splice_interventions(sae, keep_error=True))
    np.testing.assert_allclose(same["resid_post.3"], x, atol=1e-4)
    spliced = _sites(tiny_model, tokens, splice_interventions(sae))["resid_post.3"]
    np.testing.assert_allclose(spliced, np.asarray(sae(jnp.asarray(x))), atol=1e-4)
    sites = ("mlp_in.2", "mlp_out.2")
    out = _sites(tiny_model, tokens, splice_interventions(transcoder), sites=sites)
    pred = transcoder(jnp.asarray(out["mlp_in.2"]))
    np.testing.assert_allclose(out["mlp_out.2"], np.asarray(pred), atol=1e-4)


def test_multilayer_rows_and_splice(tiny_model, tokens, clt):
    site, d_f = decoder_direction(clt, 9, source_layer=1, output_layer=4)
    assert site == "mlp_out.4"
    np.testing.assert_allclose(d_f, _unit(clt.w_dec[0][9, 2]), atol=1e-6)
    with pytest.raises(ValueError, match="write only to layers >= it"):
        decoder_direction(clt, 9, source_layer=2, output_layer=1)
    with pytest.raises(ValueError, match="is not a layer"):
        decoder_direction(clt, 9, source_layer=3)
    ins, outs = [f"mlp_in.{i}" for i in (1, 2, 4)], [f"mlp_out.{i}" for i in (1, 2, 4)]
    got = _sites(tiny_model, tokens, splice_interventions(clt), sites=(*ins, *outs))
    pred = np.asarray(clt(jnp.stack([jnp.asarray(got[s]) for s in ins], axis=-2)))
    for i, s in enumerate(outs):
        np.testing.assert_allclose(got[s], pred[..., i, :], atol=1e-4)


def test_bad_input(tiny_model, sae):
    with pytest.raises(ValueError, match=r"latent id\(s\) \[32\] out of range"):
        steer_interventions(sae, [32], 1.0)
    with pytest.raises(ValueError, match="mode"):
        steer_interventions(sae, [1], 1.0, mode="loud")
    wide = _dictionary("sae", (3,), d=32)
    with pytest.raises(ValueError, match="does not match the model"):
        steer(tiny_model, None, wide, "x", [1], 1.0)


def _char_tokenizer(vocab_size: int):
    """A character-level tokenizer with Gemma's special tokens, inside the tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )


@pytest.fixture(scope="module")
def char_tokenizer(tiny_model):
    from gemmascope_jax.gemma3.tokenizer import Tokenizer

    return Tokenizer(_char_tokenizer(tiny_model.cfg.vocab_size))


def test_generate_text_from_chats_and_strings(tiny_model, char_tokenizer):
    from gemmascope_jax.gemma3.generate import generate, generate_text

    tok, chat = char_tokenizer, [{"role": "user", "content": "Hi there"}]
    texts = generate_text(tiny_model, tok, [chat, "Hello"], max_new_tokens=5)
    ids = [tok.chat(chat), tok.encode("Hello")]
    assert ids[0][:2] == [tok.bos_id, tok.hf.convert_tokens_to_ids("<start_of_turn>")]
    new = generate(tiny_model, ids, max_new_tokens=5, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert texts == [tok.decode(row, skip_special_tokens=True) for row in new]
    with pytest.raises(ValueError, match="roles out of order"):
        generate_text(tiny_model, tok, [[{"role": "model", "content": "Hi"}]])


def test_steer_cli(hf_tiny_dir, char_tokenizer, sae, tmp_path, capsys):
    from gemmascope_jax.cli import main
    from gemmascope_jax.formats import save_dictionary

    model_dir = tmp_path / "model"
    shutil.copytree(hf_tiny_dir, model_dir)
    char_tokenizer.save(model_dir)
    dict_dir = save_dictionary(sae, tmp_path / "sae", format="native")
    out_json = tmp_path / "steer.json"
    args = ["steer", "--model", str(model_dir), "--dictionary", str(dict_dir), "--feature", "3"]
    args += ["--feature", "11", "--alpha", "40", "--mode", "raw", "--max-new-tokens", "6"]
    assert main([*args, "--chat", "--json", str(out_json), "Hello"]) == 0
    printed = capsys.readouterr().out
    assert "== baseline ==" in printed and "== steered ==" in printed
    result = json.loads(out_json.read_text())
    assert result["settings"]["latents"] == [3, 11] and result["settings"]["mode"] == "raw"
    assert result["prompt"] == [{"role": "user", "content": "Hello"}]
    assert 0 < len(result["baseline_ids"]) <= 6
    assert result["steered_ids"] != result["baseline_ids"]
    bad = ["steer", "--model", str(model_dir), "--dictionary", str(dict_dir), "--feature", "99"]
    assert main([*bad, "Hello"]) == 2
    assert "latent id(s) [99] out of range" in capsys.readouterr().err
