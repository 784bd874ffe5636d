"""The training job end to end on a tiny Gemma 3 (real tokenizer, full vocabulary): exports
and report, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gemmascope_jax.formats import detect_format, load_dictionary
from gemmascope_jax.training.config import load_config
from gemmascope_jax.training.trainer import run_training
from tests.hf_reference import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gguf_path):
    """A tiny randomized Gemma 3 with the real vocabulary and tokenizer, saved by
    transformers."""
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf

    path = tmp_path_factory.mktemp("tiny_full_vocab")
    tiny_causal_lm(seed=1, vocab_size=262_144).save_pretrained(path)
    load_tokenizer_from_gguf(gguf_path).save(path)
    return path


def write_config(tmp_path: Path, tiny_dir: Path, **train) -> Path:
    cfg = {
        "run": {"name": "tiny", "dir": str(tmp_path / "run")},
        "model": {"source": str(tiny_dir)},
        "data": {
            "sources": [{"type": "embedded"}],
            "seq_len": 32,
            "batch_size": 4,
            "shuffle_buffer_tokens": 1024,
            "cache_dir": "cache",
            "epochs": 2,
            "norm_tokens": 256,
        },
        "dictionary_defaults": {"width": 128, "l0_target": 8},
        "dictionaries": [
            {"name": "sae", "kind": "sae", "input_sites": "resid_post.3", "matryoshka": True},
            {
                "name": "skip",
                "kind": "skip_transcoder",
                "input_sites": "model.layers.3.pre_feedforward_layernorm.output",
                "output_sites": "model.layers.3.post_feedforward_layernorm.output",
            },
        ],
        "train": {
            "steps": 8,
            "batch_tokens": 128,
            "lr": 1e-3,
            "lr_warmup_steps": 2,
            "sparsity_warmup_steps": 4,
            "dead_steps": 4,
            **train,
        },
        "checkpoint": {"every_steps": 2, "keep": 2},
        "eval": {"every_steps": 0, "heldout_tokens": 256, "card": False},  # cards: one test
        "export": {"formats": ["native", "gemma-scope-2", "saelens"]},
        "report": {"log_every": 2, "progress": False},
    }
    path = tmp_path / "run.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_exports_and_reports(tiny_dir, tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_dir), ["eval.every_steps=4", "eval.card=true"])
    result = run_training(cfg)
    assert result.steps == 8
    for name in ("sae", "skip"):
        ev = result.evals[name]
        assert np.isfinite(ev["fvu"]) and ev["l0"] > 0
        assert {"delta_loss", "kl"} <= set(ev)
        for fmt, path in result.exports[name].items():
            assert detect_format(path) == fmt
            d = load_dictionary(path)
            assert d.cfg.input_sites[0] == ("resid_post.3" if name == "sae" else "mlp_in.3")
    report = result.report_dir
    assert (report / "summary.json").is_file() and (report / "sae.png").is_file()
    rows = [json.loads(line) for line in (report / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" not in r] == [2, 4, 6, 8]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [4, 8]  # eval.every_steps=4, and the final eval
    assert evals[-1]["eval"]["sae"]["fvu"] == pytest.approx(result.evals["sae"]["fvu"])
    for name in ("sae", "skip"):  # a quality card per dictionary, on the same held-out text
        assert result.cards[name] == report / "cards" / name / "card.md"
        card = json.loads((report / "cards" / name / "card.json").read_text())
        assert card["dictionary"]["kind"] == ("sae" if name == "sae" else "skip_transcoder")
        core = card["saebench_core"]  # the card's L0 is the held-out eval's, on the same tokens
        assert core["sparsity"]["l0"] == pytest.approx(result.evals[name]["l0"], rel=0.2)
        assert np.isfinite(core["model_performance_preservation"]["ce_loss_score"])


def _run_cli(config: Path, *overrides: str, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-m", "gemmascope_jax.cli", "train", str(config), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _params(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    d = load_dictionary(run_dir / "export" / name / "native")
    return {k: np.asarray(v) for k, v in d.arrays().items()}


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    straight = write_config(tmp_path / "a", tiny_dir, steps=12)
    killed = write_config(tmp_path / "b", tiny_dir, steps=12)
    proc = _run_cli(straight)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]

    proc = _run_cli(killed)
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "6" / "commit_success.txt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "run" / "export").exists()
    resumed = _run_cli(killed)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    for name in ("sae", "skip"):
        a, b = _params(tmp_path / "a" / "run", name), _params(tmp_path / "b" / "run", name)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}.{k}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_matches_single_process(tiny_dir, tmp_path):
    """Two `jax.distributed` processes on loopback (gloo), one CPU device each, each reading
    its own data shard, train the same parameters as one process with two devices reading both
    shards (`data.shards=2`): same global batches, same scalars, same mesh."""
    multi = write_config(tmp_path / "multi", tiny_dir, steps=4)
    single = write_config(tmp_path / "single", tiny_dir, steps=4)
    port = _free_port()
    procs = [
        _run_cli(
            multi,
            f"mesh.distributed.coordinator_address=127.0.0.1:{port}",
            "mesh.distributed.num_processes=2",
            f"mesh.distributed.process_id={i}",
        )
        for i in range(2)
    ]
    procs.append(_run_cli(single, "data.shards=2", devices=2))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert '"steps": 4' in outs[0]
    caches = sorted(p.name for p in (tmp_path / "multi" / "run" / "cache").iterdir())
    assert caches == ["shard_0_of_2", "shard_1_of_2"]
    for name in ("sae", "skip"):
        a, b = _params(tmp_path / "multi" / "run", name), _params(tmp_path / "single" / "run", name)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}.{k}")


def test_clt_and_topk_crosscoder_train_and_export(tiny_dir, tmp_path):
    """Multi-layer kinds and a whole-model transcoder set through the whole job; formats that
    cannot hold a dictionary are skipped with the reason, not fatal after training."""
    path = write_config(tmp_path, tiny_dir, steps=4)
    raw = yaml.safe_load(path.read_text())
    raw["dictionary_defaults"] = {}
    raw["dictionaries"] = [
        {"name": "clt", "kind": "clt", "layers": "all", "width": 64, "l0_target": 8},
        {
            "name": "cc",
            "kind": "crosscoder",
            "layers": [1, 3, 5],
            "width": 64,
            "architecture": "topk",
            "k": 4,
        },
        {"name": "plt", "kind": "transcoder", "layers": "all", "width": 32, "l0_target": 4},
    ]
    raw["export"]["formats"] = ["native", "gemma-scope-2", "circuit-tracer"]
    path.write_text(yaml.safe_dump(raw))
    result = run_training(load_config(path))
    assert result.evals["cc"]["l0"] == pytest.approx(12.0)  # k=4 on each of 3 layers
    clt = result.exports["clt"]
    assert detect_format(clt["gemma-scope-2"]) == "gemma-scope-2"
    assert load_dictionary(clt["circuit-tracer"]).cfg.num_layers == 7
    assert result.exports["cc"]["gemma-scope-2"].startswith("skipped: ")
    assert detect_format(result.exports["cc"]["native"]) == "native"
    # One transcoder per layer: exported together as a circuit-tracer set, same numbers.
    assert result.exports["plt_0"]["circuit-tracer"].startswith("skipped: exported with")
    tset = load_dictionary(result.exports["transcoder_set"]["circuit-tracer"])
    assert len(tset) == 7
    for layer, member in enumerate(tset):
        native = load_dictionary(result.exports[f"plt_{layer}"]["native"])
        np.testing.assert_allclose(member.arrays()["w_dec"], native.arrays()["w_dec"], rtol=1e-6)
