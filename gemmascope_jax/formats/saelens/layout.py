"""What a SAELens v6 folder looks like (the format is described in the package docstring,
`formats.saelens`): its file names, the SAELens release it is tested against, the table of
architectures (SAELens' name <-> our kind and activation), the `normalize_activations` modes
and metadata keys SAELens knows, and the dtypes. Shared by `read` and `write`.
"""

from __future__ import annotations

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"
SAELENS_VERSION = "6.54.12"  # the SAELens release this layout is tested against
OUR_BLOCK = "gemmascope_jax"

# SAELens architecture -> (our kind, our activation)
IMPORT = {
    "standard": ("sae", "relu"),
    "jumprelu": ("sae", "jumprelu"),
    "topk": ("sae", "topk"),
    "transcoder": ("transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
EXPORT = {v: k for k, v in IMPORT.items()}
TRANSCODER_KINDS = ("transcoder", "skip_transcoder")

NORMALIZE_MODES = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
# SAELens `LLM_METADATA_KEYS`: what `handle_pre_6_0_config` moves from a flat config into
# `metadata`.
METADATA_KEYS = (
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
HOOK_KEYS = (
    "hook_name",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DTYPES.update({f"torch.{k}": v for k, v in DTYPES.items()})
DTYPES.update({"float64": "float32", "torch.float64": "float32"})
