"""Reading SAELens folders into dictionaries: v6 configs (nested `metadata`) and pre-6.0 flat
ones, every tensor checked for shape, the folds the package docstring lists (pre-encoder bias,
a stored activation scaler, TopK decoder-norm rescaling, a legacy scaling factor) applied, and
the hook names mapped to Gemma 3 sites.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.formats.io import FormatError, TensorReader
from gemmascope_jax.formats.saelens.layout import (
    CFG_FILENAME,
    DTYPES,
    HOOK_KEYS,
    IMPORT,
    METADATA_KEYS,
    NORMALIZE_MODES,
    OUR_BLOCK,
    SCALER_FILENAME,
    TRANSCODER_KINDS,
    WEIGHTS_FILENAME,
)
from gemmascope_jax.gemma3.sites import Site, resolve_site
from gemmascope_jax.io.files import read_json


def load(path: Path, *, progress: bool = False):
    """Read a SAELens folder into a `SingleLayerDictionary` (see the module docstring)."""
    from gemmascope_jax.dictionaries import DictionaryConfig, dictionary_class

    del progress  # one small file
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    top, meta = _normalized_config(read_json(cfg_path), cfg_path)

    arch = top.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in IMPORT:
        raise FormatError(
            f"{cfg_path}: architecture {arch!r} is not supported; supported: {sorted(IMPORT)}"
        )
    kind, activation = IMPORT[arch]
    d_in, d_sae = _int_field(top, "d_in", cfg_path), _int_field(top, "d_sae", cfg_path)
    d_out = _int_field(top, "d_out", cfg_path) if kind in TRANSCODER_KINDS else d_in
    k = _int_field({"k": 100, **top}, "k", cfg_path) if activation == "topk" else None
    dtype = DTYPES.get(str(top.get("dtype", "float32")))
    if dtype is None:
        raise FormatError(f"{cfg_path}: unsupported dtype {top.get('dtype')!r}")
    # missing fields default as in SAELens' config dataclasses
    apply_b_dec = top.get("apply_b_dec_to_input", kind not in TRANSCODER_KINDS)
    if not isinstance(apply_b_dec, bool):
        raise FormatError(f"{cfg_path}: apply_b_dec_to_input must be true/false")
    if apply_b_dec and kind in TRANSCODER_KINDS:
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
        f", d_out={d_out}" if kind in TRANSCODER_KINDS else ""
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
    derived = (OUR_BLOCK, "model_name", "sae_lens_version", *HOOK_KEYS)
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
        return top, {**{key: raw[key] for key in METADATA_KEYS if key in raw}, **meta}
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
    return new, {**{key: new[key] for key in METADATA_KEYS if key in new}, **meta}


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
    if mode not in NORMALIZE_MODES:
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
    if kind in TRANSCODER_KINDS:
        site_out = resolve(("hf_hook_name_out", "hook_name_out"), "output")
    return site_in, site_out
