"""Adam with the Gemma Scope 2 decoder constraint (TR §3.2, docs/recipe.md) on flat param dicts.

Parameters are one dictionary's `{flat name: array}` (`Dictionary.arrays()` names). The
update of one step is

    g[w_dec] <- g - <g, d̂> d̂              per latent, d̂ = its decoder vector / norm
                                          (`project_decoder_grads`, before Adam)
    (optional) clip by global norm
    Adam(b1, b2, eps), times lr(step)     b1 = 0 uses optax `scale_by_rms` with bias
                                          correction: identical updates, no first moment
    params <- params + update
    w_dec rows <- unit norm; threshold <- max(threshold, 0)          (`constrain_params`)

A latent's decoder vector is its row `w_dec[i, :]` [d_out] for single-layer kinds and its
whole causal block `w_dec.l[i, :, :]` [L - l, d_out] (all output layers together) for
multi-layer kinds, the same unit the GS2 initialisation normalises. The threshold is the
raw JumpReLU θ (not log θ: docs/recipe.md, Pitfalls), kept non-negative.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.training.schedules import lr_schedule


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings of one dictionary (defaults: GS2, TR §3.2).

    Fields:
        lr: peak learning rate (GS2 7e-5).
        warmup_steps: cosine warmup length (GS2 1,000).
        warmup_init_fraction: lr at step 0 as a fraction of `lr` (GS2 0.1).
        total_steps, final_lr_fraction: cosine decay after the warmup to
            `final_lr_fraction · lr` at `total_steps`; 1.0 (default) keeps lr constant.
        b1, b2, eps: Adam (GS2 0, 0.999, 1e-8).
        grad_clip_norm: clip the global gradient norm (None: no clipping, as GS2).
    """

    lr: float = 7e-5
    warmup_steps: int = 1000
    warmup_init_fraction: float = 0.1
    total_steps: int | None = None
    final_lr_fraction: float = 1.0
    b1: float = 0.0
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = None

    def schedule(self):
        return lr_schedule(
            self.lr,
            warmup_steps=self.warmup_steps,
            init_fraction=self.warmup_init_fraction,
            total_steps=self.total_steps,
            final_fraction=self.final_lr_fraction,
        )


def decoder_norm_axes(cfg: DictionaryConfig) -> dict[str, tuple[int, ...]]:
    """`{decoder param name: axes of one latent's decoder vector}` for a dictionary config."""
    if cfg.multilayer:
        return {f"w_dec.{layer}": (-2, -1) for layer in range(cfg.num_layers)}
    return {"w_dec": (-1,)}


def _unit(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    return w / jnp.maximum(norm, jnp.finfo(w.dtype).tiny)


def project_decoder_grads(norm_axes: Mapping[str, tuple[int, ...]]):
    """optax transformation: remove from each decoder gradient its component parallel to the
    latent's decoder vector, `g - <g, d̂> d̂` (needs `params` in `update`)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_decoder_grads needs params")
        out = dict(updates)
        for name, axes in norm_axes.items():
            d = _unit(params[name], axes)
            g = updates[name]
            out[name] = g - jnp.sum(g * d, axis=axes, keepdims=True) * d
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    cfg: OptimizerConfig, norm_axes: Mapping[str, tuple[int, ...]]
) -> optax.GradientTransformation:
    """The update chain in the module docstring (without the post-update constraint)."""
    parts = [project_decoder_grads(norm_axes)]
    if cfg.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.b1 == 0.0:
        # Equal to scale_by_adam(b1=0, b2, eps) (optax docs), without storing mu.
        parts.append(optax.scale_by_rms(cfg.b2, cfg.eps, eps_in_sqrt=False, bias_correction=True))
    else:
        parts.append(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps))
    parts.append(optax.scale_by_learning_rate(cfg.schedule()))
    return optax.chain(*parts)


def constrain_params(
    params: Mapping[str, jax.Array], norm_axes: Mapping[str, tuple[int, ...]]
) -> dict[str, jax.Array]:
    """Unit-norm decoder vectors and non-negative thresholds (after every update)."""
    out = dict(params)
    for name, axes in norm_axes.items():
        out[name] = _unit(params[name], axes)
    if "threshold" in out:
        out["threshold"] = jnp.maximum(out["threshold"], 0)
    return out
