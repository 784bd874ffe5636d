"""Site names, capture, early stopping, interventions and gradients through sites."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemmascope_jax.gemma3.config import gemma3_tiny
from gemmascope_jax.gemma3.model import Gemma3
from gemmascope_jax.gemma3.sites import LAYER_SITES, Site, hf_hook_point, resolve_site


@pytest.mark.parametrize(
    "name, site",
    [
        ("resid_post.9", Site("resid_post", 9)),
        ("resid_post.-1", Site("resid_post", 17)),
        ("model.layers.5.pre_feedforward_layernorm.output", Site("mlp_in", 5)),
        ("model.layers.5.post_feedforward_layernorm.output", Site("mlp_out", 5)),
        ("model.layers.5.self_attn.o_proj.input", Site("attn_z", 5)),
        ("model.layers.5.output", Site("resid_post", 5)),
        ("language_model.model.layers.5.output", Site("resid_post", 5)),
        ("model.language_model.layers.2.mlp.down_proj.input", Site("mlp_hidden", 2)),
        ("blocks.4.hook_resid_pre", Site("resid_pre", 4)),
        ("blocks.4.attn.hook_z", Site("attn_z", 4)),
        ("blocks.4.hook_mlp_in", Site("mlp_in", 4)),
        ("blocks.4.hook_attn_out", Site("attn_out", 4)),
        ("model.embed_tokens.output", Site("resid_pre", 0)),
        ("model.norm.input", Site("resid_post", 17)),
        ("model.norm.output", Site("final_norm")),
        ("lm_head.output", Site("logits")),
    ],
)
def test_resolve_aliases(name, site):
    assert resolve_site(name, 18) == site


@pytest.mark.parametrize(
    "name", ["resid_post", "resid_pst.3", "model.layers.3.foo.output", "blocks.1.hook_q", ""]
)
def test_unknown_site_error_lists_valid_forms(name):
    with pytest.raises(ValueError, match="Valid forms: ours: resid_pre.L"):
        resolve_site(name, 18)


def test_layer_out_of_range():
    with pytest.raises(ValueError, match="layer 18 out of range for a 18-layer model"):
        resolve_site("mlp_out.18", 18)
    with pytest.raises(ValueError, match="out of range"):
        resolve_site("model.layers.40.output", 18)


def test_hook_points_round_trip():
    for kind in LAYER_SITES:
        if kind != "attn_pattern":
            assert resolve_site(hf_hook_point(Site(kind, 3)), 7) == Site(kind, 3)


@pytest.fixture(scope="module")
def model():
    return Gemma3(gemma3_tiny(), rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(2).randint(4, 512, size=(2, 16)))


def test_unknown_site_in_forward(model, tokens):
    with pytest.raises(ValueError, match="unknown site 'resid_psot.1'"):
        model(tokens, capture=["resid_psot.1"])
    with pytest.raises(ValueError, match="unknown site"):
        model.jitted(interventions={"nope.1": lambda x: x})


def test_identity_intervention_is_bit_identical_under_jit(model, tokens):
    base = model.jitted()(tokens).logits
    every_site = {f"{k}.{i}": (lambda x: x) for i in range(7) for k in LAYER_SITES}
    patched = model.jitted(interventions=every_site)(tokens).logits
    np.testing.assert_array_equal(np.asarray(base), np.asarray(patched))


def test_intervention_changes_only_downstream(model, tokens):
    zero = lambda x: jnp.zeros_like(x)
    capture = ["resid_post.1", "resid_post.2", "mlp_out.3"]
    base = model(tokens, capture=capture)
    out = model(tokens, capture=capture, interventions={"mlp_out.3": zero})
    np.testing.assert_array_equal(out.sites["resid_post.1"], base.sites["resid_post.1"])
    np.testing.assert_array_equal(out.sites["resid_post.2"], base.sites["resid_post.2"])
    assert not np.asarray(out.sites["mlp_out.3"]).any()
    assert not np.allclose(out.logits, base.logits)


def test_patching_a_site_equals_splicing_its_value(model, tokens):
    """Replacing resid_mid.4 by resid_pre.4 + attn_out.4 (its definition) changes nothing."""
    cap = model(tokens, capture=["resid_pre.4", "attn_out.4"])
    spliced = cap.sites["resid_pre.4"] + cap.sites["attn_out.4"]
    out = model(tokens, interventions={"resid_mid.4": lambda x: spliced})
    np.testing.assert_allclose(out.logits, model(tokens).logits, rtol=0, atol=1e-5)


def test_intervention_shape_error(model, tokens):
    with pytest.raises(ValueError, match=r"intervention at mlp_in.2 returned shape \(2, 16, 3\)"):
        model(tokens, interventions={"mlp_in.2": lambda x: x[..., :3]})


def test_capture_returns_value_after_intervention(model, tokens):
    out = model(tokens, capture=["attn_z.1"], interventions={"attn_z.1": lambda x: 2 * x})
    base = model(tokens, capture=["attn_z.1"])
    np.testing.assert_allclose(out.sites["attn_z.1"], 2 * base.sites["attn_z.1"], rtol=1e-6)


def test_sites_only_forward_stops_at_deepest_layer(model, tokens):
    """With logits=False nothing past the deepest captured layer runs: an intervention there
    that would raise is never called, and the jaxpr has fewer matmuls."""

    def explode(x):
        raise AssertionError("layer 5 ran")

    out = model(tokens, capture=["resid_post.2"], logits=False, interventions={"mlp_in.5": explode})
    assert out.logits is None and out.sites["resid_post.2"].shape == (2, 16, 64)
    full = model(tokens, capture=["resid_post.2"])
    np.testing.assert_array_equal(out.sites["resid_post.2"], full.sites["resid_post.2"])

    def count_dots(**kw):
        jaxpr = jax.make_jaxpr(lambda t: model(t, **kw))(tokens)
        return str(jaxpr).count("dot_general")

    assert count_dots(capture=["resid_post.2"], logits=False) < count_dots(capture=["resid_post.2"])
    with pytest.raises(AssertionError, match="layer 5 ran"):
        model(tokens, capture=["resid_post.2"], interventions={"mlp_in.5": explode})


def test_logits_false_with_final_norm_runs_all_layers(model, tokens):
    out = model(tokens, capture=["final_norm"], logits=False)
    assert out.logits is None
    ref = model(tokens, capture=["final_norm"])
    np.testing.assert_array_equal(out.sites["final_norm"], ref.sites["final_norm"])


def test_gradient_wrt_site_matches_finite_differences():
    """d(logit) / d(resid_mid.3) by jax.grad through an additive intervention equals central
    finite differences, in float64."""
    with jax.enable_x64(True):
        model = Gemma3(gemma3_tiny().with_dtype(jnp.float64), rngs=nnx.Rngs(3))
        toks = jnp.asarray(np.random.RandomState(5).randint(4, 512, size=(1, 12)))
        base_shape = model(toks, capture=["resid_mid.3"]).sites["resid_mid.3"].shape

        def target(delta):
            out = model(toks, interventions={"resid_mid.3": lambda x: x + delta})
            return out.logits[0, -1, 17] - out.logits[0, 5, 3]

        delta0 = jnp.zeros(base_shape, jnp.float64)
        grad = jax.jit(jax.grad(target))(delta0)
        assert grad.shape == base_shape
        rng = np.random.RandomState(0)
        for _ in range(3):
            direction = jnp.asarray(rng.normal(size=base_shape))
            eps = 1e-5
            fd = (target(eps * direction) - target(-eps * direction)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6)
        # Causality: the logit at position 5 does not depend on resid_mid at positions > 5,
        # and the last position's logit does; gradients see the causal mask.
        g5 = jax.grad(
            lambda d: model(toks, interventions={"resid_mid.3": lambda x: x + d}).logits[0, 5, 3]
        )(delta0)
        assert np.abs(np.asarray(g5[0, 6:])).max() == 0.0
        assert np.abs(np.asarray(g5[0, :6])).max() > 0.0


def test_duplicate_intervention_names_rejected(model, tokens):
    with pytest.raises(ValueError, match="same site mlp_in.2"):
        model(
            tokens, interventions={"mlp_in.2": jnp.negative, "blocks.2.hook_mlp_in": jnp.negative}
        )
