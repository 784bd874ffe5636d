"""Step schedules of the Gemma Scope 2 recipe (TR §3.2, docs/recipe.md), as jittable functions
of the step (an int or int32 scalar; step 0 is the first update).

    lr_schedule(lr, warmup_steps=1000, ...)   cosine warmup 0.1·lr -> lr, then constant or
                                              cosine decay to `final_fraction`·lr
    linear_warmup(value, steps)               0 -> value over `steps` (sparsity coefficient λ,
                                              GS2: 50,000 steps)
    linear_interpolate(start, end, steps)     start -> end over `steps` (target-L0 decay of
                                              CLTs and crosscoders, TR §3.3)

GS2 states only the warmup (TR §3.2: "cosine warmup from 0.1η to η over the first 1,000
steps"); what follows is not stated, so the default keeps the rate constant afterwards.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def _frac(step, steps: int):
    """`min(step / steps, 1)` as float32 (1 when `steps` <= 0)."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / float(steps), 0.0, 1.0)


def lr_schedule(
    lr: float,
    *,
    warmup_steps: int = 1000,
    init_fraction: float = 0.1,
    total_steps: int | None = None,
    final_fraction: float = 1.0,
):
    """Learning rate as a function of the step (an optax schedule).

    Warmup (steps 0..W): `lr · (f0 + (1 - f0) · (1 - cos(π t / W)) / 2)`, f0 = init_fraction.
    After it: `lr` when `final_fraction` is 1 or `total_steps` is None; otherwise a cosine
    decay from `lr` at step W to `final_fraction · lr` at `total_steps`.
    """
    if lr < 0 or not 0 <= init_fraction <= 1 or final_fraction < 0:
        raise ValueError(
            f"need lr >= 0, 0 <= init_fraction <= 1, final_fraction >= 0; got lr={lr}, "
            f"init_fraction={init_fraction}, final_fraction={final_fraction}"
        )
    decay_steps = 0 if total_steps is None else max(int(total_steps) - int(warmup_steps), 0)

    def schedule(step):
        up = _frac(step, warmup_steps)
        warm = init_fraction + (1.0 - init_fraction) * 0.5 * (1.0 - jnp.cos(math.pi * up))
        if decay_steps == 0 or final_fraction == 1.0:
            return lr * warm
        down = _frac(jnp.asarray(step, jnp.float32) - warmup_steps, decay_steps)
        decay = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(math.pi * down))
        return lr * jnp.where(jnp.asarray(step) < warmup_steps, warm, decay)

    return schedule


def linear_warmup(value: float, steps: int, step):
    """`value · min(step / steps, 1)`: 0 at step 0, `value` from `steps` on."""
    return value * _frac(step, steps)


def linear_interpolate(start: float, end: float, steps: int, step):
    """`start + (end - start) · min(step / steps, 1)`."""
    return start + (end - start) * _frac(step, steps)
