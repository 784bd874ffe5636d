"""Gemma Scope 2's CLT prefix init (TR §3.3; `training.init_from.prefix_init` and
`dictionaries.N.init_from_layers`): the initial CLT is exactly the chosen single-layer
latents, a later latent that reads what an earlier one writes is marked off, and bad inputs
are refused with the file named."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.registry import dictionary_class
from gemmascope_jax.formats import save_dictionary
from gemmascope_jax.training import DictionaryTraining, LossConfig, make_train_step
from gemmascope_jax.training.config import ConfigError, RunConfig
from gemmascope_jax.training.init_from import init_from_exports, prefix_init

D, SINGLE_WIDTH, CLT_WIDTH, LAYERS = 8, 16, 4, (0, 1, 2)
SCALARS = {f"mlp_in.{i}": 1.5 + i for i in LAYERS} | {f"mlp_out.{i}": 0.5 + i for i in LAYERS}


def _single(layer: int, seed: int):
    cfg = DictionaryConfig(
        kind="transcoder",
        architecture="jumprelu",
        d_in=D,
        d_out=D,
        width=SINGLE_WIDTH,
        layers=(layer,),
        l0_target=4,
    )
    d = random_dictionary(cfg, seed)
    arrays = {k: np.array(v) for k, v in d.arrays().items()}
    arrays["threshold"] = np.abs(arrays["threshold"]) * 0.1  # some latents fire
    return dictionary_class("transcoder").from_arrays(cfg, arrays)


def _clt(width: int = CLT_WIDTH):
    cfg = DictionaryConfig(
        kind="clt", architecture="jumprelu", d_in=D, d_out=D, width=width, layers=LAYERS,
        l0_target=6,
    )  # fmt: skip
    clt = dictionary_class("clt")
    return clt.from_arrays(cfg, clt.init_arrays(cfg, jax.random.key(0)))


def _chosen_single(d, x, chosen, s_in, s_out):
    """The single-layer transcoder `d` (raw units) with only latents `chosen` decoding, on
    normalised inputs x, in normalised output units."""
    codes = np.asarray(d.encode(jnp.asarray(x * s_in)))
    keep = np.zeros(codes.shape[-1], bool)
    keep[chosen] = True
    y = (codes * keep) @ np.asarray(d.w_dec[...]) + np.asarray(d.b_dec[...])
    return y / s_out


def test_initial_clt_is_the_chosen_single_layer_latents():
    singles = [_single(layer, seed=10 + layer) for layer in LAYERS]
    clt, info = prefix_init(_clt(), singles, SCALARS)
    assert [info[layer]["chosen"] for layer in LAYERS] == [CLT_WIDTH] * 3
    assert info[0]["marked"] == 0 and 1 <= info[1]["marked"] <= CLT_WIDTH
    x = np.random.default_rng(0).normal(size=(32, len(LAYERS), D)).astype(np.float32)
    y = np.asarray(clt(jnp.asarray(x)))
    for j, layer in enumerate(LAYERS):
        chosen = _chosen_latents(singles, j)
        want = _chosen_single(
            singles[j], x[:, j], chosen, SCALARS[f"mlp_in.{layer}"], SCALARS[f"mlp_out.{layer}"]
        )
        np.testing.assert_allclose(y[:, j], want, rtol=2e-5, atol=2e-5, err_msg=f"layer {layer}")
        assert not np.any(np.asarray(clt.w_dec[j][...])[:, 1:])  # cross-layer blocks start at 0


def _chosen_latents(singles, j):
    """Recompute the greedy choice independently (per the docstring's rule)."""
    marked = [np.zeros(SINGLE_WIDTH, bool) for _ in singles]
    for i, d in enumerate(singles):
        pick = np.flatnonzero(~marked[i])[:CLT_WIDTH]
        if i == j:
            return pick
        rows = np.asarray(d.w_dec[...])[pick]
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        for later in range(i + 1, len(singles)):
            enc = np.asarray(singles[later].w_enc[...])
            sims = rows @ (enc / np.linalg.norm(enc, axis=0))
            marked[later][np.argmax(sims, axis=1)] = True
    raise AssertionError


def test_a_later_latent_reading_an_earlier_decoder_row_is_marked_off():
    singles = [_single(layer, seed=20 + layer) for layer in LAYERS]
    a1 = {k: np.array(v) for k, v in singles[1].arrays().items()}
    row = np.asarray(singles[0].w_dec[...])[0]
    a1["w_enc"][:, 2] = 3.0 * row  # latent 2 of layer 1 reads exactly what latent 0 writes
    singles[1] = dictionary_class("transcoder").from_arrays(singles[1].cfg, a1)
    clt, _ = prefix_init(_clt(), singles, SCALARS)
    want = np.asarray(singles[1].w_enc[...]) * SCALARS["mlp_in.1"]  # normalised units
    got = np.asarray(clt.w_enc[...])[1]
    copied = [int(np.argmin(np.abs(want - got[:, [k]]).sum(axis=0))) for k in range(CLT_WIDTH)]
    assert 2 not in copied


def test_unfillable_slots_keep_the_fresh_init():
    singles = [_single(layer, seed=30 + layer) for layer in LAYERS]
    fresh = _clt(width=SINGLE_WIDTH)
    clt, info = prefix_init(fresh, singles, SCALARS)
    n = info[2]["chosen"]
    assert n < SINGLE_WIDTH  # layer 2 lost its marked latents
    np.testing.assert_array_equal(
        np.asarray(clt.w_enc[...])[2][:, n:], np.asarray(fresh.w_enc[...])[2][:, n:]
    )


def test_wrong_site_or_width_is_refused_naming_the_file():
    singles = [_single(layer, seed=1) for layer in (0, 1, 5)]
    with pytest.raises(ValueError, match=r"tc_2.*mlp_in.2 -> mlp_out.2.*mlp_in.5"):
        prefix_init(_clt(), singles, SCALARS, ["tc_0", "tc_1", "tc_2"])
    with pytest.raises(ValueError, match="3 source layers, got 2"):
        prefix_init(_clt(), singles[:2], SCALARS)


def test_init_from_layers_loads_one_export_per_layer(tmp_path):
    singles = [_single(layer, seed=40 + layer) for layer in LAYERS]
    for layer, d in zip(LAYERS, singles, strict=True):
        save_dictionary(d, tmp_path / f"tc_{layer}", format="native")
    spec = SimpleNamespace(
        name="clt", init_from=None, init_from_layers=str(tmp_path / "tc_{layer}")
    )
    cfg = _clt().cfg
    step = make_train_step([DictionaryTraining(cfg, LossConfig(), name="clt")])
    state = init_from_exports(
        SimpleNamespace(dictionaries=[spec]), step, step.init(seed=0), SCALARS
    )
    (got,) = step.dictionaries(state)
    (want, _) = prefix_init(step.dictionaries(step.init(seed=0))[0], singles, SCALARS)
    for k, v in want.arrays().items():
        np.testing.assert_allclose(np.asarray(got.arrays()[k]), np.asarray(v), err_msg=k)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "sae", "layers": [1], "init_from_layers": "x_{layer}"}, "CLT or crosscoder"),
        ({"kind": "clt", "layers": "all", "init_from_layers": "x"}, "'\\{layer\\}'"),
        (
            {"kind": "clt", "layers": "all", "init_from_layers": "x_{layer}", "init_from": "y"},
            "not both",
        ),
    ],
)
def test_init_from_layers_config_checks(spec, match):
    raw = {
        "model": {"source": "google/gemma-3-270m", "preset": "270m"},
        "dictionaries": [{"width": 64, "l0_target": 8, **spec}],
    }
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw)


def test_prefix_init_keeps_the_config():
    singles = [_single(layer, seed=50 + layer) for layer in LAYERS]
    fresh = _clt()
    clt, _ = prefix_init(fresh, singles, SCALARS)
    assert clt.cfg == dataclasses.replace(fresh.cfg)
