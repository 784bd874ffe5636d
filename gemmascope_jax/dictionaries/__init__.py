"""Gemma Scope 2 dictionaries as Flax NNX modules.

    from gemmascope_jax.dictionaries import DictionaryConfig, make_dictionary
    cfg = DictionaryConfig(kind="transcoder", architecture="jumprelu", d_in=1152,
                           d_out=1152, width=16384, layers=(13,), model_num_layers=26)
    d = make_dictionary(cfg, nnx.Rngs(0))
    f = d.encode(x)                   # x [..., d_in] -> codes [..., F]
    y = d.decode(f, x)                # -> prediction of mlp_out.13 [..., d_out]
    s = d.encode_sparse(x, k=64)      # SparseCodes(values, indices, overflow)

Kinds (`KINDS`): `sae`, `transcoder`, `skip_transcoder` (`SingleLayerDictionary`) and `clt`,
`crosscoder` (`MultiLayerDictionary`, inputs [..., L, d_in]). Architectures
(`activations.ACTIVATIONS`): `jumprelu`, `relu`, `topk`, `batchtopk`. Parameter names and
orientations follow the GS2 files: w_enc [d_in, F], b_enc [F], threshold [F],
w_dec [F, d_out], b_dec [d_out], w_skip [d_in, d_out] used as `x @ w_skip`.
"""

from gemmascope_jax.dictionaries.activations import (
    ACTIVATIONS,
    Activation,
    apply_activation,
    batchtopk,
    batchtopk_threshold,
    heaviside_ste,
    jumprelu,
    jumprelu_ste,
    relu,
    topk,
)
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.dictionaries.config import (
    KIND_NAMES,
    MULTI_LAYER_KINDS,
    SINGLE_LAYER_KINDS,
    DictionaryConfig,
)
from gemmascope_jax.dictionaries.multilayer import MultiLayerDictionary
from gemmascope_jax.dictionaries.registry import (
    KINDS,
    dictionary_class,
    make_dictionary,
    random_arrays,
    random_dictionary,
)
from gemmascope_jax.dictionaries.single import SingleLayerDictionary
from gemmascope_jax.dictionaries.sparse import SparseCodes, decode_rows, sparsify, to_dense

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "KIND_NAMES",
    "MULTI_LAYER_KINDS",
    "SINGLE_LAYER_KINDS",
    "Activation",
    "Dictionary",
    "DictionaryConfig",
    "MultiLayerDictionary",
    "SingleLayerDictionary",
    "SparseCodes",
    "apply_activation",
    "batchtopk",
    "batchtopk_threshold",
    "decode_rows",
    "dictionary_class",
    "heaviside_ste",
    "jumprelu",
    "jumprelu_ste",
    "make_dictionary",
    "random_arrays",
    "random_dictionary",
    "relu",
    "sparsify",
    "to_dense",
    "topk",
]
