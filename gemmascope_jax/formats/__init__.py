"""Dictionary file formats: detect, load and save Gemma Scope 2, SAELens, circuit-tracer and
our native layout.

    from gemmascope_jax.formats import load_dictionary, save_dictionary, detect_format
    d = load_dictionary("gemma-scope-2-1b-pt/transcoder/layer_13_width_16k_l0_medium_affine")
    save_dictionary(d, "out/tc13", format="saelens")          # refuses an existing out/tc13
    detect_format("out/tc13")                                  # -> "saelens"

| name             | aliases                     | folder holds                                 |
|------------------|-----------------------------|----------------------------------------------|
| `gemma-scope-2`  | gs2, gemma_scope_2          | `params.safetensors` + `config.json`, or     |
|                  |                             | `params_layer_{i}.safetensors` (CLT, xcoder) |
| `saelens`        | sae_lens, sae-lens          | `cfg.json` + `sae_weights.safetensors`       |
| `circuit-tracer` | circuit_tracer, ct          | `config.yaml` + per-layer safetensors        |
| `native`         | gemmascope-jax, gsj         | `dictionary.json` + `params.safetensors`     |

The format registry and each format module's contract: `formats/registry.py`. Format modules
are imported when first used, so a format whose module (or optional dependency) is missing
fails only when that format is asked for.
"""

from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.formats.registry import (
    DEFAULT_FORMAT,
    FORMAT_NAMES,
    FORMATS,
    canonical_format,
    detect_format,
    format_module,
    load_dictionary,
    save_dictionary,
)
from gemmascope_jax.formats.sets import load_transcoder_set, save_transcoder_set

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "FORMAT_NAMES",
    "FormatError",
    "canonical_format",
    "detect_format",
    "format_module",
    "load_dictionary",
    "load_transcoder_set",
    "save_dictionary",
    "save_transcoder_set",
]
