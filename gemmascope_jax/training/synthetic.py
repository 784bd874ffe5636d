"""Train a dictionary on synthetic ground truth (`evals.synthetic`: the generator and the
metrics) with the project's real train step, and score it against the true features.

    metrics, d = train_on_synthetic(SyntheticModel(SyntheticConfig(...)), "jumprelu", l0=8)

docs/synthetic.md has the results and their reading.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from gemmascope_jax.dictionaries import DictionaryConfig
from gemmascope_jax.dictionaries.config import matryoshka_widths
from gemmascope_jax.evals.synthetic import SyntheticModel, direction_metrics, ground_truth_metrics
from gemmascope_jax.training.losses import LossConfig
from gemmascope_jax.training.optimizer import OptimizerConfig
from gemmascope_jax.training.step import DictionaryTraining, make_train_step


def train_on_synthetic(
    model: SyntheticModel,
    architecture: str = "jumprelu",
    *,
    width: int = 256,
    l0: float = 8.0,
    steps: int = 500,
    batch_size: int = 1024,
    lr: float = 1e-3,
    matryoshka: bool = False,
    sparsity_warmup_frac: float = 0.2,
    seed: int = 0,
    b_dec_init: str = "mean",
    eval_tokens: int = 16384,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[dict[str, float], object]:
    """Train one dictionary with the project's train step and score it against the truth.

    `architecture` jumprelu (GS2: quadratic L0 penalty with target `l0`, λ warmed up over
    `sparsity_warmup_frac` of the steps), topk or batchtopk (k = `l0`); `matryoshka` adds the
    default nested prefixes. Data are normalised to unit mean squared norm (GS2); b_dec starts
    at the data mean (`b_dec_init="mean"`, SAELens `b_dec_init_method="mean"`) or at 0
    ("zero", GS2).
    Returns (metrics, trained Dictionary in normalised units).
    """
    rng = np.random.default_rng(seed + 1)
    probe, _ = model.sample(8192, rng)
    scale = float(np.sqrt(np.mean(np.sum(probe**2, axis=1))))
    extra = {"k": int(l0)} if architecture in ("topk", "batchtopk") else {"l0_target": l0}
    if matryoshka:
        extra["matryoshka_widths"] = matryoshka_widths(width)
    cfg = DictionaryConfig(
        kind="sae", architecture=architecture, d_in=model.cfg.d, d_out=model.cfg.d,
        width=width, layers=(0,), **extra,
    )  # fmt: skip
    warm = max(1, int(sparsity_warmup_frac * steps))
    training = DictionaryTraining(
        cfg,
        LossConfig(sparsity_warmup_steps=warm, dead_steps=max(50, steps // 10)),
        OptimizerConfig(lr=lr, warmup_steps=max(1, steps // 20)),
    )
    step = make_train_step([training])
    site = cfg.input_sites[0]
    if b_dec_init not in ("mean", "zero"):
        raise ValueError(f"b_dec_init must be 'mean' or 'zero', got {b_dec_init!r}")
    mean_batch = {site: probe / scale} if b_dec_init == "mean" else None
    state = step.init(seed=seed, mean_batch=mean_batch)
    for i in range(steps):
        x, _ = model.sample(batch_size, rng)
        state, metrics = step(state, step.put_batch({site: x / scale}))
        if on_step is not None:
            on_step(i, metrics[step.names[0]])
    (d,) = step.dictionaries(state)
    xs, fs = [], []
    for _ in range(max(1, eval_tokens // batch_size)):
        x, f = model.sample(batch_size, rng)
        xs.append(x)
        fs.append(f)
    if architecture == "batchtopk":  # batch-dependent codes: evaluate per training-sized batch
        parts = [ground_truth_metrics(d, model, scale, x, f) for x, f in zip(xs, fs, strict=True)]
        out = {k: float(np.nanmean([p[k] for p in parts])) for k in parts[0]}
        out.update(_pooled_directions(d, model, scale, xs))
    else:
        out = ground_truth_metrics(d, model, scale, np.concatenate(xs), np.concatenate(fs))
    return out, d


def _pooled_directions(d, model, scale, xs) -> dict[str, float]:
    """Direction metrics with liveness pooled over all eval batches (BatchTopK)."""
    live = np.zeros(d.cfg.width, bool)
    for x in xs:
        live |= np.asarray(d.encode(jnp.asarray(x / scale)) > 0).any(axis=0)
    out = direction_metrics(np.asarray(d.w_dec[...]), model.features, live)
    out["dead_fraction"] = float(1.0 - live.mean())
    return out
