"""Read a Gemma 3 GGUF file as Hugging Face-named float32 numpy tensors plus an HF config dict.

Mirrors transformers' GGUF loading (`modeling_gguf_pytorch_utils.load_gguf_checkpoint` and
`integrations/ggml.py`, transformers 5.x) so results equal
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)` bit for bit:

* tensors are dequantized with `gguf.quants.dequantize` (float32, [out, in] = torch layout);
* every tensor whose GGUF name contains "norm.weight" gets `w - 1` (llama.cpp stores Gemma's
  RMSNorm weights as `1 + w`), computed in float32;
* the config starts from `Gemma3TextConfig` defaults and takes from GGUF metadata only what
  transformers maps: context_length, block_count, feed_forward_length, embedding_length,
  rope.freq_base (full-attention RoPE), attention.{key_length -> head_dim, head_count,
  head_count_kv, layer_norm_rms_epsilon, sliding_window} and the tokenizer's special ids.
  Everything else keeps the default: local RoPE base 10000, query_pre_attn_scalar 256, the
  5-sliding + 1-full layer pattern; vocab_size is the tokenizer's token count; float32
  metadata keeps its float32 value (rms_norm_eps 1e-6 reads as 9.999999974752427e-07).
"""

from __future__ import annotations

import copy
import os
import pathlib
import re

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

# Gemma3TextConfig defaults (transformers 5.x) for everything the GGUF does not carry.
_HF_DEFAULTS: dict = {
    "model_type": "gemma3_text",
    "vocab_size": 262_208,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
}
_SLIDING_WINDOW_PATTERN = 6

# transformers GGUF_CONFIG_MAPPING["gemma3"] (prefix "gemma3.") and ["tokenizer"].
_ARCH_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
_TOKENIZER_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_MAX_METADATA_ARRAY = 64  # metadata() skips arrays longer than this (tokenizer vocab etc.)


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name of a Gemma 3 GGUF tensor, or None if the name is not a known Gemma 3 tensor."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def _field_value(field):
    """Decode a ReaderField: str / int / float / bool, or a list of those for arrays."""
    kind = field.types[0]
    item_kind = field.types[-1]

    def one(idx, t):
        part = field.parts[idx]
        if t == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    if kind == GGUFValueType.ARRAY:
        return [one(i, item_kind) for i in field.data]
    return one(field.data[0], kind)


class GGUFCheckpoint:
    """Lazy, HF-named view of a Gemma 3 GGUF file."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # bad magic, truncated metadata, unknown types, ...
            raise ValueError(f"{self.path}: not a valid GGUF file, or truncated ({e})") from e
        fields = self._reader.fields
        arch_field = fields.get("general.architecture")
        arch = _field_value(arch_field) if arch_field is not None else None
        if arch != "gemma3":
            raise ValueError(f"{self.path}: GGUF architecture is {arch!r}, expected 'gemma3'")
        size = os.path.getsize(self.path)
        self._tensors = {}
        for t in self._reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
                raise ValueError(f"{self.path}: truncated GGUF file (tensor {t.name!r} incomplete)")
            hf = hf_tensor_name(t.name)
            if hf is None:
                raise ValueError(f"{self.path}: unknown Gemma 3 GGUF tensor {t.name!r}")
            self._tensors[hf] = t
        self.hf_config = self._build_config()

    def _build_config(self) -> dict:
        fields = self._reader.fields
        cfg = copy.deepcopy(_HF_DEFAULTS)
        rope_theta = None
        for key, field in fields.items():
            if key.startswith("gemma3.") and key[len("gemma3.") :] in _ARCH_KEYS:
                hf_key = _ARCH_KEYS[key[len("gemma3.") :]]
                if hf_key == "rope_theta":
                    rope_theta = _field_value(field)
                else:
                    cfg[hf_key] = _field_value(field)
            elif key in _TOKENIZER_KEYS:
                cfg[_TOKENIZER_KEYS[key]] = _field_value(field)
        if rope_theta is not None:
            cfg["rope_parameters"]["full_attention"]["rope_theta"] = rope_theta
        if "gemma3.vocab_size" not in fields and "tokenizer.ggml.tokens" in fields:
            cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
        if "general.name" in fields:
            cfg["_model_name_or_path"] = _field_value(fields["general.name"])
        missing = [
            k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if k not in cfg
        ]
        missing += [k for k in ("num_attention_heads", "num_key_value_heads") if k not in cfg]
        if missing:
            raise ValueError(f"{self.path}: GGUF metadata lacks {missing}")
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        cfg["layer_types"] = [
            "sliding_attention" if (i + 1) % _SLIDING_WINDOW_PATTERN else "full_attention"
            for i in range(cfg["num_hidden_layers"])
        ]
        cfg["dtype"] = "float32"
        return cfg

    def keys(self) -> list[str]:
        """HF tensor names present, in file order."""
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._tensors)

    def _get(self, name):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in GGUF file {self.path}") from None

    def shape(self, name) -> tuple:
        """HF ([out, in]) shape without dequantizing."""
        return tuple(int(d) for d in reversed(self._get(name).shape))

    def quant_type(self, name) -> str:
        """GGML storage type of a tensor, e.g. 'Q4_K' or 'F32'."""
        return self._get(name).tensor_type.name

    def tensor(self, name) -> np.ndarray:
        """Dequantized float32 tensor in HF layout; norm weights with the stored +1 removed."""
        t = self._get(name)
        w = dequantize(t.data, t.tensor_type)  # F32 comes back as a view of the memmap
        copy_needed = t.tensor_type == GGMLQuantizationType.F32 or not w.flags.writeable
        w = np.array(w, dtype=np.float32, copy=copy_needed).reshape(self.shape(name))
        if "norm.weight" in t.name:
            w = w - 1
        return w

    def metadata(self) -> dict:
        """Scalar (and short array) metadata fields as plain python values."""
        out = {}
        for key, field in self._reader.fields.items():
            is_array = field.types and field.types[0] == GGUFValueType.ARRAY
            if is_array and len(field.data) > _MAX_METADATA_ARRAY:
                continue
            out[key] = _field_value(field)
        return out

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._tensors)} tensors)"
