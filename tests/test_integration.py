"""Model + dictionary together: capture a dictionary's input site, splice its prediction back
in, and check that every export format gives the same spliced model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import gemmascope_jax as gsj
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary


@pytest.fixture(scope="module")
def transcoder(tiny_model):
    cfg = DictionaryConfig(
        kind="skip_transcoder",
        architecture="jumprelu",
        d_in=tiny_model.cfg.hidden_size,
        d_out=tiny_model.cfg.hidden_size,
        width=96,
        layers=(3,),
        model_name="gemma-3-tiny",
        model_num_layers=tiny_model.cfg.num_layers,
    )
    return random_dictionary(cfg, seed=4)


def test_dictionary_sites_resolve_in_the_model(tiny_model, tiny_tokens, transcoder):
    cfg = transcoder.cfg
    assert cfg.input_sites == ("mlp_in.3",) and cfg.output_sites == ("mlp_out.3",)
    hooks = cfg.hf_hook_points_in + cfg.hf_hook_points_out
    assert hooks == (
        "model.layers.3.pre_feedforward_layernorm.output",
        "model.layers.3.post_feedforward_layernorm.output",
    )
    by_ours = tiny_model(jnp.asarray(tiny_tokens), capture=cfg.input_sites, logits=False)
    by_gs2 = tiny_model(jnp.asarray(tiny_tokens), capture=hooks[:1], logits=False)
    np.testing.assert_array_equal(by_ours.sites["mlp_in.3"], by_gs2.sites[hooks[0]])


def spliced_logits(model, tokens, dictionary):
    """Replace the output site by the dictionary's prediction from the (clean) input site."""
    cfg = dictionary.cfg
    x = model(tokens, capture=cfg.input_sites, logits=False).sites[cfg.input_sites[0]]
    prediction = dictionary(x)
    return model(tokens, interventions={cfg.output_sites[0]: lambda y: prediction}).logits


@pytest.mark.parametrize("fmt", ["native", "gemma-scope-2", "saelens"])
def test_splice_survives_every_export(tiny_model, tiny_tokens, transcoder, fmt, tmp_path):
    tokens = jnp.asarray(tiny_tokens)
    reference = spliced_logits(tiny_model, tokens, transcoder)
    assert not np.allclose(reference, tiny_model(tokens).logits, atol=1e-3)
    gsj.save_dictionary(transcoder, tmp_path / fmt, format=fmt)
    assert gsj.detect_format(tmp_path / fmt) == fmt
    loaded = gsj.load_dictionary(tmp_path / fmt)
    assert loaded.cfg.input_sites == transcoder.cfg.input_sites
    np.testing.assert_allclose(
        spliced_logits(tiny_model, tokens, loaded), reference, rtol=0, atol=1e-5
    )
