"""GGUFCheckpoint against transformers' own GGUF loader on the real Gemma 3 270M Q4_K_M file."""

from __future__ import annotations

import gguf  # noqa: E402
import numpy as np
import pytest

from gemmascope_jax.gemma3.gguf import GGUFCheckpoint

# Fields of transformers' Gemma3TextConfig that define the architecture (all must be present).
ARCH_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "attention_bias",
    "use_bidirectional_attention",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
]


@pytest.fixture(scope="module")
def ckpt(gguf_path) -> GGUFCheckpoint:
    return GGUFCheckpoint(gguf_path)


def test_tensors_match_transformers_bit_for_bit(ckpt, hf_gguf_model):
    sd = hf_gguf_model.state_dict()
    assert set(ckpt.keys()) == set(sd) - {"lm_head.weight"}
    assert ckpt.hf_config["tie_word_embeddings"]
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    for name in list(ckpt):
        ours = ckpt.tensor(name)
        ref = sd[name].detach().numpy()
        assert ours.dtype == np.float32, name
        assert ours.shape == ref.shape == ckpt.shape(name), name
        assert np.array_equal(ours, ref), name
    # norm weights are stored (F32) as 1 + w; the HF value is the stored value minus 1
    raw = next(t for t in ckpt._reader.tensors if t.name == "output_norm.weight")
    assert ckpt.quant_type("model.norm.weight") == "F32"
    assert np.array_equal(ckpt.tensor("model.norm.weight"), np.asarray(raw.data) - 1)


@pytest.mark.slow
def test_config_matches_transformers(ckpt, hf_gguf_model):
    ref = hf_gguf_model.config.to_dict()
    ours = ckpt.hf_config
    assert [k for k in ARCH_FIELDS if k not in ours] == []
    for key, value in ours.items():
        assert key in ref, key
        assert value == ref[key], (key, value, ref[key])
    # the values transformers fills in because the GGUF lacks them
    assert ours["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert ours["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours["query_pre_attn_scalar"] == 256
    assert ours["sliding_window"] == 512
    assert ours["vocab_size"] == 262_144
    assert ours["layer_types"].count("full_attention") == 3


@pytest.mark.slow
def test_config_round_trips_through_gemma3_text_config(ckpt, hf_gguf_model):
    import transformers

    rebuilt = transformers.Gemma3TextConfig(**ckpt.hf_config).to_dict()
    ref = hf_gguf_model.config.to_dict()
    for key in ARCH_FIELDS:
        assert rebuilt[key] == ref[key], key


def test_metadata_and_missing_key(ckpt, gguf_path):
    meta = ckpt.metadata()
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.block_count"] == 18
    assert "tokenizer.ggml.tokens" not in meta
    assert ckpt.shape("model.embed_tokens.weight") == (262_144, 640)
    assert ckpt.shape("model.layers.0.self_attn.q_proj.weight") == (1024, 640)
    with pytest.raises(KeyError, match="lm_head.weight") as info:
        ckpt.tensor("lm_head.weight")
    assert str(gguf_path) in str(info.value)


def test_truncated_file_raises_with_path(gguf_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError) as info:
        GGUFCheckpoint(bad)
    assert str(bad) in str(info.value)


def test_non_gguf_file_raises_with_path(tmp_path):
    bad = tmp_path / "not_a_model.gguf"
    bad.write_text("this is not a GGUF file\n" * 100)
    with pytest.raises(ValueError) as info:
        GGUFCheckpoint(bad)
    assert str(bad) in str(info.value)


def _write_tiny(path, arch="gemma3", tensors=None):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for name, arr in (tensors or {}).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_file_conventions(tmp_path):
    rng = np.random.default_rng(0)
    norm = (1 + rng.standard_normal(8)).astype(np.float32)
    proj = rng.standard_normal((16, 8)).astype(np.float32)  # numpy [out, in]
    head = rng.standard_normal((32, 8)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    _write_tiny(
        path,
        tensors={
            "blk.0.ffn_norm.weight": norm,
            "blk.0.ffn_up.weight": proj,
            "output.weight": head,
        },
    )
    ck = GGUFCheckpoint(path)
    assert ck.keys() == [
        "model.layers.0.pre_feedforward_layernorm.weight",
        "model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    assert ck.hf_config["tie_word_embeddings"] is False
    assert ck.hf_config["layer_types"] == ["sliding_attention"]
    assert np.array_equal(ck.tensor("model.layers.0.pre_feedforward_layernorm.weight"), norm - 1)
    assert np.array_equal(ck.tensor("model.layers.0.mlp.up_proj.weight"), proj)
    assert ck.shape("model.layers.0.mlp.up_proj.weight") == (16, 8)
    assert np.array_equal(ck.tensor("lm_head.weight"), head)


def test_wrong_architecture_raises(tmp_path):
    path = tmp_path / "llama.gguf"
    _write_tiny(path, arch="llama", tensors={"output_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="llama") as info:
        GGUFCheckpoint(path)
    assert str(path) in str(info.value)


def test_unknown_tensor_raises(tmp_path):
    path = tmp_path / "odd.gguf"
    _write_tiny(path, tensors={"blk.0.mystery.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight") as info:
        GGUFCheckpoint(path)
    assert str(path) in str(info.value)
