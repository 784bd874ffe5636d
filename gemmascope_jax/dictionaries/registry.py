"""Kind registry and constructors: `KINDS`, `make_dictionary`, `random_dictionary`.

`KINDS` maps each kind name (as in `DictionaryConfig.kind` and our formats) to the class
that implements it, so converters and configs name kinds as strings:

    d = make_dictionary(cfg, nnx.Rngs(0))        # GS2 init (TR §3.2)
    d = KINDS[cfg.kind].from_arrays(cfg, arrays) # from loaded tensors
    d = random_dictionary(cfg, seed=0)           # non-trivial random weights for tests

`random_dictionary` draws every parameter independently (encoder not tied to the decoder,
random positive thresholds, non-zero biases and skip) so that orientation or bias mistakes
in a converter change the outputs. With unit-variance inputs about 10-40 % of JumpReLU
latents fire.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.dictionaries.multilayer import MultiLayerDictionary
from gemmascope_jax.dictionaries.single import SingleLayerDictionary

KINDS: dict[str, type[Dictionary]] = {
    "sae": SingleLayerDictionary,
    "transcoder": SingleLayerDictionary,
    "skip_transcoder": SingleLayerDictionary,
    "clt": MultiLayerDictionary,
    "crosscoder": MultiLayerDictionary,
}


def dictionary_class(kind: str) -> type[Dictionary]:
    if kind not in KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def make_dictionary(cfg: DictionaryConfig, rngs: nnx.Rngs | None = None) -> Dictionary:
    """A freshly initialised dictionary (GS2 init); `rngs=None` uses `nnx.Rngs(0)`.

    Works under `nnx.eval_shape` for shape-only construction of large dictionaries.
    """
    return dictionary_class(cfg.kind)(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


def random_arrays(
    cfg: DictionaryConfig, seed: int = 0, *, pre_bias: bool = False
) -> dict[str, jax.Array]:
    """Random float32 parameters `{flat name: array}` for `cfg` (see module docstring).

    w_enc ~ N(0, 1/d_in) (unit-norm columns on average), b_enc ~ N(0, 0.1²),
    threshold ~ U(0.1, 1), w_dec rows unit-norm, b_dec ~ N(0, 0.1²), w_skip ~ N(0, 1/d_in),
    b_pre ~ N(0, 0.1²) if `pre_bias` else 0.
    """
    specs = dictionary_class(cfg.kind).param_specs(cfg)
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilation, fast for tests
    out = {}
    for name, (shape, _) in specs.items():
        base = name.split(".")[0]
        if base in ("w_enc", "w_skip"):
            value = rng.standard_normal(shape) / np.sqrt(cfg.d_in)
        elif base == "w_dec":
            value = rng.standard_normal(shape)
            value /= np.linalg.norm(value, axis=-1, keepdims=True)
        elif base == "threshold":
            value = rng.uniform(0.1, 1.0, shape)
        elif base == "b_pre" and not pre_bias:
            value = np.zeros(shape)
        else:  # b_enc, b_dec, b_pre
            value = 0.1 * rng.standard_normal(shape)
        out[name] = jnp.asarray(value, jnp.float32)
    return out


def random_dictionary(
    cfg: DictionaryConfig, seed: int = 0, *, pre_bias: bool = False
) -> Dictionary:
    """A dictionary with `random_arrays(cfg, seed, pre_bias=pre_bias)` (cast to cfg.dtype)."""
    return dictionary_class(cfg.kind).from_arrays(cfg, random_arrays(cfg, seed, pre_bias=pre_bias))
