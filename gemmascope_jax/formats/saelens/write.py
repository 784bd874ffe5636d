"""Writing an SAE, transcoder or skip-transcoder as a SAELens v6 folder: the tensors under
SAELens' names and orientation (`W_skip` transposed), the pre-encoder bias kept as
`apply_b_dec_to_input` or folded, and `cfg.json` with SAELens' metadata and our own config
block; multi-layer kinds, BatchTopK and TopK transcoders are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.formats.saelens.layout import (
    CFG_FILENAME,
    EXPORT,
    HOOK_KEYS,
    OUR_BLOCK,
    SAELENS_VERSION,
    TRANSCODER_KINDS,
    WEIGHTS_FILENAME,
)
from gemmascope_jax.gemma3.sites import hf_hook_point, tl_hook_name
from gemmascope_jax.io.files import write_json
from gemmascope_jax.io.safetensors import write_safetensors


def save(obj, out_dir: Path, *, progress: bool = False) -> None:
    """Write `obj` (an SAE, transcoder or skip-transcoder) as a SAELens v6 folder."""
    del progress
    cfg = getattr(obj, "cfg", None)
    if cfg is None or not hasattr(obj, "arrays"):
        hint = (
            "; save each layer's transcoder to its own folder (`for t in s: ...`)"
            if hasattr(obj, "transcoders")
            else ""
        )
        raise FormatError(
            f"SAELens stores one single-layer dictionary per folder, got a "
            f"{type(obj).__name__}{hint}"
        )
    if cfg.multilayer:
        raise FormatError(
            f"a {cfg.kind} ({cfg.num_layers} source layers) cannot be written as SAELens: "
            "SAELens has one dictionary per hook point and reads cross-layer transcoders only "
            "as single layers with their decoders summed over output layers, which changes "
            "the outputs; use the 'gemma-scope-2', 'circuit-tracer' or 'native' format"
        )
    if cfg.architecture == "batchtopk":
        raise FormatError(
            "SAELens has no batchtopk inference architecture; convert first with "
            "d.to_jumprelu(x_calibration) (as SAELens does at the end of training)"
        )
    arch = EXPORT.get((cfg.kind, cfg.architecture))
    if arch is None:
        raise FormatError(
            f"SAELens has no {cfg.architecture} {cfg.kind}; exportable: "
            + ", ".join(f"{kd}/{a}" for kd, a in EXPORT)
        )
    out_dir = Path(out_dir)
    transcoder = cfg.kind in TRANSCODER_KINDS

    a = {n: np.asarray(v) for n, v in obj.arrays().items()}
    b_pre = a.get("b_pre")
    apply_b_dec = False
    if b_pre is not None and np.any(b_pre != 0):
        if not transcoder and np.array_equal(b_pre, a["b_dec"]):
            apply_b_dec = True
        else:
            a = {n: np.asarray(v) for n, v in obj.fold_pre_encoder_bias().arrays().items()}

    tensors = {"W_dec": a["w_dec"], "W_enc": a["w_enc"]}
    if "w_skip" in a:
        tensors["W_skip"] = np.ascontiguousarray(a["w_skip"].T)
    tensors["b_dec"], tensors["b_enc"] = a["b_dec"], a["b_enc"]
    if cfg.architecture == "jumprelu":
        tensors["threshold"] = a["threshold"]
    write_safetensors(out_dir / WEIGHTS_FILENAME, tensors, metadata={"format": "pt"})

    reshape = "none"
    cfg_json: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": reshape,
        "metadata": _metadata(cfg),
    }
    if cfg.architecture == "topk":
        cfg_json.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if transcoder:
        cfg_json["d_out"] = cfg.d_out
    cfg_json["architecture"] = arch
    write_json(out_dir / CFG_FILENAME, cfg_json)


def _metadata(cfg) -> dict[str, Any]:
    kept = cfg.extra.get("saelens_metadata")
    kept = kept if isinstance(kept, dict) else {}
    site_in = cfg.input_site_objects[0]
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": kept.get("sae_lens_training_version"),
        "model_name": cfg.model_name,
        "model_class_name": kept.get("model_class_name", "HookedTransformer"),
        "hook_name": tl_hook_name(site_in),
        "hook_head_index": None,
    }
    if cfg.kind in TRANSCODER_KINDS:
        site_out = cfg.output_site_objects[0]
        meta.update(hook_name_out=tl_hook_name(site_out), hook_head_index_out=None)
    meta["hf_hook_name"] = hf_hook_point(site_in)
    if cfg.kind in TRANSCODER_KINDS:
        meta["hf_hook_name_out"] = hf_hook_point(cfg.output_site_objects[0])
    defaults = {
        "context_size": 1024,
        "prepend_bos": True,
        "seqpos_slice": [None],
        "model_from_pretrained_kwargs": {},
        "dataset_path": None,
        "exclude_special_tokens": True,
        "neuronpedia_id": None,
    }
    for key, default in defaults.items():
        meta[key] = kept.get(key, cfg.extra.get(key, default))
    for key, value in kept.items():  # anything else SAELens (or its user) put there
        if key not in meta and key not in HOOK_KEYS and key != OUR_BLOCK:
            meta[key] = value
    ours = cfg.to_dict()
    ours["extra"] = {key: v for key, v in ours["extra"].items() if key != "saelens_metadata"}
    meta[OUR_BLOCK] = ours
    return meta
