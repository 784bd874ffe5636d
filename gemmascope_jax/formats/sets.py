"""Load and save per-layer transcoder sets (and CLTs) for attribution.

    s = load_transcoder_set("gemma-scope-2-270m-pt/transcoder_all")   # folder of per-layer
    s = load_transcoder_set("ct_folder")                 # circuit-tracer set or CLT
    s = load_transcoder_set(["tc/layer_0_...", "tc/layer_1_...", ...])
    save_transcoder_set(s, "out/set", format="gemma-scope-2")

A path that is itself a dictionary folder (circuit-tracer `config.yaml`, a GS2 CLT, ...) is
loaded with `load_dictionary` and must give a `TranscoderSet` or a CLT. Otherwise its
subfolders are the members: every subfolder in a format `load_dictionary` reads (GS2
`layer_{l}_width_{W}_l0_{S}[_affine]`, SAELens, native) holding a single-layer transcoder,
exactly one per layer 0..L-1 (several variants of one layer are an error naming them: pass
the chosen folders as a list). `save_transcoder_set` writes circuit-tracer's own layout for
`circuit-tracer` and one subfolder per layer (`layer_{l}_width_{F}[_affine]`) otherwise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.formats.registry import (
    canonical_format,
    detect_format,
    format_module,
    load_dictionary,
    save_dictionary,
)
from gemmascope_jax.io.files import atomic_output_dir

_TRANSCODER_KINDS = ("transcoder", "skip_transcoder")


def load_transcoder_set(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """A `TranscoderSet` (or a CLT `MultiLayerDictionary`) from a folder or member folders."""
    from gemmascope_jax.dictionaries import MultiLayerDictionary
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    if isinstance(path_or_paths, (str, os.PathLike)):
        path = Path(path_or_paths)
        if not path.is_dir():
            raise FormatError(f"{path}: no such transcoder folder")
        try:
            detect_format(path)
        except FormatError:
            members = _member_folders(path)
        else:
            obj = load_dictionary(path)
            if isinstance(obj, TranscoderSet):
                return obj
            if isinstance(obj, MultiLayerDictionary) and obj.cfg.kind == "clt":
                return obj
            raise FormatError(
                f"{path}: holds one {obj.cfg.kind} (layers {obj.cfg.layers}), not a transcoder "
                "set or CLT; give the folder of all layers or a list of per-layer folders"
            )
    else:
        members = [Path(p) for p in path_or_paths]
        if not members:
            raise FormatError("no transcoder folders given")
    by_layer: dict[int, list] = {}
    for folder in members:
        d = load_dictionary(folder)
        if d.cfg.kind not in _TRANSCODER_KINDS:
            raise FormatError(f"{folder}: a {d.cfg.kind}, not a single-layer transcoder")
        by_layer.setdefault(d.cfg.layers[0], []).append((folder, d))
    if dup := {k: [str(f.name) for f, _ in v] for k, v in by_layer.items() if len(v) > 1}:
        raise FormatError(f"several transcoders for one layer: {dup}; pass one folder per layer")
    n = max(by_layer) + 1
    if missing := [i for i in range(n) if i not in by_layer]:
        raise FormatError(f"transcoder set is missing layer(s) {missing} (found 0..{n - 1})")
    transcoders = [by_layer[i][0][1] for i in range(n)]
    try:
        return TranscoderSet.from_transcoders(transcoders)
    except ValueError as e:
        raise FormatError(str(e)) from None


def _member_folders(path: Path) -> list[Path]:
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            detect_format(sub)
        except FormatError:
            continue
        found.append(sub)
    if not found:
        raise FormatError(
            f"{path}: neither a transcoder set / CLT folder nor a folder of per-layer "
            f"transcoder folders (found {sorted(p.name for p in path.iterdir())[:20]})"
        )
    return sorted(found, key=_layer_key)


def _layer_key(folder: Path):
    m = re.match(r"layer_(\d+)", folder.name)
    return (int(m[1]) if m else 1 << 30, folder.name)


def save_transcoder_set(
    tset,
    out: str | os.PathLike,
    format: str = "circuit-tracer",
    *,
    force: bool = False,
    replace_ours: bool = False,
):
    """Write a `TranscoderSet` (or a CLT) to `out` in `format`; returns `out`. Atomic."""
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    name = canonical_format(format)
    if name == "circuit-tracer" or not isinstance(tset, TranscoderSet):
        return save_dictionary(tset, out, name, force=force, replace_ours=replace_ours)
    module = format_module(name)
    with atomic_output_dir(out, force=force, replace_ours=replace_ours) as tmp:
        for layer, member in enumerate(tset):
            affine = "_affine" if member.cfg.skip else ""
            sub = tmp / f"layer_{layer}_width_{member.cfg.width}{affine}"
            sub.mkdir()
            module.save(member, sub)
    return Path(out)
