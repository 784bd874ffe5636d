"""Loading and saving: HF round trips with transformers, hub ids, and bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM

from gemmascope_jax.gemma3 import loading
from gemmascope_jax.gemma3.loading import CheckpointError, load_gemma3, save_gemma3
from gemmascope_jax.io.safetensors import SafetensorsError, read_safetensors, write_safetensors


def test_save_round_trip_exact_in_transformers_and_ours(tiny_model, hf_tiny, tmp_path, tiny_tokens):
    out = save_gemma3(tiny_model, tmp_path / "saved")
    hf = Gemma3ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = dict(loading.hf_state_dict(tiny_model))
    theirs = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(value, ours[name], err_msg=name)
    np.testing.assert_array_equal(
        hf.lm_head.weight.detach().numpy(), ours["model.embed_tokens.weight"]
    )
    with torch.no_grad():
        logits = hf(torch.as_tensor(tiny_tokens)).logits.numpy()
        original = hf_tiny(torch.as_tensor(tiny_tokens)).logits.numpy()
    np.testing.assert_array_equal(logits, original)
    again, _ = load_gemma3(out, tokenizer=False, progress=False)
    for name, value in loading.hf_state_dict(again):
        np.testing.assert_array_equal(value, ours[name], err_msg=name)
    assert again.cfg == tiny_model.cfg.replace(name=again.cfg.name)


def test_save_bfloat16_loads_in_transformers(tiny_model, tmp_path):
    out = save_gemma3(tiny_model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = Gemma3ForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = dict(loading.hf_state_dict(tiny_model, jnp.bfloat16))
    for name, value in hf.state_dict().items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(value.float().numpy(), ours[name].astype(np.float32))
    back, _ = load_gemma3(out, dtype=jnp.bfloat16, tokenizer=False, progress=False)
    assert back.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16


def test_sharded_save_writes_index(tiny_model, tmp_path, tiny_tokens):
    out = save_gemma3(tiny_model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tiny_tokens)).logits.numpy()
    np.testing.assert_allclose(tiny_model(jnp.asarray(tiny_tokens)).logits, ref, atol=1e-5, rtol=0)


def test_save_refuses_non_empty_dir_and_leaves_nothing_on_failure(
    tiny_model, tmp_path, monkeypatch
):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_gemma3(tiny_model, existing)
    assert (existing / "keep.txt").read_text() == "x"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loading, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_gemma3(tiny_model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_hub_id_goes_through_snapshot_download(hf_tiny_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(hf_tiny_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_gemma3("google/gemma-3-tiny-test", tokenizer=False, progress=False)
    assert calls and calls[0][0] == "google/gemma-3-tiny-test"
    assert "*.safetensors" in calls[0][1]
    assert model.cfg.num_layers == 7


@pytest.fixture
def broken_dir(hf_tiny_dir, tmp_path):
    """A writable copy of the tiny checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_tiny_dir, dst)
    return dst


def _rewrite(path, edit):
    tensors = read_safetensors(path / "model.safetensors")
    edit(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_tensor_named(broken_dir):
    _rewrite(broken_dir, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.3\.mlp\.up_proj"):
        load_gemma3(broken_dir, tokenizer=False, progress=False)


def test_extra_tensor_named(broken_dir):
    _rewrite(broken_dir, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.7\.mlp\.up_proj"):
        load_gemma3(broken_dir, tokenizer=False, progress=False)


def test_config_that_disagrees_with_weights(broken_dir):
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_gemma3(broken_dir, tokenizer=False, progress=False)
    message = str(err.value)
    assert "model.safetensors" in message and "mlp.gate_proj.weight" in message
    assert "(96, 64)" in message and "(128, 64)" in message


def test_truncated_file_named(broken_dir):
    path = broken_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*truncated"):
        load_gemma3(broken_dir, tokenizer=False, progress=False)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(SafetensorsError, match="too short"):
        load_gemma3(broken_dir, tokenizer=False, progress=False)


def test_nan_weights_named(broken_dir):
    def poison(t):
        t["model.layers.2.self_attn.k_proj.weight"][0, 0] = np.nan

    _rewrite(broken_dir, poison)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' contains NaN"):
        load_gemma3(broken_dir, tokenizer=False, progress=False)


def test_missing_and_malformed_sources(tmp_path, broken_dir):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_gemma3(tmp_path / "nowhere", tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gemma3(tmp_path, tokenizer=False)
    (broken_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        load_gemma3(broken_dir, tokenizer=False)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"abc")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load_gemma3(txt, tokenizer=False)
