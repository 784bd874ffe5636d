"""Gemma Scope 2 folders (docs/formats.md): import and export.

Single-layer folder (SAE, transcoder, `_affine` skip-transcoder):

    config.json          {"hf_hook_point_in", "hf_hook_point_out", "width", "model_name",
                          "architecture": "jump_relu", "l0", "affine_connection",
                          "type": "sae" | "transcoder"}
    params.safetensors   w_enc [d_in, F], b_enc [F], threshold [F], w_dec [F, d_out],
                         b_dec [d_out], affine_skip_connection [d_in, d_out] (`_affine` only)

    f = (pre > threshold) * relu(pre),  pre = x @ w_enc + b_enc
    y = f @ w_dec + b_dec (+ x @ affine_skip_connection)

Multi-layer folder (CLT `clt/width_262k_l0_medium[_affine]`, crosscoder
`crosscoder/layer_7_13_17_22_width_262k_l0_medium`): one `params_layer_{i}.safetensors` per
*source* layer i = 0..n-1 with w_enc [D, F], b_enc [F], threshold [F], b_dec [D] (the bias of
output layer i), w_dec [F, n, D] (decoder to every layer, upstream blocks included) and
optionally affine_skip_connection [D, D] (layer i -> layer i), plus a `config.json`.

    y[lo] = sum_{li <= lo} f[li] @ w_dec_file_li[:, lo, :] + b_dec_file_lo (+ x[lo] @ A_lo)

Decisions where the released files are not documented (also in docs/formats.md):

- Upstream decoder blocks (`w_dec[:, :i, :]` of file i). A multi-layer dictionary is causal by
  definition (source layer l writes layers >= l), which is how every loader uses it
  (circuit-tracer slices `w_dec[:, i:, :]`). Export writes those blocks as exact zeros;
  import checks them and, if any is non-zero, emits `UpstreamDecoderWarning` naming the files
  and the largest magnitude, and drops them.
- The number of source layers is the number of `params_layer_{i}` files (0..n-1, none may be
  missing). Crosscoder layers come from `config.json` `layers`, else from the folder name
  `layer_7_13_17_22_width_...`; CLT layers default to 0..n-1 (every model layer).
- The multi-layer `config.json` is ours (the real one's contents are unverified): the
  single-layer keys with `hf_hook_point_in/out` as lists (one string per layer), `width` the
  total latent count F * n (the folder label: 1B "262k" = 10080 x 26), `type` `clt` or
  `crosscoder`, plus `n_layers`, `layers` and `width_per_layer`. On import the file is
  optional: a missing config.json, or missing keys, are inferred from the tensors, the folder
  name (`gemma-scope-2-1b-pt` in an ancestor gives the model) and the kind's default sites;
  a single hook string applies its site to every layer; `width` may be F * n or F.
- GS2 is JumpReLU-only. Exporting `relu` writes threshold 0 (identical outputs);
  `topk` / `batchtopk` raise: convert a BatchTopK dictionary first with
  `Dictionary.to_jumprelu(x_calibration)`, which calibrates thresholds on activations.
  A non-zero pre-encoder bias `b_pre` is folded into `b_enc` (same outputs).
- Model depth (for sites and bounds) comes from `model_name` via the Gemma 3 presets; names
  without `google/` or spelled `gemma-v3` are understood (as SAELens does).
- Keys of config.json that this module does not know are kept in
  `cfg.extra["gemma_scope_2_config"]` and written back on export.
- Dtypes are preserved (the dictionary takes the dtype of `w_dec`).

Multi-layer folders are read and written one `params_layer` file at a time.

Modules: `layout` (file names, config keys, what folder names tell), `read` (folders into
dictionaries, `UpstreamDecoderWarning`), `write` (dictionaries into folders); this one picks
the layout and dispatches.
"""

from __future__ import annotations

from pathlib import Path

from gemmascope_jax.formats.gemma_scope_2.layout import (
    CONFIG_FILE,
    LAYER_FILE,
    LAYER_FILE_RE,
    PARAMS_FILE,
)
from gemmascope_jax.formats.gemma_scope_2.read import load_multi, load_single
from gemmascope_jax.formats.gemma_scope_2.write import gs2_compatible, save_multi, save_single
from gemmascope_jax.formats.io import FormatError

NAME = "gemma-scope-2"


def detect(path: Path) -> bool:
    path = Path(path)
    single = (path / PARAMS_FILE).is_file() and (path / CONFIG_FILE).is_file()
    return single or _is_multi(path)


def _is_multi(path: Path) -> bool:
    return path.is_dir() and any(LAYER_FILE_RE.fullmatch(p.name) for p in path.iterdir())


def load(path: Path, *, progress: bool = False):
    path = Path(path)
    if _is_multi(path):
        return load_multi(path, progress)
    if (path / PARAMS_FILE).is_file():
        return load_single(path)
    raise FormatError(
        f"{path}: not a Gemma Scope 2 folder (no {PARAMS_FILE} + {CONFIG_FILE}, no "
        f"{LAYER_FILE.format(0)})"
    )


def save(obj, out_dir: Path, *, progress: bool = False) -> None:
    from gemmascope_jax.dictionaries import Dictionary

    if not isinstance(obj, Dictionary):
        raise TypeError(f"the Gemma Scope 2 format stores a Dictionary, got {type(obj).__name__}")
    d = gs2_compatible(obj)
    if d.cfg.multilayer:
        save_multi(d, Path(out_dir), progress)
    else:
        save_single(d, Path(out_dir))
