"""Native format: lossless `Dictionary` files for every kind.

A folder with

- `dictionary.json`: `{"format": "gemmascope-jax", "format_version": 1, "config":
  DictionaryConfig.to_dict(), "tensors": [{"name", "shape", "dtype"}, ...]}` (plus the GS2
  hook strings and the library version, for readers; ignored on load);
- `params.safetensors`: every nnx `Param` of the dictionary under its flat nnx state path
  (`w_enc`, `b_enc`, `threshold`, `w_dec`, `b_dec`, `w_skip`, `b_pre`; multi-layer kinds
  `w_dec.0` .. `w_dec.{L-1}`, the causal blocks [F, L - l, D]), in the dictionary's dtype.

Everything the config holds survives (Matryoshka widths, k, b_pre, bfloat16, `extra`);
native -> native is bit-for-bit. Tensors are read and written one at a time.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemmascope_jax.formats.io import FormatError, TensorReader
from gemmascope_jax.io.files import read_json, write_json
from gemmascope_jax.io.safetensors import write_safetensors

NAME = "native"
FORMAT_ID = "gemmascope-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "dictionary.json"
PARAMS_FILE = "params.safetensors"


def detect(path: Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()


def load(path: Path, *, progress: bool = False):
    from gemmascope_jax.dictionaries import DictionaryConfig, dictionary_class
    from gemmascope_jax.dictionaries.base import OPTIONAL_PARAMS

    path = Path(path)
    meta_path = path / CONFIG_FILE
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT_ID:
        raise FormatError(f"{meta_path}: 'format' is {meta.get('format')!r}, not {FORMAT_ID!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{meta_path}: 'format_version' must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{meta_path}: format_version {version!r} is not supported (this library reads "
            f"versions up to {FORMAT_VERSION}; upgrade gemmascope-jax)"
        )
    if not isinstance(meta.get("config"), dict):
        raise FormatError(f"{meta_path}: missing the 'config' object")
    try:
        cfg = DictionaryConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{meta_path}: invalid config: {e}") from None
    specs = dictionary_class(cfg.kind).param_specs(cfg)
    listed = _listed_tensors(meta.get("tensors", []), meta_path)

    reader = TensorReader(path / PARAMS_FILE)
    optional = [n for n in specs if n.split(".")[0] in OPTIONAL_PARAMS]
    reader.require([n for n in specs if n not in optional], optional=optional)
    arrays = {}
    names = [n for n in specs if n in reader]
    for name in tqdm(names, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        value = reader.read(name, specs[name][0], dtype=None)
        if str(value.dtype) != cfg.dtype:
            raise FormatError(
                f"{reader.path}: tensor {name!r} is {value.dtype}, but {meta_path} says "
                f"dtype={cfg.dtype!r}"
            )
        entry = listed.get(name)
        if entry is not None and (
            entry["shape"] != list(value.shape) or entry["dtype"] != cfg.dtype
        ):
            raise FormatError(
                f"{meta_path}: tensor {name!r} is listed as {entry}, but {reader.path} holds "
                f"{list(value.shape)} {value.dtype}"
            )
        arrays[name] = jnp.asarray(value)
        del value
    try:
        return dictionary_class(cfg.kind).from_arrays(cfg, arrays)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None


def _listed_tensors(tensors, meta_path: Path) -> dict[str, dict]:
    """`dictionary.json` "tensors": a list of {"name": str, "shape": [int >= 0], "dtype": str}."""
    if not isinstance(tensors, list):
        raise FormatError(
            f"{meta_path}: 'tensors' must be a list of {{name, shape, dtype}} objects, got "
            f"{tensors!r:.100}"
        )
    listed = {}
    for i, t in enumerate(tensors):
        ok = (
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
        )
        if not ok:
            raise FormatError(
                f'{meta_path}: \'tensors\'[{i}] must be {{"name": str, "shape": [int >= 0], '
                f'"dtype": str}}, got {t!r:.200}'
            )
        if t["name"] in listed:
            raise FormatError(f"{meta_path}: 'tensors' lists {t['name']!r} twice")
        listed[t["name"]] = t
    return listed


def save(obj, out_dir: Path, *, progress: bool = False) -> None:
    from gemmascope_jax._version import __version__
    from gemmascope_jax.dictionaries import Dictionary

    if not isinstance(obj, Dictionary):
        raise TypeError(
            f"the native format stores a Dictionary, got {type(obj).__name__}; save a per-layer "
            "set layer by layer or in the circuit-tracer format"
        )
    out_dir = Path(out_dir)
    cfg = obj.cfg
    arrays = obj.arrays()
    tensors = {}
    items = tqdm(arrays.items(), desc="saving", unit="tensor", disable=not progress)
    for name, value in items:
        tensors[name] = np.asarray(value)
    meta = {
        "format": FORMAT_ID,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": cfg.to_dict(),
        "tensors": [
            {"name": n, "shape": list(t.shape), "dtype": str(t.dtype)} for n, t in tensors.items()
        ],
        "hf_hook_points_in": list(cfg.hf_hook_points_in),
        "hf_hook_points_out": list(cfg.hf_hook_points_out),
    }
    write_safetensors(out_dir / PARAMS_FILE, tensors, {"format": FORMAT_ID})
    write_json(out_dir / CONFIG_FILE, meta)
