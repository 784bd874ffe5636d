"""circuit-tracer format (circuit-tracer 0.5.0): per-layer transcoder sets and CLTs.

A folder with `config.yaml` and safetensors files, the layout circuit-tracer's own cache uses
(`utils/caching.py`), so circuit-tracer loads it from a local folder without the hub:
`load_transcoder_from_hub("/abs/path/to/folder")` (an absolute path resolves to the folder's
`config.yaml`, then `load_transcoders_from_cache` calls `load_transcoder_set` / `load_clt`),
or `ReplacementModel.from_pretrained(model_name, "/abs/path/to/folder", backend="nnsight")`.

`config.yaml`: `model_name`, `model_kind` (`transcoder_set` | `cross_layer_transcoder`),
`feature_input_hook`, `feature_output_hook` (TransformerLens hook suffixes); circuit-tracer
ignores the other keys we write (`n_layers`, and `gemmascope_jax`: the config fields it has
no place for: l0 targets, Matryoshka widths, `extra`).

Transcoder set (`TranscoderSet`), one file per layer 0..L-1, all the same width F:

| `layer_{i}.safetensors`         | shape   | ours                      |
|---------------------------------|---------|---------------------------|
| `W_enc`                         | [F, D]  | `w_enc.T` (F.linear)      |
| `b_enc`                         | [F]     | `b_enc`                   |
| `W_dec`                         | [F, D]  | `w_dec`                   |
| `b_dec`                         | [D]     | `b_dec`                   |
| `W_skip` (optional)             | [D, D]  | `w_skip.T` (`x @ W_skip.T`) |
| `activation_function.threshold` | [F]     | `threshold` (absent: ReLU) |

Cross-layer transcoder (`MultiLayerDictionary`, kind `clt`, layers 0..L-1), per layer i:
`W_enc_{i}.safetensors` with `W_enc_{i}` [F, D] (= `w_enc[i].T`), `b_enc_{i}` [F], `b_dec_{i}`
[D] (bias of output layer i), optional `threshold_{i}` [F]; `W_dec_{i}.safetensors` with
`W_dec_{i}` [F, L - i, D] (= our causal block `w_dec.{i}`).

Sites: `mlp.hook_in` = `mlp_in` (pre-feedforward norm output, the GS2 transcoder input),
`hook_resid_mid` = `resid_mid`, `hook_mlp_out` = `mlp_out` (circuit-tracer's nnsight mapping
for Gemma 3). `ln2.hook_normalized` (the norm before its gain) has no site here.

What circuit-tracer 0.5.0 cannot express, `save` refuses with a ValueError: TopK/BatchTopK
(convert with `to_jumprelu` first), d_in != d_out, sets of mixed widths, and skip connections
in a CLT (`load_clt` never reads a `W_skip`). A pre-encoder bias `b_pre` is folded into
`b_enc` first. Its JumpReLU is `pre * (pre > θ)`, ours `(pre > θ) * relu(pre)`: they agree
for θ >= 0, so `save` writes `max(θ, 0)` (exact for our semantics) and `load` warns about
negative thresholds. Loading is strict where circuit-tracer is lenient: every layer file
must be there (circuit-tracer silently loads a set that lacks its last layers) and tensors
are checked for shape (a transposed `W_enc` is named as such) and NaN/inf.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from gemmascope_jax.formats.io import FormatError, TensorReader
from gemmascope_jax.gemma3.sites import circuit_tracer_hook, circuit_tracer_kind
from gemmascope_jax.io.files import path_inside
from gemmascope_jax.io.safetensors import write_safetensors

NAME = "circuit-tracer"
CONFIG_FILE = "config.yaml"
MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
_OUR_KEYS = ("l0_target", "matryoshka_widths", "extra")


def detect(path: Path) -> bool:
    path = Path(path)
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and config.get("model_kind") in MODEL_KINDS


# ---- load -------------------------------------------------------------------------------------


def load(path: Path, *, progress: bool = False):
    """A `TranscoderSet` (model_kind `transcoder_set`) or a CLT `MultiLayerDictionary`."""
    path = Path(path)
    config = _read_config(path)
    if config["model_kind"] == "transcoder_set":
        return _load_set(path, config, progress)
    return _load_clt(path, config, progress)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FormatError(f"{file}: file not found")
    try:
        config = yaml.safe_load(file.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise FormatError(f"{file}: invalid YAML ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{file}: expected a mapping, got {type(config).__name__}")
    if missing := [
        k for k in ("model_kind", "feature_input_hook", "feature_output_hook") if k not in config
    ]:
        raise FormatError(f"{file}: missing key(s) {missing}")
    if config["model_kind"] not in MODEL_KINDS:
        raise FormatError(
            f"{file}: model_kind {config['model_kind']!r} is not one of {list(MODEL_KINDS)}"
        )
    activation = config.get("activation", "relu")
    if activation not in ("relu", "jumprelu", "jump_relu"):
        raise FormatError(
            f"{file}: activation {activation!r} is not supported (circuit-tracer 0.5.0 "
            "ignores this key and runs ReLU, or JumpReLU where thresholds are stored)"
        )
    if isinstance(config.get("transcoders"), list):
        remote = [p for p in config["transcoders"] if str(p).startswith("hf://")]
        if remote or config["model_kind"] == "cross_layer_transcoder":
            first = (remote or config["transcoders"] or ["?"])[0]
            raise FormatError(
                f"{file}: 'transcoders' points at other files ({first!r}, ...); download "
                "them, or load the Gemma Scope 2 folder they come from with format "
                "'gemma-scope-2'"
            )
    config["_sites"] = (
        _site(file, "feature_input_hook", config["feature_input_hook"], "input"),
        _site(file, "feature_output_hook", config["feature_output_hook"], "output"),
    )
    return config


def _site(file: Path, key: str, hook: Any, what: str) -> str:
    try:
        return circuit_tracer_kind(hook, what)
    except ValueError as e:
        raise FormatError(f"{file}: {key} {e}") from None


def _layer_indices(path: Path, pattern: str, config: dict) -> list[int]:
    """Indices i of the files `pattern.format(i)`; all of 0..L-1 must be there."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m[1]) for p in path.iterdir() if (m := regex.match(p.name)))
    n = config.get("n_layers")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise FormatError(f"{path / CONFIG_FILE}: n_layers must be a positive int, got {n!r}")
    if n is None:
        if not found:
            raise FormatError(f"{path}: no {pattern.format('0')} (and no other layer files)")
        n = found[-1] + 1
    if missing := [pattern.format(i) for i in range(n) if i not in found]:
        raise FormatError(f"{path}: missing layer file(s) {missing[:5]} (need layers 0..{n - 1})")
    if extra := [pattern.format(i) for i in found if i >= n]:
        raise FormatError(f"{path}: {extra[:5]} beyond n_layers={n} in {CONFIG_FILE}")
    return list(range(n))


def _length(reader: TensorReader, name: str) -> int:
    """The length of the 1-d tensor `name` (a bias), or FormatError naming file and tensor."""
    shape = reader.shape(name)
    if len(shape) != 1:
        raise FormatError(f"{reader.path}: tensor {name!r} has shape {shape}, expected 1-d")
    return shape[0]


def _dtype_of(reader: TensorReader, name: str) -> str:
    dtype = str(reader.file.dtype(name))
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _threshold(reader: TensorReader, name: str, width: int) -> np.ndarray:
    value = reader.read(name, (width,), dtype=None)
    if (negative := int((value.astype(np.float32) < 0).sum())) > 0:
        warnings.warn(
            f"{reader.path}: {name!r} has {negative} negative threshold(s); circuit-tracer "
            "computes pre * (pre > θ), gemmascope-jax (pre > θ) * relu(pre): outputs differ "
            "where θ < pre < 0",
            stacklevel=3,
        )
    return value


def _restored(config: dict, index: int | None) -> dict[str, Any]:
    """The config fields `save` kept in the `gemmascope_jax` section (for member `index`)."""
    ours = config.get("gemmascope_jax")
    entry = ours
    if index is not None:
        layers = ours.get("layers") if isinstance(ours, dict) else None
        entry = layers[index] if isinstance(layers, list) and index < len(layers) else None
    if not isinstance(entry, dict):
        return {}
    out = {k: entry[k] for k in _OUR_KEYS if entry.get(k) is not None}
    if isinstance(out.get("matryoshka_widths"), list):
        out["matryoshka_widths"] = tuple(out["matryoshka_widths"])
    return out


def _config(file: Path, **fields):
    from gemmascope_jax.dictionaries import DictionaryConfig

    try:
        return DictionaryConfig(**fields)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{file}: {e}") from None


def _load_set(path: Path, config: dict, progress: bool):
    from gemmascope_jax.dictionaries import SingleLayerDictionary
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    in_kind, out_kind = config["_sites"]
    if isinstance(config.get("transcoders"), list):  # local files, inside the folder
        source = path / CONFIG_FILE
        files = [path_inside(path, p, source) for p in config["transcoders"]]
        if not files:
            raise FormatError(f"{source}: 'transcoders' is an empty list")
    else:
        files = [
            path / f"layer_{i}.safetensors"
            for i in _layer_indices(path, "layer_{}.safetensors", config)
        ]
    n_layers, members = len(files), []
    for i in tqdm(range(n_layers), desc=f"loading {path.name}", unit="layer", disable=not progress):
        reader = TensorReader(files[i])
        reader.require(
            ["W_enc", "W_dec", "b_enc", "b_dec"],
            optional=["W_skip", "activation_function.threshold"],
        )
        width, d_model = _length(reader, "b_enc"), _length(reader, "b_dec")
        arrays = {
            "w_enc": reader.read("W_enc", (width, d_model), dtype=None).T,
            "b_enc": reader.read("b_enc", dtype=None),
            "w_dec": reader.read("W_dec", (width, d_model), dtype=None),
            "b_dec": reader.read("b_dec", dtype=None),
        }
        jumprelu = "activation_function.threshold" in reader
        if jumprelu:
            arrays["threshold"] = _threshold(reader, "activation_function.threshold", width)
        skip = "W_skip" in reader
        if skip:
            arrays["w_skip"] = reader.read("W_skip", (d_model, d_model), dtype=None).T
        cfg = _config(
            files[i],
            kind="skip_transcoder" if skip else "transcoder",
            architecture="jumprelu" if jumprelu else "relu",
            d_in=d_model,
            d_out=d_model,
            width=width,
            layers=(i,),
            input_sites=(f"{in_kind}.{i}",),
            output_sites=(f"{out_kind}.{i}",),
            model_name=config.get("model_name"),
            model_num_layers=n_layers,
            skip=skip,
            dtype=_dtype_of(reader, "W_enc"),
            **_restored(config, i),
        )
        members.append(
            SingleLayerDictionary.from_arrays(cfg, {k: jnp.asarray(v) for k, v in arrays.items()})
        )
        del arrays
    metadata = {"scan": config["scan"]} if isinstance(config.get("scan"), str) else {}
    try:
        return TranscoderSet(
            tuple(members),
            model_name=config.get("model_name"),
            input_site=in_kind,
            output_site=out_kind,
            metadata=metadata,
        )
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None


def _load_clt(path: Path, config: dict, progress: bool):
    from gemmascope_jax.dictionaries import MultiLayerDictionary

    in_kind, out_kind = config["_sites"]
    layers = _layer_indices(path, "W_enc_{}.safetensors", config)
    n_layers = len(layers)
    first = TensorReader(path / "W_enc_0.safetensors")
    first.require(["W_enc_0", "b_enc_0", "b_dec_0"], optional=["threshold_0"])
    width, d_model = _length(first, "b_enc_0"), _length(first, "b_dec_0")
    jumprelu, dtype = "threshold_0" in first, _dtype_of(first, "W_enc_0")
    w_enc, b_enc, b_dec, threshold, arrays = [], [], [], [], {}
    for i in tqdm(layers, desc=f"loading {path.name}", unit="layer", disable=not progress):
        enc = TensorReader(path / f"W_enc_{i}.safetensors")
        names = [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"]
        enc.require(names + ([f"threshold_{i}"] if jumprelu else []))
        w_enc.append(jnp.asarray(enc.read(f"W_enc_{i}", (width, d_model), dtype=None).T))
        b_enc.append(enc.read(f"b_enc_{i}", (width,), dtype=None))
        b_dec.append(enc.read(f"b_dec_{i}", (d_model,), dtype=None))
        if jumprelu:
            threshold.append(_threshold(enc, f"threshold_{i}", width))
        dec = TensorReader(path / f"W_dec_{i}.safetensors")
        dec.require([f"W_dec_{i}"])
        block = dec.read(f"W_dec_{i}", (width, n_layers - i, d_model), dtype=None)
        arrays[f"w_dec.{i}"] = jnp.asarray(block)
        del block
    arrays["w_enc"] = jnp.stack(w_enc)
    del w_enc
    arrays["b_enc"], arrays["b_dec"] = jnp.asarray(np.stack(b_enc)), jnp.asarray(np.stack(b_dec))
    if jumprelu:
        arrays["threshold"] = jnp.asarray(np.stack(threshold))
    cfg = _config(
        path / CONFIG_FILE,
        kind="clt",
        architecture="jumprelu" if jumprelu else "relu",
        d_in=d_model,
        d_out=d_model,
        width=width,
        layers=tuple(layers),
        input_sites=tuple(f"{in_kind}.{i}" for i in layers),
        output_sites=tuple(f"{out_kind}.{i}" for i in layers),
        model_name=config.get("model_name"),
        model_num_layers=n_layers,
        dtype=dtype,
        **_restored(config, None),
    )
    try:
        return MultiLayerDictionary.from_arrays(cfg, arrays)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None


# ---- save -------------------------------------------------------------------------------------


def save(obj, out_dir: Path, *, progress: bool = False) -> None:
    """Write a `TranscoderSet` (-> transcoder set) or a CLT (-> cross-layer transcoder)."""
    from gemmascope_jax.dictionaries import MultiLayerDictionary
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    out_dir = Path(out_dir)
    if isinstance(obj, TranscoderSet):
        _save_set(obj, out_dir, progress)
    elif isinstance(obj, MultiLayerDictionary) and obj.cfg.kind == "clt":
        _save_clt(obj, out_dir, progress)
    else:
        what = getattr(getattr(obj, "cfg", None), "kind", None) or type(obj).__name__
        raise TypeError(
            f"circuit-tracer stores per-layer transcoder sets (a TranscoderSet covering layers "
            f"0..L-1) and cross-layer transcoders, not a {what}; put single-layer transcoders "
            "in a TranscoderSet, or use another format"
        )


def _check_exportable(cfg, what: str) -> None:
    if cfg.architecture not in ("jumprelu", "relu"):
        raise ValueError(
            f"{what}: circuit-tracer 0.5.0 loads JumpReLU and ReLU dictionaries only, not "
            f"{cfg.architecture!r} (convert a batchtopk dictionary with to_jumprelu first)"
        )
    if cfg.d_in != cfg.d_out:
        raise ValueError(
            f"{what}: circuit-tracer needs d_in == d_out, got {cfg.d_in} -> {cfg.d_out}"
        )


def _folded(d):
    """`d` with its pre-encoder bias folded into b_enc (circuit-tracer has no b_pre)."""
    b_pre = getattr(d, "b_pre", None)
    if b_pre is not None and bool(jnp.any(b_pre[...] != 0)):
        return d.fold_pre_encoder_bias()
    return d


def _threshold_out(value) -> np.ndarray:
    value = np.asarray(value)
    return np.maximum(value, np.zeros((), value.dtype))


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def _ours(cfg) -> dict[str, Any]:
    """The config fields circuit-tracer has no place for (None ones left out)."""
    values = {
        "l0_target": cfg.l0_target,
        "matryoshka_widths": list(cfg.matryoshka_widths) if cfg.matryoshka_widths else None,
        "extra": cfg.extra or None,
    }
    return {k: v for k, v in values.items() if v is not None}


def _save_set(tset, out_dir: Path, progress: bool) -> None:
    in_hook = circuit_tracer_hook(tset.input_site, "input")
    out_hook = circuit_tracer_hook(tset.output_site, "output")
    if len(set(tset.widths)) != 1:
        raise ValueError(
            f"circuit-tracer needs one width for all layers, got {sorted(set(tset.widths))}"
        )
    for i, t in enumerate(tset):
        _check_exportable(t.cfg, f"layer {i}")
    for i in tqdm(range(len(tset)), desc="saving", unit="layer", disable=not progress):
        t = _folded(tset[i])
        tensors = {
            "W_enc": np.asarray(t.w_enc[...]).T,
            "W_dec": np.asarray(t.w_dec[...]),
            "b_enc": np.asarray(t.b_enc[...]),
            "b_dec": np.asarray(t.b_dec[...]),
        }
        if t.w_skip is not None:
            tensors["W_skip"] = np.asarray(t.w_skip[...]).T
        if t.threshold is not None:
            tensors["activation_function.threshold"] = _threshold_out(t.threshold[...])
        write_safetensors(out_dir / f"layer_{i}.safetensors", tensors)
        del tensors, t
    config = {
        "model_name": tset.model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": in_hook,
        "feature_output_hook": out_hook,
        "n_layers": len(tset),
    }
    if isinstance(tset.metadata.get("scan"), str):
        config["scan"] = tset.metadata["scan"]
    config["gemmascope_jax"] = {"layers": [_ours(t.cfg) for t in tset]}
    _write_config(out_dir, config)


def _save_clt(clt, out_dir: Path, progress: bool) -> None:
    cfg = clt.cfg
    n_layers = cfg.num_layers
    _check_exportable(cfg, "CLT")
    if cfg.layers != tuple(range(n_layers)):
        raise ValueError(
            f"circuit-tracer CLTs cover model layers 0..L-1 in order, got layers {cfg.layers}"
        )
    if cfg.skip:
        raise ValueError(
            "circuit-tracer 0.5.0's load_clt never reads a skip connection (W_skip), so a CLT "
            "with skip would load without it; export it in the gemma-scope-2 format instead"
        )
    sites = {s.kind for s in cfg.input_site_objects}, {s.kind for s in cfg.output_site_objects}
    if len(sites[0]) != 1 or len(sites[1]) != 1:
        raise ValueError(f"CLT mixes site kinds {sites}; circuit-tracer names one hook of each")
    in_hook = circuit_tracer_hook(sites[0].pop(), "input")
    out_hook = circuit_tracer_hook(sites[1].pop(), "output")
    clt = _folded(clt)
    for i in tqdm(range(n_layers), desc="saving", unit="layer", disable=not progress):
        enc = {
            f"W_enc_{i}": np.asarray(clt.w_enc[i]).T,
            f"b_enc_{i}": np.asarray(clt.b_enc[i]),
            f"b_dec_{i}": np.asarray(clt.b_dec[i]),
        }
        if clt.threshold is not None:
            enc[f"threshold_{i}"] = _threshold_out(clt.threshold[i])
        write_safetensors(out_dir / f"W_enc_{i}.safetensors", enc)
        del enc
        block = np.asarray(clt.w_dec[i][...])
        write_safetensors(out_dir / f"W_dec_{i}.safetensors", {f"W_dec_{i}": block})
        del block
    _write_config(
        out_dir,
        {
            "model_name": cfg.model_name,
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": in_hook,
            "feature_output_hook": out_hook,
            "n_layers": n_layers,
            "gemmascope_jax": _ours(cfg),
        },
    )
