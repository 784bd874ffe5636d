"""Run logging and the end-of-run report.

`RunLogger` appends train metrics to `metrics.jsonl` (one JSON object per logged step) and,
optionally, TensorBoard event files; it keeps the history for the plots. `write_report`
writes `summary.json` (held-out evals + export paths) and PNG plots: loss and MSE curves,
L0 against its target, and the held-out latent-frequency histogram per dictionary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar numeric entries of a metrics dict (arrays and structures are skipped)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.ndarray, np.generic, jax.Array)) and np.ndim(v) == 0:
            out[k] = float(np.asarray(v))
    return out


class RunLogger:
    """Train-metric sink: JSONL (+ TensorBoard) under `out_dir`, history kept in memory."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log_train(self, step: int, metrics: dict[str, dict[str, Any]], **extra: float) -> None:
        row = {"step": step, **extra, **{n: _scalars(m) for n, m in metrics.items()}}
        tags = {k: v for k, v in extra.items()}
        tags.update(
            {f"{n}/{k}": v for n, m in row.items() if isinstance(m, dict) for k, v in m.items()}
        )
        self._record(row, tags)

    def log_eval(self, step: int, evals: dict[str, dict[str, Any]]) -> None:
        """Held-out eval metrics (scalars only) as an `{"eval": ...}` JSONL row."""
        row = {"step": step, "eval": {n: _scalars(e) for n, e in evals.items()}}
        tags = {f"eval/{n}/{k}": v for n, e in row["eval"].items() for k, v in e.items()}
        self._record(row, tags)

    def _record(self, row: dict[str, Any], tags: dict[str, float]) -> None:
        """Keep `row` in the history; append it to the JSONL and `tags` to TensorBoard."""
        self.history.append(row)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for tag, value in tags.items():
                self._tb.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def write_report(out_dir, history, evals, exports, dictionaries) -> Path:
    """summary.json + plots; returns the report folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        name: {
            "config": d.cfg.to_dict(),
            "eval": {k: v for k, v in evals.get(name, {}).items() if k != "histogram"},
            "exports": exports.get(name, {}),
        }
        for name, d in dictionaries.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    for name, d in dictionaries.items():
        rows = [(r["step"], r[name]) for r in history if name in r]
        if not rows:
            continue
        steps = [s for s, _ in rows]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for key in ("loss", "mse"):
            if key in rows[0][1]:
                axes[0].plot(steps, [m[key] for _, m in rows], label=key)
        axes[0].set_yscale("log")
        axes[0].set_title(f"{name}: loss")
        axes[0].legend()
        axes[1].plot(steps, [m.get("l0", np.nan) for _, m in rows], label="L0")
        if d.cfg.l0_target:
            axes[1].axhline(d.cfg.l0_target, color="k", ls="--", label="target")
        axes[1].set_title("L0 (train batches)")
        axes[1].legend()
        hist = evals.get(name, {}).get("histogram")
        if hist is not None:
            counts, edges = np.asarray(hist[0]), np.asarray(hist[1])
            axes[2].bar(edges[:-1], counts, width=np.diff(edges), align="edge")
            axes[2].set_title(f"held-out log10 frequency ({hist[2]} never fired)")
        for ax in axes[:2]:
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
    return out
