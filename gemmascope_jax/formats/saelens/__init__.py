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

Modules: `layout` (file names, the architecture table, the config values and metadata keys
SAELens knows), `read` (folders into dictionaries), `write` (dictionaries into folders); this
one detects the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmascope_jax.formats.saelens.layout import CFG_FILENAME, WEIGHTS_FILENAME
from gemmascope_jax.formats.saelens.read import load
from gemmascope_jax.formats.saelens.write import save

NAME = "saelens"

__all__ = ["CFG_FILENAME", "NAME", "WEIGHTS_FILENAME", "detect", "load", "save"]


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
