"""Gemma 3 text-model configuration: one frozen dataclass, presets per released size.

Values follow the released checkpoints (docs/gemma3.md). `from_hf` / `to_hf` convert to and
from a transformers `config.json` dict (text-only `gemma3_text` or the multimodal `gemma3`
wrapper with a nested `text_config`), including the legacy RoPE keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's 5 sliding + 1 full pattern: layer i is full iff (i + 1) % pattern == 0."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Architecture of the Gemma 3 text model.

    `dtype` is the activation (compute) dtype; `param_dtype` the dtype parameters are stored
    in. RMSNorm, RoPE angles and softmax always run in float32 (as transformers does).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scaling: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32_768
    name: str = "gemma3"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
            )
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive, got {self.sliding_window}")
        if problems:
            raise ValueError(f"invalid Gemma3Config ({self.name}): " + "; ".join(problems))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))

    @property
    def embed_scale(self) -> float:
        """sqrt(d_model) rounded to the parameter dtype, as transformers does."""
        return float(np.asarray(math.sqrt(self.hidden_size), dtype=jnp.dtype(self.param_dtype)))

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes) -> Gemma3Config:
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype) -> Gemma3Config:
        """Same architecture with params and activations in `dtype` (str or jnp dtype)."""
        dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        return self.replace(dtype=dtype, param_dtype=dtype)

    # ---- transformers config.json <-> Gemma3Config -------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, *, name: str | None = None) -> Gemma3Config:
        """Build from a transformers config dict (`gemma3_text`, or `gemma3` with text_config)."""
        text = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
        text = dict(text or {})
        required = [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ]
        if missing := [k for k in required if k not in text]:
            raise ValueError(f"config.json lacks required fields {missing}")
        if text.get("use_bidirectional_attention"):
            raise ValueError(
                "config.json: use_bidirectional_attention=true is not Gemma 3 causal LM"
            )
        num_layers = int(text["num_hidden_layers"])
        layer_types = text.get("layer_types") or default_layer_types(
            num_layers,
            int(text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6))),
        )
        local_base, global_base, scaling = 10_000.0, 1_000_000.0, 1.0
        rope = text.get("rope_parameters")
        if isinstance(rope, dict) and FULL in rope:
            global_base = float(rope[FULL].get("rope_theta", global_base))
            local_base = float(rope.get(SLIDING, {}).get("rope_theta", local_base))
            scaling = _linear_factor(rope[FULL])
        else:
            global_base = float(text.get("rope_theta", global_base))
            local_base = float(text.get("rope_local_base_freq", local_base))
            scaling = _linear_factor(text.get("rope_scaling") or rope or {})
        dtype = _DTYPES.get(str(text.get("dtype") or text.get("torch_dtype") or "float32"))
        return cls(
            vocab_size=int(text.get("vocab_size", 262_208)),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=num_layers,
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text.get("head_dim", 256)),
            query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", 256)),
            sliding_window=int(text.get("sliding_window", 4096)),
            layer_types=tuple(layer_types),
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_scaling=scaling,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
            name=name or str(hf.get("_name_or_path") or "gemma3"),
            dtype=dtype or jnp.float32,
            param_dtype=dtype or jnp.float32,
        )

    def to_hf(self) -> dict:
        """A transformers 5.x `gemma3_text` config.json dict for `Gemma3ForCausalLM`."""
        full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_global_base}
        if self.rope_global_scaling != 1.0:
            full_rope = {
                "rope_type": "linear",
                "factor": self.rope_global_scaling,
                "rope_theta": self.rope_global_base,
            }
        dtype_name = {v: k for k, v in _DTYPES.items()}.get(jnp.dtype(self.param_dtype).type)
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                FULL: full_rope,
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base},
            },
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "dtype": dtype_name or "float32",
        }


def _int_if_whole(x: float) -> int | float:
    """transformers' strict config wants an int where the value is whole (e.g. 256)."""
    return int(x) if float(x).is_integer() else x


def _linear_factor(rope: dict) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ValueError(f"unsupported RoPE scaling type {kind!r}; Gemma 3 uses 'linear'")
    return float(rope["factor"])


def _preset(name, vocab, d, ff, layers, heads, kv, hd, qscale, window, scaling, max_pos):
    return Gemma3Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        query_pre_attn_scalar=qscale,
        sliding_window=window,
        layer_types=default_layer_types(layers),
        rope_global_scaling=scaling,
        max_position_embeddings=max_pos,
        name=name,
    )


def gemma3_270m() -> Gemma3Config:
    return _preset("gemma-3-270m", 262_144, 640, 2048, 18, 4, 1, 256, 256, 512, 1.0, 32_768)


def gemma3_1b() -> Gemma3Config:
    return _preset("gemma-3-1b", 262_144, 1152, 6912, 26, 4, 1, 256, 256, 512, 1.0, 32_768)


def gemma3_4b() -> Gemma3Config:
    return _preset("gemma-3-4b", 262_208, 2560, 10240, 34, 8, 4, 256, 256, 1024, 8.0, 131_072)


def gemma3_12b() -> Gemma3Config:
    return _preset("gemma-3-12b", 262_208, 3840, 15360, 48, 16, 8, 256, 256, 1024, 8.0, 131_072)


def gemma3_27b() -> Gemma3Config:
    return _preset("gemma-3-27b", 262_208, 5376, 21504, 62, 32, 16, 128, 168, 1024, 8.0, 131_072)


def gemma3_tiny() -> Gemma3Config:
    """A few-layer model for tests: GQA, both layer types, q-scale != head_dim, small window."""
    return Gemma3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_layers=7,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, FULL),
        rope_global_scaling=8.0,
        max_position_embeddings=512,
        name="gemma-3-tiny",
    )


PRESETS = {
    "270m": gemma3_270m,
    "1b": gemma3_1b,
    "4b": gemma3_4b,
    "12b": gemma3_12b,
    "27b": gemma3_27b,
    "tiny": gemma3_tiny,
}


def preset(name: str) -> Gemma3Config:
    """Look up a preset by size ('270m', '1b', ...) or by 'gemma3_270m'/'gemma-3-270m' forms."""
    key = name.lower().replace("gemma-3-", "").replace("gemma3_", "").replace("gemma3-", "")
    key = key.removesuffix("-pt").removesuffix("-it")
    if key not in PRESETS:
        raise ValueError(f"unknown Gemma 3 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key]()
