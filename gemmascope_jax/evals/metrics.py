"""Dictionary metrics, each defined once (docs/recipe.md, Metrics).

FVU (fraction of variance unexplained) over an evaluation set of tokens n with targets
y_n and predictions ŷ_n:

    FVU = Σ_n ‖y_n - ŷ_n‖² / Σ_n ‖y_n - ȳ‖²,     ȳ = mean of y over the *whole* set,

‖·‖² summing over the feature axis (and, for multi-layer dictionaries, over layers; the
per-layer FVU keeps them apart). Numerator and denominator are accumulated separately over
batches (`FVUStats` per batch, combined exactly with Chan's parallel-variance formula in
float64), never averaged as per-batch ratios; explained variance = 1 - FVU.

    L0            mean over tokens of the number of non-zero latents (summed over source
                  layers for multi-layer dictionaries, as GS2's `l0`)
    frequency_i   fraction of tokens on which latent i is non-zero
    dead          frequency_i <= `DEAD_FREQUENCY` (0: never fired on the evaluation set)
    dense         frequency_i > `DENSE_FREQUENCY` (0.1: fires on more than 10 % of tokens,
                  the cut of TR §4.2)
    histogram     counts of log10(frequency_i) for the non-dead latents, plus the dead count

Arrays: y, ŷ [N, (L,) D]; codes [N, (L,) F]. Device functions (`fvu_stats`, `l0`,
`eval_batch`) are jittable; accumulators are host-side numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

DEAD_FREQUENCY = 0.0
DENSE_FREQUENCY = 0.1


@flax.struct.dataclass
class FVUStats:
    """Sufficient statistics of one batch: `n` tokens, `sse` [G] = Σ_n ‖y - ŷ‖²,
    batch mean `shift + mean` [G, D], `m2` [G] = Σ_n ‖y - batch mean‖² (G = () or (L,)).

    The mean is kept as the first token `shift` plus the mean offset from it, so that it
    stays accurate in float32 when activations have a large mean (and the float64 host
    sum `shift + mean` is exact enough for combining batches)."""

    n: jax.Array
    sse: jax.Array
    shift: jax.Array
    mean: jax.Array
    m2: jax.Array


def fvu_stats(y: jax.Array, y_hat: jax.Array) -> FVUStats:
    """`FVUStats` of y, ŷ [N, (L,) D] (token axis 0, feature axis -1)."""
    y = y.astype(jnp.float32)
    shift = y[0]
    centred = y - shift
    mean = jnp.mean(centred, axis=0)
    return FVUStats(
        n=jnp.asarray(y.shape[0], jnp.float32),
        sse=jnp.sum(jnp.square(y - y_hat.astype(jnp.float32)), axis=(0, -1)),
        shift=shift,
        mean=mean,
        m2=jnp.sum(jnp.square(centred - mean), axis=(0, -1)),
    )


class FVUAccumulator:
    """Combines `FVUStats` of many batches (float64); `value()` is the FVU of the union."""

    def __init__(self):
        self.n = 0.0
        self.sse = self.mean = self.m2 = None

    def add(self, stats: FVUStats) -> FVUAccumulator:
        n_b = float(stats.n)
        sse, m2 = np.asarray(stats.sse, np.float64), np.asarray(stats.m2, np.float64)
        mean = np.asarray(stats.shift, np.float64) + np.asarray(stats.mean, np.float64)
        if self.sse is None:
            self.n, self.sse, self.mean, self.m2 = n_b, sse, mean, m2
            return self
        n = self.n + n_b
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.sum(delta**2, axis=-1) * self.n * n_b / n
        self.mean = self.mean + delta * n_b / n
        self.sse = self.sse + sse
        self.n = n
        return self

    def value(self) -> float:
        """FVU over all tokens (and layers) seen."""
        return float(np.sum(self.sse) / np.sum(self.m2))

    def per_group(self) -> np.ndarray:
        """FVU per layer [L] (a scalar array for single-layer dictionaries)."""
        return self.sse / self.m2


def fvu(y: jax.Array, y_hat: jax.Array) -> float:
    """FVU of one set held in memory (same definition as the accumulator)."""
    return FVUAccumulator().add(fvu_stats(y, y_hat)).value()


def l0(codes: jax.Array, latent_ndim: int = 1) -> jax.Array:
    """Mean over tokens of the non-zero count over the last `latent_ndim` axes
    (1: per token [N, F]; 2: multi-layer total over [N, L, F])."""
    axes = tuple(range(codes.ndim - latent_ndim, codes.ndim))
    return jnp.mean(jnp.sum(codes != 0, axis=axes).astype(jnp.float32))


def dead_fraction(freq: np.ndarray, threshold: float = DEAD_FREQUENCY) -> float:
    return float(np.mean(np.asarray(freq) <= threshold))


def dense_fraction(freq: np.ndarray, threshold: float = DENSE_FREQUENCY) -> float:
    return float(np.mean(np.asarray(freq) > threshold))


def log10_frequency_histogram(
    freq: np.ndarray, bins: int = 40, low: float = -8.0, dead: float = DEAD_FREQUENCY
) -> tuple[np.ndarray, np.ndarray, int]:
    """(counts [bins], edges [bins + 1] over log10 frequency in [low, 0], dead count).
    Frequencies below 10**low land in the first bin."""
    freq = np.asarray(freq, np.float64).reshape(-1)
    alive = freq[freq > dead]
    logs = np.clip(np.log10(alive), low, 0.0)
    counts, edges = np.histogram(logs, bins=bins, range=(low, 0.0))
    return counts, edges, int(freq.size - alive.size)


@jax.jit
def eval_batch(d, x: jax.Array, y: jax.Array) -> dict[str, Any]:
    """Per-batch sums for `EvalAccumulator`: `fvu_stats`, `l0_sum` (Σ_n L0_n, per layer for
    multi-layer kinds), `fire_counts` [(L,) F], `n`. `d` is a Dictionary (an NNX module)."""
    codes = d.encode(x)
    y_hat = d.decode(codes, x)
    fired = codes != 0
    return {
        "fvu_stats": fvu_stats(y, y_hat),
        "l0_sum": jnp.sum(fired, axis=(0, -1)).astype(jnp.float32),
        "fire_counts": jnp.sum(fired, axis=0).astype(jnp.int32),
        "n": jnp.asarray(x.shape[0], jnp.float32),
    }


class EvalAccumulator:
    """Accumulates `eval_batch` (or train-step) outputs; `summary()` gives the metrics."""

    def __init__(self):
        self.fvu = FVUAccumulator()
        self.n = 0.0
        self.l0_sum = 0.0
        self.fire_counts = None

    def add(self, batch: dict[str, Any]) -> EvalAccumulator:
        self.fvu.add(batch["fvu_stats"])
        self.n += float(batch["n"])
        self.l0_sum = self.l0_sum + np.asarray(batch["l0_sum"], np.float64)
        counts = np.asarray(batch["fire_counts"], np.int64)
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        return self

    def frequencies(self) -> np.ndarray:
        return self.fire_counts / self.n

    def summary(self, bins: int = 40) -> dict[str, Any]:
        """`fvu`, `explained_variance`, `l0`, `dead_fraction`, `dense_fraction`,
        `histogram` (counts, edges, dead) and, for multi-layer kinds, `fvu_per_layer`,
        `l0_per_layer`."""
        freq = self.frequencies()
        out = {
            "fvu": self.fvu.value(),
            "explained_variance": 1.0 - self.fvu.value(),
            "l0": float(np.sum(self.l0_sum) / self.n),
            "dead_fraction": dead_fraction(freq),
            "dense_fraction": dense_fraction(freq),
            "histogram": log10_frequency_histogram(freq, bins),
            "tokens": int(self.n),
        }
        if np.ndim(self.l0_sum) > 0:
            out["fvu_per_layer"] = self.fvu.per_group().tolist()
            out["l0_per_layer"] = (np.asarray(self.l0_sum) / self.n).tolist()
        return out


def evaluate(d, batches: Iterable[tuple[jax.Array, jax.Array]], bins: int = 40) -> dict:
    """`EvalAccumulator` summary of dictionary `d` over (x, y) batches (SAE: y = x)."""
    acc = EvalAccumulator()
    for x, y in batches:
        acc.add(eval_batch(d, x, y))
    return acc.summary(bins)
