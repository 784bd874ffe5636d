"""Dictionary evaluations: FVU, L0, dead/dense fractions, frequency histograms
(`metrics.py`) and delta LM loss / KL with the reconstruction spliced into Gemma 3
(`splice.py`)."""

from gemmascope_jax.evals.metrics import (
    DEAD_FREQUENCY,
    DENSE_FREQUENCY,
    EvalAccumulator,
    FVUAccumulator,
    FVUStats,
    dead_fraction,
    dense_fraction,
    eval_batch,
    evaluate,
    fvu,
    fvu_stats,
    l0,
    log10_frequency_histogram,
)
from gemmascope_jax.evals.splice import SpliceAccumulator, splice_batch, splice_eval

__all__ = [
    "DEAD_FREQUENCY",
    "DENSE_FREQUENCY",
    "EvalAccumulator",
    "FVUAccumulator",
    "FVUStats",
    "SpliceAccumulator",
    "dead_fraction",
    "dense_fraction",
    "eval_batch",
    "evaluate",
    "fvu",
    "fvu_stats",
    "l0",
    "log10_frequency_histogram",
    "splice_batch",
    "splice_eval",
]
