"""What a Gemma Scope 2 folder looks like (the format is described in the package docstring,
`formats.gemma_scope_2`): its file names and `config.json` keys, how the released folders are
named (site folders, `layer_{L}_width_...`, the `gemma-scope-2-1b-pt` repository) and what
those names tell about the dictionary and its model. Shared by `read` and `write`.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
LAYER_FILE = "params_layer_{}.safetensors"
GS2_ARCHITECTURE = "jump_relu"
EXTRA_KEY = "gemma_scope_2_config"
SINGLE_KEYS = (
    "hf_hook_point_in",
    "hf_hook_point_out",
    "width",
    "model_name",
    "architecture",
    "l0",
    "affine_connection",
    "type",
)
MULTI_KEYS = (*SINGLE_KEYS, "n_layers", "layers", "width_per_layer")
LAYER_FILE_RE = re.compile(r"params_layer_(\d+)\.safetensors")
CROSSCODER_DIR_RE = re.compile(r"layer_(\d+(?:_\d+)+)_width_")
SINGLE_DIR_RE = re.compile(r"layer_(\d+)_width_")
REPO_RE = re.compile(r"gemma-scope-2-(\d+(?:\.\d+)?[mb])-(pt|it)\b")
# GS2 site folders -> (input, output) site kinds, for configs without hook strings.
FOLDER_SITES = {
    "resid_post": ("resid_post", "resid_post"),
    "attn_out": ("attn_z", "attn_z"),
    "mlp_out": ("mlp_out", "mlp_out"),
    "transcoder": ("mlp_in", "mlp_out"),
}


def model_num_layers(model_name: str | None) -> int | None:
    """Depth of the Gemma 3 model a GS2 `model_name` names (`google/gemma-3-1b-pt`,
    `gemma-3-1b-it`, `gemma-v3-270m`), or None when it names no preset."""
    from gemmascope_jax.gemma3.config import preset

    if not isinstance(model_name, str):
        return None
    name = model_name.strip().lower().removeprefix("google/").replace("-v3", "-3")
    try:
        return preset(name).num_layers
    except ValueError:
        return None


def model_from_path(path: Path) -> str | None:
    """`google/gemma-3-1b-pt` when a folder on the path is (a HF cache of) `gemma-scope-2-1b-pt`."""
    for part in (path, *path.parents):
        if m := REPO_RE.search(part.name):
            return f"google/gemma-3-{m[1]}-{m[2]}"
    return None
