"""Sparse activation functions of the dictionaries and the JumpReLU straight-through estimator.

All functions map pre-activations `pre` [..., F] (F = latents) to codes of the same shape
and dtype. Codes are never negative.

| architecture | inference                                          | extra argument        |
|--------------|----------------------------------------------------|-----------------------|
| `jumprelu`   | `f = 1[pre > θ] * relu(pre)`, θ [F] per latent     | `threshold` [F]       |
| `relu`       | `f = relu(pre)`                                    |                       |
| `topk`       | per token, the k largest of `relu(pre)`            | `k`                   |
| `batchtopk`  | the `k * N` largest of `relu(pre)` over the batch  | `k`                   |

`batchtopk` is a training-time activation: every axis but the last is the batch (N tokens),
so a token's code depends on the other tokens. For inference it is replaced by a JumpReLU
whose thresholds come from `batchtopk_threshold` (see there for the exact semantics).

Training (Gemma Scope 2, TR §2.3; SAELens `jumprelu_sae.py`): `jumprelu_ste` and
`heaviside_ste` have the forward values above but straight-through gradients with the
rectangle kernel `K(u) = 1[|u| < 1/2]` and bandwidth ε (GS2: 0.001 on unit-mean-squared-norm
inputs):

    d jumprelu / d pre = 1[pre > θ] * 1[pre > 0]   (= 1[pre > θ] for θ > 0)
    d jumprelu / d θ   = -(θ / ε) * K((pre - θ) / ε)
    d step / d pre     = 0
    d step / d θ       = -(1 / ε) * K((pre - θ) / ε)

Gradients with respect to θ are summed over the axes θ was broadcast along (the batch).
`ACTIVATIONS` maps each architecture name to an `Activation` record; `apply_activation`
dispatches on the name with one signature.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp


def relu(pre: jax.Array) -> jax.Array:
    return jax.nn.relu(pre)


def jumprelu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """`1[pre > θ] * relu(pre)`; θ broadcasts against pre ([F] for pre [..., F]).

    Differentiable in `pre` only (the gradient w.r.t. θ is 0); use `jumprelu_ste` to train θ.
    """
    threshold = jnp.asarray(threshold).astype(pre.dtype)
    return jnp.where(pre > threshold, jax.nn.relu(pre), jnp.zeros((), pre.dtype))


def _rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum a broadcast cotangent back to `shape` (undoing numpy broadcasting)."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_ste(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """JumpReLU with the rectangle-kernel straight-through estimator for θ (training)."""
    return jumprelu(pre, threshold)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    th = jnp.asarray(threshold).astype(pre.dtype)
    d_pre = g * ((pre > th) & (pre > 0)).astype(g.dtype)
    d_th = -(th / bandwidth) * _rectangle((pre - th) / bandwidth) * g
    return d_pre, _sum_to_shape(d_th, jnp.shape(threshold)).astype(jnp.result_type(threshold))


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_ste(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Step `1[pre > θ]` (as pre's dtype) with the rectangle-kernel STE for θ: the L0 term."""
    return (pre > jnp.asarray(threshold).astype(pre.dtype)).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    step = (pre > jnp.asarray(threshold).astype(pre.dtype)).astype(pre.dtype)
    return step, (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    th = jnp.asarray(threshold).astype(pre.dtype)
    d_th = -(1.0 / bandwidth) * _rectangle((pre - th) / bandwidth) * g
    d_th = _sum_to_shape(d_th, jnp.shape(threshold)).astype(jnp.result_type(threshold))
    return jnp.zeros_like(pre), d_th


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)


def _keep_mask_top(values: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the k largest entries along the last axis (exactly k, ties by index)."""
    _, idx = jax.lax.top_k(values, k)
    mask = jnp.zeros(values.shape, bool)
    return jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)


def topk(pre: jax.Array, k: int) -> jax.Array:
    """Per token (last axis), keep the k largest of `relu(pre)`; fewer are non-zero when fewer
    than k pre-activations are positive."""
    _check_k(k, pre.shape[-1])
    act = jax.nn.relu(pre)
    return jnp.where(_keep_mask_top(act, int(k)), act, jnp.zeros((), act.dtype))


def batchtopk(pre: jax.Array, k: int) -> jax.Array:
    """Keep the `k * N` largest of `relu(pre)` over the whole batch, N = prod(pre.shape[:-1]).

    The average number of non-zero latents per token is at most k; single tokens may have
    more or fewer. Exactly `k * N` entries are selected (ties broken by flat index).
    """
    _check_k(k, pre.shape[-1])
    act = jax.nn.relu(pre)
    flat = act.reshape(-1)
    keep = _keep_mask_top(flat, min(int(k) * (flat.size // pre.shape[-1]), flat.size))
    return jnp.where(keep, flat, jnp.zeros((), act.dtype)).reshape(pre.shape)


def _check_k(k, width: int) -> None:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in 1..{width} (the number of latents), got {k!r}")


def batchtopk_threshold(pre: jax.Array, k: int, *, per_latent: bool = True) -> jax.Array:
    """JumpReLU thresholds θ [F] that turn a BatchTopK activation into a per-token one.

    `pre` [..., F] is a calibration batch of pre-activations (all leading axes are the batch,
    as in `batchtopk`). On that batch let `kept` be the entries BatchTopK keeps with a
    positive value. Then:

    - `per_latent=False`: one global θ for every latent, the midpoint between the smallest
      kept value and the largest non-kept value (clipped below at 0). This is the
      "minimum positive activation kept" rule of SAELens / dictionary_learning, moved to the
      middle of the gap so that `>` and float rounding cannot flip the boundary entry.
    - `per_latent=True` (default; TR §B.1 matches per-latent activation quantiles): for each
      latent the midpoint between its own smallest kept value and its own largest non-kept
      value (clipped below at 0); latents never kept on the batch get the global θ.

    Either way `jumprelu(pre, θ) == batchtopk(pre, k)` holds exactly on the calibration
    batch whenever the k*N-th and (k*N+1)-th largest values differ (no exact ties), and each
    latent then fires on held-out data with the frequency it had on the calibration batch.
    """
    acts = batchtopk(pre, k)
    kept = acts > 0
    width = pre.shape[-1]
    flat_pre = pre.reshape(-1, width)
    flat_kept = kept.reshape(-1, width)
    big = jnp.asarray(jnp.inf, pre.dtype)
    zero = jnp.zeros((), pre.dtype)
    min_kept = jnp.where(flat_kept, flat_pre, big).min(axis=0)  # [F], inf where never kept
    max_rest = jnp.maximum(jnp.where(flat_kept, -big, flat_pre).max(axis=0), zero)
    glob_kept = min_kept.min()
    glob_rest = max_rest.max()
    global_th = jnp.where(jnp.isfinite(glob_kept), (glob_kept + glob_rest) / 2, glob_rest)
    if not per_latent:
        return jnp.broadcast_to(global_th, (width,))
    return jnp.where(jnp.isfinite(min_kept), (min_kept + max_rest) / 2, global_th)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An architecture's activation: `fn`, and which of `threshold` / `k` it takes.

    `per_token=False` means codes depend on the whole batch (`batchtopk`).
    """

    name: str
    fn: Callable[..., jax.Array]
    needs_threshold: bool = False
    needs_k: bool = False
    per_token: bool = True


ACTIVATIONS: dict[str, Activation] = {
    "jumprelu": Activation("jumprelu", jumprelu, needs_threshold=True),
    "relu": Activation("relu", relu),
    "topk": Activation("topk", topk, needs_k=True),
    "batchtopk": Activation("batchtopk", batchtopk, needs_k=True, per_token=False),
}

# Spellings other libraries use, normalised by `canonical_architecture`.
ARCHITECTURE_ALIASES = {"jump_relu": "jumprelu", "top_k": "topk", "batch_topk": "batchtopk"}


def canonical_architecture(name: str) -> str:
    """Our architecture name for `name` (also accepts `jump_relu`, `top_k`, `batch_topk`)."""
    key = str(name).strip().lower()
    key = ARCHITECTURE_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {sorted(ACTIVATIONS)} "
            f"(aliases {sorted(ARCHITECTURE_ALIASES)})"
        )
    return key


def apply_activation(
    architecture: str,
    pre: jax.Array,
    *,
    threshold: jax.Array | None = None,
    k: int | None = None,
    bandwidth: float | None = None,
) -> jax.Array:
    """Codes for `pre` [..., F] under `architecture`.

    `bandwidth` (JumpReLU only) switches to the straight-through estimator `jumprelu_ste`,
    which trains θ; without it θ gets no gradient.
    """
    act = ACTIVATIONS[canonical_architecture(architecture)]
    if act.needs_threshold:
        if threshold is None:
            raise ValueError(f"architecture {act.name!r} needs a threshold")
        if bandwidth is not None:
            return jumprelu_ste(pre, threshold, float(bandwidth))
        return act.fn(pre, threshold)
    if act.needs_k:
        if k is None:
            raise ValueError(f"architecture {act.name!r} needs k")
        return act.fn(pre, k)
    return act.fn(pre)
