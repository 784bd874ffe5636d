"""After training: normalisation folded into the weights, then every requested export format.

Dictionaries train on activations divided by a per-site scalar (`data.activations`); what
users receive reads and writes raw activations, so each dictionary's scalars are folded into
its weights (`fold_input_scale`, then `fold_pre_encoder_bias`). BatchTopK dictionaries become
JumpReLU with thresholds calibrated on held-out activations (`to_jumprelu`), the form every
peer format holds. The export policy: a format that cannot represent a dictionary is skipped
with the reason recorded, never fatal after a finished run; per-layer transcoders covering
every model layer are also exported together as one circuit-tracer set (`TRANSCODER_SET`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gemmascope_jax.data.activations import normalize
from gemmascope_jax.dictionaries.base import stack_sites
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import save_dictionary
from gemmascope_jax.formats.io import FormatError

log = logging.getLogger(__name__)
TRANSCODER_SET = "transcoder_set"  # export name of the per-layer transcoders as one set


def site_scales(d_cfg, scalars: Mapping[str, float]):
    """(input, output) normalisation scalars of a dictionary: floats, or [L] arrays for
    multi-layer kinds."""
    s_in = np.asarray([scalars[s] for s in d_cfg.input_sites], np.float32)
    s_out = np.asarray([scalars[s] for s in d_cfg.output_sites], np.float32)
    if not d_cfg.multilayer:
        return float(s_in[0]), float(s_out[0])
    return s_in, s_out


def fold_scales(dictionaries: Mapping, scalars: Mapping[str, float]) -> dict:
    """`{name: dictionary}` with normalisation folded in: raw activations in and out."""
    return {
        name: d.fold_input_scale(*site_scales(d.cfg, scalars)).fold_pre_encoder_bias()
        for name, d in dictionaries.items()
    }


def folded_dictionaries(step, state, scalars, pipeline, heldout_docs) -> dict:
    """A run's trained dictionaries ready to export: BatchTopK converted to JumpReLU on 4,096
    held-out calibration tokens (`pipeline.calibration_batch`), then `fold_scales`."""
    out, calib = {}, None
    for name, d in zip(step.names, step.dictionaries(state), strict=True):
        if d.cfg.architecture == "batchtopk":
            if calib is None:  # one forward for every BatchTopK dictionary of the run
                calib = normalize(pipeline.calibration_batch(heldout_docs, 4096, 3), scalars)
            d = d.to_jumprelu(stack_sites(calib, d.cfg.input_sites, d.cfg.multilayer))
        out[name] = d
    return fold_scales(out, scalars)


def export_dictionaries(cfg, dictionaries) -> dict[str, dict[str, str]]:
    """Save every dictionary in every format of `cfg.export.formats` under `cfg.export_dir`:
    `{name: {format: path or "skipped: reason"}}`. A format that cannot represent a
    dictionary (TopK in Gemma Scope 2, a CLT in SAELens, a single transcoder as a
    circuit-tracer set) is skipped with the reason recorded, not fatal after training.

    circuit-tracer holds CLTs and whole-model transcoder sets: when the run trained one
    transcoder per model layer (e.g. `{kind: transcoder, layers: all}`), they are exported
    together as `export/transcoder_set/circuit-tracer`."""
    out: dict[str, dict[str, str]] = {}
    set_members = _transcoder_set_members(dictionaries)
    for name, d in dictionaries.items():
        out[name] = {}
        for fmt in cfg.export.formats:
            if fmt == "circuit-tracer" and d.cfg.kind != "clt":
                out[name][fmt] = (
                    f"skipped: exported with the whole-model set as {TRANSCODER_SET}"
                    if name in set_members
                    else "skipped: circuit-tracer holds CLTs and whole-model transcoder sets "
                    "(train one transcoder per layer to get a set)"
                )
                continue
            out[name][fmt] = save_export(d, cfg.export_dir / name / fmt, fmt, name)
    if set_members and "circuit-tracer" in cfg.export.formats:
        members = [dictionaries[n] for n in set_members]
        try:
            tset = TranscoderSet.from_transcoders(members)
        except ValueError as e:
            out[TRANSCODER_SET] = {"circuit-tracer": f"skipped: {e}"}
        else:
            path = cfg.export_dir / TRANSCODER_SET / "circuit-tracer"
            out[TRANSCODER_SET] = {
                "circuit-tracer": save_export(tset, path, "circuit-tracer", "set")
            }
    return out


def save_export(obj, path: Path, fmt: str, name: str) -> str:
    """Save one export; the path, or "skipped: reason" when the format refuses it or `path`
    is a folder gemmascope-jax did not write."""
    try:
        # replaces an export of an earlier run, never a folder gemmascope-jax did not write
        save_dictionary(obj, path, format=fmt, replace_ours=True)
    except (FormatError, FileExistsError) as e:
        log.warning("export of %s as %s skipped: %s", name, fmt, e)
        return f"skipped: {e}"
    return str(path)


def _transcoder_set_members(dictionaries) -> list[str]:
    """Names of the run's transcoders ordered by layer when they are exactly one per model
    layer (0..L-1), else []."""
    by_layer: dict[int, list[str]] = {}
    depth = None
    for name, d in dictionaries.items():
        if d.cfg.kind in ("transcoder", "skip_transcoder"):
            by_layer.setdefault(d.cfg.layers[0], []).append(name)
            depth = d.cfg.model_num_layers
    if depth is None or sorted(by_layer) != list(range(depth)):
        return []
    if any(len(names) != 1 for names in by_layer.values()):
        return []
    return [by_layer[layer][0] for layer in range(depth)]
