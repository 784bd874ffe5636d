"""gemmascope-jax: Gemma Scope 2 in JAX/Flax NNX.

import gemmascope_jax as gsj
model, tok = gsj.load_gemma3()                      # embedded Gemma 3 270M (GGUF)
out = model(tokens, capture=("resid_post.9", "model.layers.5.pre_feedforward_layernorm.output"))
out.logits, out.sites["resid_post.9"]
model(tokens, interventions={"resid_post.9": fn})
gsj.analysis.top_features(model, tok, gsj.load_dictionary("path"), "some text")
"""

from gemmascope_jax._version import __version__ as __version__
from gemmascope_jax.dictionaries import DictionaryConfig, make_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import detect_format, load_dictionary, save_dictionary
from gemmascope_jax.gemma3.config import Gemma3Config, preset
from gemmascope_jax.gemma3.loading import load_gemma3, save_gemma3
from gemmascope_jax.gemma3.model import Gemma3, Gemma3Output
from gemmascope_jax.gemma3.sites import Site, resolve_site
from gemmascope_jax.sharding import make_mesh


def __getattr__(name: str):
    """`gsj.analysis` is imported on first use (it pulls in plotting and the chat tools)."""
    if name == "analysis":
        import importlib

        return importlib.import_module("gemmascope_jax.analysis")
    raise AttributeError(f"module 'gemmascope_jax' has no attribute {name!r}")


__all__ = [
    "DictionaryConfig",
    "TranscoderSet",
    "detect_format",
    "load_dictionary",
    "make_dictionary",
    "save_dictionary",
    "Gemma3",
    "Gemma3Config",
    "Gemma3Output",
    "Site",
    "load_gemma3",
    "make_mesh",
    "preset",
    "resolve_site",
    "save_gemma3",
]
