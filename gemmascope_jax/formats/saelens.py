"""SAELens v6 folders (`cfg.json` + `sae_weights.safetensors`), import and export.

A folder written by `save` loads unchanged in SAELens 6.54 with `SAE.load_from_disk(path)`
(the base class dispatches on `architecture`, transcoders included) and gives our outputs.
`load` reads SAELens v6 folders (nested `metadata`) and pre-6.0 flat configs.

Architectures:

| our kind / activation      | SAELens architecture       | extra tensors                        |
|----------------------------|----------------------------|--------------------------------------|
| sae / jumprelu             | `jumprelu`                 | `threshold` [F]                      |
| sae / relu                 | `standard`                 |                                      |
| sae / topk                 | `topk` (with `k`)          |                                      |
| transcoder / jumprelu      | `jumprelu_transcoder`      | `threshold`                          |
| transcoder / relu          | `transcoder`               |                                      |
| skip_transcoder / jumprelu | `jumprelu_skip_transcoder` | `threshold`, `W_skip` [d_out, d_in]  |
| skip_transcoder / relu     | `skip_transcoder`          | `W_skip` [d_out, d_in]               |

Not exportable (FormatError with the reason): CLTs and crosscoders (SAELens has one dictionary
per hook point and reads a CLT only as a single layer with its decoders summed, which
changes the outputs), `batchtopk` (a batch-level activation; convert with
`d.to_jumprelu(x_calibration)` first, as SAELens does at the end of training) and TopK
transcoders (SAELens has none). Not importable: `gated`, `abstopk`, `matching_pursuit`,
`temporal`, per-head SAEs (`hook_head_index`), and runtime normalisation
(`constant_norm_rescale`, `layer_norm`, `covariance_whitening`).

Orientation: SAELens `W_enc` [d_in, F], `W_dec` [F, d_out], `b_enc`, `b_dec`, `threshold` are
our arrays as they are; `W_skip` [d_out, d_in] is our `w_skip` transposed (SAELens applies
`x @ W_skip.T`; SAELens' Gemma Scope 2 loader maps `W_skip = affine_skip_connection.T`).

Mapping decisions:
- Pre-encoder bias. SAELens `apply_b_dec_to_input=True` computes `(x - b_dec) @ W_enc + b_enc`,
  i.e. our `b_pre = b_dec`; `load` sets exactly that. `save` writes `apply_b_dec_to_input=True`
  when an SAE's `b_pre` equals its `b_dec` bit for bit, `False` when `b_pre` is zero, and
  otherwise folds `b_pre` into `b_enc` (`fold_pre_encoder_bias`). Transcoders always fold
  (SAELens refuses `apply_b_dec_to_input` for them).
- `normalize_activations`: `save` writes `none`. `load` accepts `none`, and
  `expected_average_only_in` when the folder holds SAELens' `activation_scaler.json` (a
  training checkpoint): the constant factor s (the SAE saw `x * s`) is folded exactly as
  SAELens' `fold_activation_norm_scaling_factor` does (`fold_input_scale(1 / s)`); a null
  factor means no scaling. Without that file the factor is unknown -> FormatError. The
  other modes normalise per token and cannot be represented -> FormatError.
- TopK `rescale_acts_by_decoder_norm=True` is folded on load (w_enc and b_enc times the
  decoder row norms, w_dec rows divided by them: SAELens' own `fold_W_dec_norm`), which
  leaves SAELens' codes and outputs unchanged. `save` writes False.
- Legacy `scaling_factor` (pre-6.0 finetuning scale, codes multiplied before decoding) is
  dropped when all ones and otherwise folded into `W_dec` rows.
- Hook names. `metadata.hook_name` is the TransformerLens/SAELens name of our site
  (`resid_post.L` -> `blocks.L.hook_resid_post`, `attn_z.L` -> `blocks.L.attn.hook_z`,
  `mlp_in.L` -> `blocks.L.hook_mlp_in` as SAELens' Gemma Scope 2 configs write it, ...) or,
  for sites TransformerLens has no hook for, the transformers hook string. Transcoders also
  get `hook_name_out`. `hf_hook_name` (and `hf_hook_name_out`) always hold the exact Gemma
  Scope 2 strings; `load` prefers them over `hook_name`.
- `attn_z` SAEs are written with `reshape_activations="none"`, as SAELens' own Gemma Scope 2
  loader does: the SAE takes the flat [..., n_heads * d_head] vector, which is our `attn_z`
  site and the transformers `o_proj` input. `load` accepts both `none` and `hook_z`.
- Metadata written: SAELens' `LLM_METADATA_KEYS` (model_name, hook names, context_size 1024
  and prepend_bos True as SAELens' GS2 loader, exclude_special_tokens True, seqpos_slice,
  an empty model_from_pretrained_kwargs, ...) plus a `gemmascope_jax` block with our config
  (site names, l0_target, matryoshka_widths, extra). SAELens keeps unknown metadata keys, so
  a folder re-saved by SAELens still carries them. On load, the SAELens metadata is kept in
  `cfg.extra["saelens_metadata"]` and reused by `save`.
- dtype: tensors are written in the dictionary's dtype (`float32`, `bfloat16`, `float16`)
  and `cfg.json` names it; a `float64` SAELens file loads as float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.formats.io import FormatError, TensorReader, read_json, write_json
from gemmascope_jax.gemma3.sites import Site, hf_hook_point, resolve_site, tl_hook_name
from gemmascope_jax.safetensors_io import write_safetensors

NAME = "saelens"
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"
SAELENS_VERSION = "6.54.12"  # the SAELens release this layout is tested against
OUR_BLOCK = "gemmascope_jax"

# SAELens architecture -> (our kind, our activation)
_IMPORT = {
    "standard": ("sae", "relu"),
    "jumprelu": ("sae", "jumprelu"),
    "topk": ("sae", "topk"),
    "transcoder": ("transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
_EXPORT = {v: k for k, v in _IMPORT.items()}
_TRANSCODER_KINDS = ("transcoder", "skip_transcoder")

_NORMALIZE_MODES = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
# SAELens `LLM_METADATA_KEYS`: what `handle_pre_6_0_config` moves from a flat config into
# `metadata`.
_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
_HOOK_KEYS = (
    "hook_name",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPES.update({f"torch.{k}": v for k, v in _DTYPES.items()})
_DTYPES.update({"float64": "float32", "torch.float64": "float32"})


# ---- detect -------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    """A folder with `cfg.json` (holding `d_in` and `d_sae`) and `sae_weights.safetensors`."""
    try:
        path = Path(path)
        if not (path.is_dir() and (path / WEIGHTS_FILENAME).is_file()):
            return False
        cfg = json.loads((path / CFG_FILENAME).read_text())
        return isinstance(cfg, dict) and "d_in" in cfg and "d_sae" in cfg
    except (OSError, ValueError):
        return False


# ---- load ---------------------------------------------------------------------------------


def load(path: Path, *, progress: bool = False):
    """Read a SAELens folder into a `SingleLayerDictionary` (see the module docstring)."""
    from gemmascope_jax.dictionaries import DictionaryConfig, dictionary_class

    del progress  # one small file
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    top, meta = _normalized_config(read_json(cfg_path), cfg_path)

    arch = top.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in _IMPORT:
        raise FormatError(
            f"{cfg_path}: architecture {arch!r} is not supported; supported: {sorted(_IMPORT)}"
        )
    kind, activation = _IMPORT[arch]
    d_in, d_sae = _int_field(top, "d_in", cfg_path), _int_field(top, "d_sae", cfg_path)
    d_out = _int_field(top, "d_out", cfg_path) if kind in _TRANSCODER_KINDS else d_in
    k = _int_field({"k": 100, **top}, "k", cfg_path) if activation == "topk" else None
    dtype = _DTYPES.get(str(top.get("dtype", "float32")))
    if dtype is None:
        raise FormatError(f"{cfg_path}: unsupported dtype {top.get('dtype')!r}")
    # missing fields default as in SAELens' config dataclasses
    apply_b_dec = top.get("apply_b_dec_to_input", kind not in _TRANSCODER_KINDS)
    if not isinstance(apply_b_dec, bool):
        raise FormatError(f"{cfg_path}: apply_b_dec_to_input must be true/false")
    if apply_b_dec and kind in _TRANSCODER_KINDS:
        raise FormatError(
            f"{cfg_path}: apply_b_dec_to_input=true is invalid for a transcoder "
            "(b_dec lives in the output space)"
        )
    scale = _input_scale(top.get("normalize_activations", "none"), path, cfg_path)
    if top.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise FormatError(
            f"{cfg_path}: reshape_activations {top.get('reshape_activations')!r} is not "
            "'none' or 'hook_z'"
        )

    ours = meta.get(OUR_BLOCK) if isinstance(meta.get(OUR_BLOCK), dict) else {}
    site_in, site_out = _sites(meta, kind, cfg_path, ours.get("model_num_layers"))

    # tensors
    reader = TensorReader(weights_path)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    names += ["threshold"] if activation == "jumprelu" else []
    names += ["W_skip"] if kind == "skip_transcoder" else []
    reader.require(names, optional=("scaling_factor",))
    dims = f"{cfg_path.name} d_in={d_in}, d_sae={d_sae}" + (
        f", d_out={d_out}" if kind in _TRANSCODER_KINDS else ""
    )
    shapes = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "threshold": (d_sae,),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "W_skip": (d_out, d_in),
        "scaling_factor": (d_sae,),
    }
    raw = {}
    for name in [*names, *(["scaling_factor"] if "scaling_factor" in reader else [])]:
        try:
            raw[name] = reader.read(name, shapes[name], dtype=np.float32)
        except FormatError as e:
            raise FormatError(f"{e} (from {dims})") from None

    arrays = {
        "w_enc": raw["W_enc"],
        "b_enc": raw["b_enc"],
        "w_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
        "b_pre": raw["b_dec"] if apply_b_dec else np.zeros(d_in, np.float32),
    }
    if activation == "jumprelu":
        arrays["threshold"] = raw["threshold"]
    if kind == "skip_transcoder":
        arrays["w_skip"] = np.ascontiguousarray(raw["W_skip"].T)
    if "scaling_factor" in raw and not np.all(raw["scaling_factor"] == 1):
        arrays["w_dec"] = raw["scaling_factor"][:, None] * arrays["w_dec"]
    if activation == "topk" and top.get("rescale_acts_by_decoder_norm", False):
        norms = np.linalg.norm(arrays["w_dec"].astype(np.float64), axis=-1)
        norms = np.maximum(norms, 1e-30)
        arrays["w_enc"] = (arrays["w_enc"] * norms[None, :]).astype(np.float32)
        arrays["b_enc"] = (arrays["b_enc"] * norms).astype(np.float32)
        arrays["w_dec"] = (arrays["w_dec"] / norms[:, None]).astype(np.float32)

    extra = dict(ours.get("extra") or {}) if isinstance(ours.get("extra"), dict) else {}
    derived = (OUR_BLOCK, "model_name", "sae_lens_version", *_HOOK_KEYS)
    extra["saelens_metadata"] = {key: v for key, v in meta.items() if key not in derived}
    try:
        cfg = DictionaryConfig(
            kind=kind,
            architecture=activation,
            d_in=d_in,
            d_out=d_out,
            width=d_sae,
            layers=(site_in.layer,),
            input_sites=(site_in.name,),
            output_sites=None if site_out is None else (site_out.name,),
            model_name=meta.get("model_name"),
            model_num_layers=ours.get("model_num_layers"),
            l0_target=ours.get("l0_target"),
            k=k,
            matryoshka_widths=ours.get("matryoshka_widths"),
            dtype=dtype,
            extra=extra,
        )
        d = dictionary_class(kind).from_arrays(cfg, arrays)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    if scale is not None:
        d = d.fold_input_scale(1.0 / scale)
    return d


def _normalized_config(raw: dict, cfg_path: Path) -> tuple[dict, dict]:
    """(top-level fields, metadata) of a v6 config or of a pre-6.0 flat one (converted as
    SAELens' `handle_pre_6_0_config` does)."""
    meta = raw.get("metadata", {})
    if not isinstance(meta, dict):
        raise FormatError(f"{cfg_path}: 'metadata' must be a JSON object")
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    if version and not _older_than_6(str(version)):
        top = {key: v for key, v in raw.items() if key != "metadata"}
        # lenient: metadata keys at the top level (as SAELens' HF loaders produce) count too
        return top, {**{key: raw[key] for key in _METADATA_KEYS if key in raw}, **meta}
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    new = {renames.get(key, key): v for key, v in raw.items() if key != "metadata"}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    norm = new.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    if "hook_name" in new and "reshape_activations" not in new:
        new["reshape_activations"] = "hook_z" if "hook_z" in str(new["hook_name"]) else "none"
    return new, {**{key: new[key] for key in _METADATA_KEYS if key in new}, **meta}


def _older_than_6(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version("6.0.0-rc.0")
    except InvalidVersion:
        return False


def _int_field(top: dict, name: str, cfg_path: Path) -> int:
    value = top.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(f"{cfg_path}: field {name!r} must be a positive int, got {value!r}")
    return value


def _input_scale(mode: Any, folder: Path, cfg_path: Path) -> float | None:
    """The constant input scale s to fold (SAE saw `x * s`), None for no scaling."""
    if mode not in _NORMALIZE_MODES:
        raise FormatError(f"{cfg_path}: unknown normalize_activations {mode!r}")
    if mode == "none":
        return None
    if mode != "expected_average_only_in":
        raise FormatError(
            f"{cfg_path}: normalize_activations={mode!r} normalises each token at run time, "
            "which a dictionary's weights cannot represent; only 'none' and a folded "
            "'expected_average_only_in' are supported"
        )
    scaler = folder / SCALER_FILENAME
    if not scaler.is_file():
        raise FormatError(
            f"{cfg_path}: normalize_activations='expected_average_only_in' but the scaling "
            f"factor is not stored ({scaler.name} missing); fold it in SAELens with "
            "sae.fold_activation_norm_scaling_factor(s) and save again"
        )
    data = read_json(scaler)
    if data.get("has_whitening"):
        raise FormatError(f"{scaler}: activation whitening cannot be represented")
    s = data.get("scaling_factor")
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
        raise FormatError(f"{scaler}: scaling_factor must be a positive number, got {s!r}")
    return float(s)


def _sites(
    meta: dict, kind: str, cfg_path: Path, num_layers: int | None
) -> tuple[Site, Site | None]:
    depth = num_layers if isinstance(num_layers, int) and num_layers > 0 else 1 << 30
    if meta.get("hook_head_index") is not None:
        raise FormatError(
            f"{cfg_path}: a per-head SAE (hook_head_index={meta['hook_head_index']}) has no "
            "equivalent site; only whole-layer hooks are supported"
        )

    def resolve(keys: tuple[str, ...], what: str) -> Site | None:
        given = [(key, meta[key]) for key in keys if isinstance(meta.get(key), str)]
        problems = []
        for key, name in given:
            try:
                site = resolve_site(name, depth)
            except ValueError:
                problems.append(f"{key}={name!r}")
                continue
            if site.layer is None:
                problems.append(f"{key}={name!r} (no layer)")
                continue
            return site
        if problems:
            raise FormatError(
                f"{cfg_path}: cannot map the {what} hook to a Gemma 3 site: "
                + ", ".join(problems)
                + "; expected a TransformerLens hook such as blocks.5.hook_resid_post or a "
                "transformers path such as model.layers.5.output"
            )
        return None

    site_in = resolve(("hf_hook_name", "hook_name"), "input")
    if site_in is None:
        raise FormatError(f"{cfg_path}: metadata has no hook_name (the site the SAE reads)")
    site_out = None
    if kind in _TRANSCODER_KINDS:
        site_out = resolve(("hf_hook_name_out", "hook_name_out"), "output")
    return site_in, site_out


# ---- save ---------------------------------------------------------------------------------


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
    arch = _EXPORT.get((cfg.kind, cfg.architecture))
    if arch is None:
        raise FormatError(
            f"SAELens has no {cfg.architecture} {cfg.kind}; exportable: "
            + ", ".join(f"{kd}/{a}" for kd, a in _EXPORT)
        )
    out_dir = Path(out_dir)
    transcoder = cfg.kind in _TRANSCODER_KINDS

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
    if cfg.kind in _TRANSCODER_KINDS:
        site_out = cfg.output_site_objects[0]
        meta.update(hook_name_out=tl_hook_name(site_out), hook_head_index_out=None)
    meta["hf_hook_name"] = hf_hook_point(site_in)
    if cfg.kind in _TRANSCODER_KINDS:
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
        if key not in meta and key not in _HOOK_KEYS and key != OUR_BLOCK:
            meta[key] = value
    ours = cfg.to_dict()
    ours["extra"] = {key: v for key, v in ours["extra"].items() if key != "saelens_metadata"}
    meta[OUR_BLOCK] = ours
    return meta
