"""Writing dictionaries as Gemma Scope 2 folders: a JumpReLU dictionary without pre-encoder
bias (`gs2_compatible` converts ReLU and folds `b_pre`; TopK / BatchTopK are refused), one
`params.safetensors` or one `params_layer_{i}` file per source layer, and the `config.json`
(unknown keys read from a GS2 folder written back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemmascope_jax.formats.gemma_scope_2.layout import (
    CONFIG_FILE,
    EXTRA_KEY,
    GS2_ARCHITECTURE,
    LAYER_FILE,
    PARAMS_FILE,
)
from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.io.files import write_json
from gemmascope_jax.io.safetensors import write_safetensors


def gs2_compatible(d):
    """`d` as a JumpReLU dictionary without pre-encoder bias (same outputs), or FormatError."""
    cfg = d.cfg
    if cfg.architecture == "relu":  # relu(pre) == 1[pre > 0] * relu(pre): threshold 0
        arrays = d.arrays()
        shape = (cfg.num_layers, cfg.width) if cfg.multilayer else (cfg.width,)
        arrays["threshold"] = jnp.zeros(shape, cfg.param_dtype)
        d = type(d).from_arrays(cfg.replace(architecture="jumprelu"), arrays)
    elif cfg.architecture != "jumprelu":
        hint = (
            "convert it first with d.to_jumprelu(x_calibration), which calibrates per-latent "
            "thresholds on activations"
            if cfg.architecture == "batchtopk"
            else "a TopK dictionary has no JumpReLU equivalent"
        )
        raise FormatError(
            f"Gemma Scope 2 files hold JumpReLU dictionaries only; this {cfg.kind} is "
            f"{cfg.architecture!r}: {hint} (or save it in the native or saelens format)"
        )
    if "b_pre" in (arrays := d.arrays()) and bool(jnp.any(arrays["b_pre"] != 0)):
        d = d.fold_pre_encoder_bias()
    return d


# ---- single-layer -----------------------------------------------------------------------------


def _single_config(cfg) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "hf_hook_point_in": cfg.hf_hook_points_in[0],
        "hf_hook_point_out": cfg.hf_hook_points_out[0],
        "width": cfg.width,
        "model_name": cfg.model_name,
        "architecture": GS2_ARCHITECTURE,
        "l0": cfg.l0_target,
        "affine_connection": bool(cfg.skip),
        "type": "sae" if cfg.kind == "sae" else "transcoder",
    }
    return _with_extra(conf, cfg)


def _with_extra(conf: dict, cfg) -> dict:
    conf = {k: v for k, v in conf.items() if v is not None}
    for key, value in (cfg.extra.get(EXTRA_KEY) or {}).items():
        conf.setdefault(key, value)
    return conf


def save_single(d, out_dir: Path) -> None:
    a = d.arrays()
    tensors = {
        "w_enc": a["w_enc"],
        "b_enc": a["b_enc"],
        "threshold": a["threshold"],
        "w_dec": a["w_dec"],
        "b_dec": a["b_dec"],
    }
    if d.cfg.skip:
        tensors["affine_skip_connection"] = a["w_skip"]
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    write_safetensors(out_dir / PARAMS_FILE, tensors, {"format": "pt"})
    write_json(out_dir / CONFIG_FILE, _single_config(d.cfg))


# ---- multi-layer ------------------------------------------------------------------------------


def _multi_config(cfg) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "hf_hook_point_in": list(cfg.hf_hook_points_in),
        "hf_hook_point_out": list(cfg.hf_hook_points_out),
        "width": cfg.total_width,
        "model_name": cfg.model_name,
        "architecture": GS2_ARCHITECTURE,
        "l0": cfg.l0_target,
        "affine_connection": bool(cfg.skip),
        "type": cfg.kind,
        "n_layers": cfg.num_layers,
        "layers": list(cfg.layers),
        "width_per_layer": cfg.width,
    }
    return _with_extra(conf, cfg)


def save_multi(d, out_dir: Path, progress: bool) -> None:
    cfg = d.cfg
    n, f = cfg.num_layers, cfg.width
    a = d.arrays()
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for i in tqdm(range(n), desc="saving Gemma Scope 2", unit="layer", disable=not progress):
        w_dec = np.zeros((f, n, cfg.d_out), np_dtype)
        w_dec[:, i:, :] = np.asarray(a[f"w_dec.{i}"])
        tensors = {
            "w_enc": np.asarray(a["w_enc"][i]),
            "b_enc": np.asarray(a["b_enc"][i]),
            "threshold": np.asarray(a["threshold"][i]),
            "b_dec": np.asarray(a["b_dec"][i]),
            "w_dec": w_dec,
        }
        if cfg.skip:
            tensors["affine_skip_connection"] = np.asarray(a["w_skip"][i])
        write_safetensors(out_dir / LAYER_FILE.format(i), tensors, {"format": "pt"})
        del tensors, w_dec
    write_json(out_dir / CONFIG_FILE, _multi_config(cfg))
