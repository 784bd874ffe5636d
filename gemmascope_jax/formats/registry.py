"""The format registry: names and aliases, detection, and the atomic load/save of one
dictionary folder. `gemmascope_jax.formats` re-exports it (module docstring there).

Every format module follows one contract: `NAME`, `detect(path) -> bool` (cheap, never raises
for a foreign folder), `load(path, *, progress=False)` and `save(obj, out_dir, *,
progress=False)`, which writes into an existing empty temporary folder. `save_dictionary` adds
the atomicity: it writes to a temporary sibling folder, renames it into place at the end,
refuses an existing output unless `force=True`, and leaves nothing behind when it fails.

Modules are imported when first used, so a format whose module (or optional dependency) is
missing fails only when that format is asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.io.files import atomic_output_dir

FORMAT_NAMES = ("gemma-scope-2", "saelens", "circuit-tracer", "native")
DEFAULT_FORMAT = "native"
# Detection order: the most specific marker file first.
_DETECT_ORDER = ("native", "gemma-scope-2", "saelens", "circuit-tracer")
_MODULES = {
    "gemma-scope-2": "gemma_scope_2",
    "saelens": "saelens",
    "circuit-tracer": "circuit_tracer",
    "native": "native",
}
_ALIASES = {
    "gemma-scope-2": "gemma-scope-2",
    "gemmascope-2": "gemma-scope-2",
    "gemmascope2": "gemma-scope-2",
    "gemma-scope": "gemma-scope-2",
    "gs2": "gemma-scope-2",
    "saelens": "saelens",
    "sae-lens": "saelens",
    "circuit-tracer": "circuit-tracer",
    "circuittracer": "circuit-tracer",
    "ct": "circuit-tracer",
    "native": "native",
    "gemmascope-jax": "native",
    "gsj": "native",
}
# What `detect` looks for, for the "unknown folder" message.
_LOOKS_FOR = {
    "native": "dictionary.json + params.safetensors",
    "gemma-scope-2": "params.safetensors + config.json, or params_layer_0.safetensors",
    "saelens": "cfg.json + sae_weights.safetensors",
    "circuit-tracer": "config.yaml",
}


def canonical_format(name: str) -> str:
    """The registry name of a format given any accepted spelling ("gs2", "sae_lens", ...)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key not in _ALIASES:
        raise ValueError(
            f"unknown dictionary format {name!r}; expected one of {list(FORMAT_NAMES)} "
            f"(aliases: {', '.join(sorted(k for k in _ALIASES if k not in FORMAT_NAMES))})"
        )
    return _ALIASES[key]


def format_module(name: str) -> ModuleType:
    """The module implementing format `name` (imported on first use)."""
    return importlib.import_module(f"gemmascope_jax.formats.{_MODULES[canonical_format(name)]}")


class _LazyFormats(Mapping):
    """`FORMATS[name]` imports `gemmascope_jax.formats.<module>` on first access."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in _MODULES:
            raise KeyError(name)
        return format_module(name)

    def __iter__(self) -> Iterator[str]:
        return iter(FORMAT_NAMES)

    def __len__(self) -> int:
        return len(FORMAT_NAMES)

    def __repr__(self) -> str:
        return f"FORMATS({', '.join(FORMAT_NAMES)})"


FORMATS: Mapping[str, ModuleType] = _LazyFormats()


def detect_format(path: str | os.PathLike) -> str:
    """The format of the dictionary folder `path`; FormatError saying what was looked for."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise FormatError(f"{path}: a dictionary is a folder, not a file (give its folder)")
    missing = []
    for name in _DETECT_ORDER:
        try:
            module = format_module(name)
        except ImportError as e:
            missing.append(f"{name} (module unavailable: {e})")
            continue
        if module.detect(path):
            return name
    looked = ", ".join(f"no {what} ({name})" for name, what in _LOOKS_FOR.items())
    unavailable = f"; not checked: {', '.join(missing)}" if missing else ""
    raise FormatError(
        f"{path}: not a dictionary folder in any known format: {looked}{unavailable}; "
        f"found {sorted(p.name for p in path.iterdir())[:20]}"
    )


def load_dictionary(path: str | os.PathLike, format: str | None = None, *, progress: bool = False):
    """Load a dictionary (or a per-layer set, for formats that hold one) from a local folder.

    `format=None` detects it (`detect_format`). Malformed files raise FormatError naming the
    file and tensor.
    """
    path = Path(path)
    name = detect_format(path) if format is None else canonical_format(format)
    if not path.is_dir():
        raise FormatError(f"{path}: no such dictionary folder")
    try:
        return format_module(name).load(path, progress=progress)
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        # a safety net: every known malformation has its own message; anything else in a
        # file is still reported as a malformed folder, never as a bare crash
        raise FormatError(
            f"{path}: malformed {name} dictionary folder ({type(e).__name__}: {e})"
        ) from e


def save_dictionary(
    obj,
    out: str | os.PathLike,
    format: str = DEFAULT_FORMAT,
    *,
    force: bool = False,
    replace_ours: bool = False,
    progress: bool = False,
) -> Path:
    """Write `obj` to the folder `out` in `format`; returns `out`.

    Atomic: written to a temporary sibling folder and renamed at the end; an existing,
    non-empty `out` raises FileExistsError unless `force=True` (or `replace_ours=True` and
    gemmascope-jax wrote it: see `io.files.atomic_output_dir`); a failure leaves neither a
    partial `out` nor the temporary folder.
    """
    module = format_module(format)
    out = Path(out)
    with atomic_output_dir(out, force=force, replace_ours=replace_ours) as tmp:
        module.save(obj, tmp, progress=progress)
    return out
