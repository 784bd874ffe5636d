"""Rollouts for IT dictionaries (`data.rollouts`): generated chats equal `generate`'s output,
resume after an interruption, prompt-file errors, the loss-token mask, and the trainer on
rollouts of a tiny Gemma 3 saved by transformers (an IT-checkpoint-shaped `model.source`),
started from a previous run's export (`init_from`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gemmascope_jax.data import rollouts as R
from gemmascope_jax.data.activations import ActivationStream
from gemmascope_jax.data.packing import PackedTokens
from gemmascope_jax.data.sources import (
    JsonlSource,
    ListSource,
    LossTokensSource,
    SourceError,
    chat_loss_flags,
)
from gemmascope_jax.gemma3.generate import generate
from tests.hf_reference import tiny_causal_lm

SETTINGS = R.RolloutSettings(max_new_tokens=6, batch_size=2, max_prompts=5)


@pytest.fixture(scope="module")
def it_dir(tmp_path_factory, gguf_path):
    """A tiny randomized Gemma 3 with the real vocabulary and tokenizer, saved by
    transformers: shaped like an IT checkpoint directory given as `model.source`."""
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf

    path = tmp_path_factory.mktemp("tiny_it")
    tiny_causal_lm(seed=1, vocab_size=262_144).save_pretrained(path)
    load_tokenizer_from_gguf(gguf_path).save(path)
    return path


@pytest.fixture(scope="module")
def it_model(it_dir):
    from gemmascope_jax.gemma3.loading import load_gemma3

    return load_gemma3(it_dir, progress=False)


@pytest.fixture(scope="module")
def greedy_rollouts(it_model, tmp_path_factory):
    model, tok = it_model
    out = tmp_path_factory.mktemp("rollouts") / "greedy.jsonl"
    R.generate_rollouts(model, tok, R.load_prompts(None), out, settings=SETTINGS, progress=False)
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_packaged_prompts_are_valid_chats():
    prompts = R.load_prompts(None)
    assert len(prompts) == 40 and R.load_prompts("packaged") == prompts
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert any(p[0]["role"] == "system" for p in prompts)
    assert any(len(p) > 2 and p[1]["role"] == "assistant" for p in prompts)


def test_rollouts_are_chats_with_generates_responses(it_model, greedy_rollouts):
    model, tok = it_model
    prompts = R.load_prompts(None)[:5]
    records = read(greedy_rollouts)
    assert [r["prompt_index"] for r in records] == list(range(5))
    expected = []
    for k in range(0, 5, 2):  # the same batches (the last one filled up with its last prompt)
        ids = [tok.chat(p) for p in prompts[k : k + 2]]
        ids += [ids[-1]] * (2 - len(ids))
        expected += generate(model, ids, max_new_tokens=6, stop_ids=tok.stop_ids)[: len(ids)]
    expected = expected[:5]
    for r, p, new in zip(records, prompts, expected, strict=True):
        assert r["response_ids"] == new
        assert r["messages"][:-1] == p and r["messages"][-1]["role"] == "assistant"
        body = new[:-1] if r["finished"] else new
        assert r["messages"][-1]["content"] == tok.decode(body, skip_special_tokens=True)
        assert r["finished"] == (new[-1] in tok.stop_ids)
    docs = JsonlSource(greedy_rollouts, field="messages")  # the `jsonl` chat source reads them
    assert len(docs) == 5 and docs[0] == records[0]["messages"]
    assert R.meta_path(greedy_rollouts).is_file()
    assert not R.parts_dir(greedy_rollouts).exists()


def test_cli_verb_writes_the_same_rollouts(
    it_dir, it_model, greedy_rollouts, tmp_path, capsys, monkeypatch
):
    from gemmascope_jax.cli import main
    from gemmascope_jax.gemma3 import loading

    loaded = []  # the fixture's model: the same compiled generate, no second load
    monkeypatch.setattr(loading, "load_gemma3", lambda *a, **k: loaded.append(a) or it_model)
    out = tmp_path / "cli.jsonl"
    args = ["rollouts", "packaged", "--model", str(it_dir), "--out", str(out)]
    args += ["--max-new-tokens", "6", "--batch-size", "2", "--max-prompts", "2"]
    assert main(args) == 0
    assert "2 rollouts" in capsys.readouterr().out
    assert read(out) == read(greedy_rollouts)[:2]  # the same first batch
    assert loaded == [(str(it_dir),)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    assert main(["rollouts", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert f"{bad}:1" in capsys.readouterr().err


def test_resume_after_interruption_equals_uninterrupted(it_model, tmp_path, monkeypatch):
    model, tok = it_model
    prompts = R.load_prompts(None)
    sampled = R.RolloutSettings(
        max_new_tokens=6, batch_size=2, temperature=1.0, seed=3, max_prompts=4
    )
    whole = R.generate_rollouts(model, tok, prompts, tmp_path / "whole.jsonl", settings=sampled)

    real, calls = R._generate_batch, []

    def flaky(*args):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while generating batch 1
        return real(*args)

    monkeypatch.setattr(R, "_generate_batch", flaky)
    out = tmp_path / "resumed.jsonl"
    (R.parts_dir(out)).mkdir()
    (R.parts_dir(out) / "notes.txt").write_text("not the generator's")
    with pytest.raises(KeyboardInterrupt):
        R.generate_rollouts(model, tok, prompts, out, settings=sampled, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in R.parts_dir(out).iterdir()) == [
        "manifest.json",
        "notes.txt",
        "part-000000.jsonl",
    ]
    R.generate_rollouts(model, tok, prompts, out, settings=sampled, progress=False)
    assert calls == [0, 1, 1]  # batch 0 was not generated again
    assert out.read_text() == whole.read_text()
    assert [r["prompt_index"] for r in read(out)] == [0, 1, 2, 3]
    assert [p.name for p in R.parts_dir(out).iterdir()] == ["notes.txt"]  # ours removed only

    calls.clear()  # same settings: reused, nothing generated
    R.generate_rollouts(model, tok, prompts, out, settings=sampled, progress=False)
    assert calls == []
    other = R.RolloutSettings(max_new_tokens=7, batch_size=2, max_prompts=4)
    with pytest.raises(R.RolloutError, match="other settings.*max_new_tokens"):
        R.generate_rollouts(model, tok, prompts, out, settings=other, progress=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(R.RolloutError, match="not written by the rollout generator"):
        R.generate_rollouts(model, tok, prompts, foreign, settings=sampled, progress=False)
    assert foreign.read_text() == "{}\n"


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"messages": [{"role": "user", "content": "hi"}]}', "{not json"], r":2: invalid JSON"),
        (['{"messages": [{"content": "hi"}]}'], r":1: turn 0 is not a \{role, content\}"),
        (['{"messages": [{"role": "assistant", "content": "hi"}]}'], r":1: turn 0 has role"),
        (['[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'], "end"),
        (['{"prompt": "hi"}'], r":1: field 'messages' missing"),
        (['{"messages": [{"role": "user", "content": ""}]}'], r":1: turn 0 content"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=match) as e:
        R.load_prompts(path)
    assert str(path) in str(e.value)


def test_loss_token_mask_selects_response_tokens(it_model):
    _, tok = it_model
    chat = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    ids = np.asarray(tok.chat(chat, add_generation_prompt=False))
    response = chat_loss_flags(tok, chat, "response")
    assert tok.decode(ids[response]) == "It is 4.<end_of_turn>\n"
    assert tok.decode(ids[1:][~response[1:]]) == tok.render_chat(chat[:1])[len("<bos>") :]
    np.testing.assert_array_equal(chat_loss_flags(tok, chat, "prompt")[1:], ~response[1:])
    assert chat_loss_flags(tok, chat, "all")[1:].all() and not response[0]

    # Through packing (windows of 8 cut the chat; a continuation <bos> never counts) into
    # the activation stream, which drops the other positions without changing attention.
    docs = LossTokensSource(ListSource([chat, "plain text counts whole"]), "response")
    packed = PackedTokens(
        docs, tok, seq_len=8, batch_size=2, shuffle=False, num_epochs=1, loss_mask=True
    )
    batches = list(packed)
    kept = [t[m] for b in batches for t, m in zip(b["tokens"], b["loss_mask"], strict=True)]
    text_ids = tok.encode("plain text counts whole")[1:]
    assert np.concatenate(kept).tolist() == ids[response].tolist() + text_ids
    seen = []

    def forward(tokens, mask):
        seen.append(mask)
        return {"resid_post.0": jnp.asarray(tokens, jnp.float32)[..., None]}

    packed = PackedTokens(
        docs, tok, seq_len=8, batch_size=2, shuffle=False, num_epochs=1, loss_mask=True
    )
    n = int(sum(b["loss_mask"].sum() for b in batches))
    stream = ActivationStream(
        None, ["resid_post.0"], packed, batch_tokens=n, buffer_tokens=n, forward=forward
    )
    rows = next(stream)["resid_post.0"][:, 0]
    assert sorted(rows.astype(int).tolist()) == sorted(ids[response].tolist() + text_ids)
    assert all(m is None for m in seen)


def test_normalised_copy_keeps_the_raw_function():
    from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
    from gemmascope_jax.training.init_from import normalised_copy

    cfg = DictionaryConfig(
        kind="skip_transcoder",
        architecture="jumprelu",
        d_in=16,
        d_out=16,
        width=32,
        layers=(1,),
        l0_target=4.0,
        model_num_layers=4,
    )
    d = random_dictionary(cfg, seed=0, pre_bias=True)
    scalars = {cfg.input_sites[0]: 3.0, cfg.output_sites[0]: 0.5}
    n = normalised_copy(d, cfg, scalars)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 16)), jnp.float32) * 3
    np.testing.assert_allclose(n(x / 3.0) * 0.5, d(x), rtol=1e-4, atol=1e-4)


def write_config(tmp_path: Path, it_dir: Path, rollouts_out: Path, **dict_extra) -> Path:
    cfg = {
        "run": {"name": "it", "dir": str(tmp_path / "run")},
        "model": {"source": str(it_dir)},
        "data": {
            "sources": [
                {
                    "type": "rollouts",
                    "loss_tokens": "response",
                    "rollouts": {
                        "out": str(rollouts_out),
                        "max_new_tokens": 8,
                        "batch_size": 4,
                        "max_prompts": 8,
                    },
                }
            ],
            "seq_len": 32,
            "batch_size": 4,
            "shuffle_buffer_tokens": 64,
            "norm_tokens": 64,
        },
        "dictionaries": [
            {
                "name": "sae",
                "kind": "sae",
                "input_sites": "resid_post.3",
                "width": 64,
                "l0_target": 8,
                **dict_extra,
            }
        ],
        "train": {"steps": 2, "batch_tokens": 32, "lr_warmup_steps": 1},
        "checkpoint": {"every_steps": 0},
        "eval": {"every_steps": 0, "heldout_tokens": 64, "splice": False, "card": False},
        "export": {"formats": ["native"]},
        "report": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "run.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_trainer_runs_on_rollouts_and_starts_from_an_export(it_dir, tmp_path):
    """`model.source` a transformers checkpoint directory, a `rollouts` source (generated
    before training, response tokens only) and `init_from` a PT export."""
    from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
    from gemmascope_jax.formats import load_dictionary, save_dictionary
    from gemmascope_jax.training.config import load_config
    from gemmascope_jax.training.trainer import run_training

    hf = json.loads((it_dir / "config.json").read_text())
    d = hf["hidden_size"]
    pt_cfg = DictionaryConfig(
        kind="sae",
        architecture="jumprelu",
        d_in=d,
        d_out=d,
        width=64,
        layers=(3,),
        l0_target=8.0,
        model_num_layers=hf["num_hidden_layers"],
    )
    export = tmp_path / "pt_export"
    save_dictionary(random_dictionary(pt_cfg, seed=4), export, format="native")
    out = tmp_path / "rollouts.jsonl"
    cfg = load_config(write_config(tmp_path / "it", it_dir, out, init_from=str(export)))
    assert cfg.data.sources[0].loss_tokens == "response"
    it = run_training(cfg)
    assert it.steps == 2 and len(read(out)) == 8
    assert all(r["messages"][-1]["role"] == "assistant" for r in read(out))
    a = load_dictionary(export).arrays()
    b = load_dictionary(it.exports["sae"]["native"]).arrays()
    # Two small steps from the export stay near it (a fresh init would be far away).
    rel = np.linalg.norm(a["w_enc"] - b["w_enc"]) / np.linalg.norm(a["w_enc"])
    assert rel < 0.2, rel


IT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "gs2" / "resid_post_270m_16k_it.yaml"


def it_recipe(run_dir: Path, it_dir: Path, rollouts_out: Path, export: Path, *extra: str):
    """configs/gs2/resid_post_270m_16k_it.yaml itself, scaled down to the tiny model: one SAE
    at layer 3 (the recipe's layers do not exist there) from `export`, short rollouts."""
    from gemmascope_jax.training.config import load_config

    return load_config(
        IT_RECIPE,
        [
            f"run.dir={run_dir}",
            f"model.source={it_dir}",
            "model.dtype=float32",
            f"dictionaries=[{{name: resid_post_3, layers: 3, init_from: '{export}'}}]",
            "dictionary_defaults.width=64",
            "dictionary_defaults.l0_target=8",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.shuffle_buffer_tokens=64",
            "data.norm_tokens=64",
            f"data.sources.0.rollouts.out={rollouts_out}",
            "data.sources.0.rollouts.max_new_tokens=8",
            "data.sources.0.rollouts.batch_size=4",
            "data.sources.0.rollouts.max_prompts=8",
            "train.steps=2",
            "train.batch_tokens=32",
            "train.lr_warmup_steps=1",
            "checkpoint.every_steps=0",
            "eval.every_steps=0",
            "eval.heldout_tokens=64",
            "eval.card=false",
            "export.formats=[native]",
            "report.progress=false",
            "report.tensorboard=false",
            "finetune.steps=2",
            "finetune.batch_size=2",
            *extra,
        ],
    )


def test_it_recipe_runs_on_an_it_checkpoint_and_kl_finetunes_from_an_export(it_dir, tmp_path):
    """The IT recipe config with a real IT-shaped checkpoint (a tiny `Gemma3ForCausalLM` saved
    by transformers) as `model.source`: its first stage generates sampled rollouts and starts
    from a PT native export; then `run_finetune` of the same config in a fresh run dir (no
    first-stage checkpoint) starts from the `init_from` export, generates its own missing
    rollouts with the run's model, and KL-finetunes on them."""
    from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
    from gemmascope_jax.formats import load_dictionary, save_dictionary
    from gemmascope_jax.training.finetune import run_finetune
    from gemmascope_jax.training.trainer import run_training

    hf = json.loads((it_dir / "config.json").read_text())
    pt_cfg = DictionaryConfig(
        kind="sae",
        architecture="jumprelu",
        d_in=hf["hidden_size"],
        d_out=hf["hidden_size"],
        width=64,
        layers=(3,),
        l0_target=8.0,
        model_num_layers=hf["num_hidden_layers"],
    )
    export = tmp_path / "pt_export"
    save_dictionary(random_dictionary(pt_cfg, seed=4), export, format="native")

    cfg = it_recipe(tmp_path / "it", it_dir, tmp_path / "it_rollouts.jsonl", export)
    src = cfg.data.sources[0]
    assert (cfg.model.source, src.type, src.loss_tokens) == (str(it_dir), "rollouts", "all")
    assert src.rollouts.temperature == 1.0 and src.rollouts.top_p == 0.95
    it = run_training(cfg)
    assert it.steps == 2 and len(read(tmp_path / "it_rollouts.jsonl")) == 8
    assert load_dictionary(it.exports["resid_post_3"]["native"]).cfg.width == 64

    out = tmp_path / "ft_rollouts.jsonl"  # missing: the finetune must generate it
    ft_cfg = it_recipe(tmp_path / "ft", it_dir, out, export, "finetune.beta=1")
    assert not (tmp_path / "ft").exists()
    result = run_finetune(ft_cfg)
    assert result.steps == 2 and not result.stopped_early
    records = read(out)
    assert len(records) == 8 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    # the same sampled rollouts as the first stage's (same model, settings and seeds)
    assert records == read(tmp_path / "it_rollouts.jsonl")
    before, after = result.before["resid_post_3"], result.after["resid_post_3"]
    assert {"fvu", "l0", "kl", "delta_loss"} <= set(before) and after["kl"] > 0
    a = load_dictionary(export).arrays()
    b = load_dictionary(result.exports["resid_post_3"]["native"]).arrays()
    rel = np.linalg.norm(a["w_enc"] - b["w_enc"]) / np.linalg.norm(a["w_enc"])
    assert 0 < rel < 0.2, rel  # two small steps from the export
