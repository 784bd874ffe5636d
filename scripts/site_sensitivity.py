"""How much does FVU say about delta loss at a site? Splice synthetic errors of known FVU.

FVU = Σ‖x - x̂‖² / Σ‖x - mean‖² is dominated by the dimensions with the largest variance. In
Gemma 3's residual stream a few "massive" dimensions hold much of it, and the model barely
reads their fluctuations, so an FVU figure can hide a reconstruction that damages the model.
This script measures that on the embedded Gemma 3 270M and held-out English prose: it splices
x̂ = x + error into `--site` (BOS kept clean, as `evals.splice` does) for errors of a chosen FVU
with different shapes, and prints the delta CE of each:

- noise proportional to each dimension's std (the error spread as the variance is);
- isotropic noise (the same error in every dimension);
- shrinking toward the mean (x̂ = mean + (1 - √f)(x - mean));
- mean ablation (FVU 1).

    python scripts/site_sensitivity.py [--site resid_post.9 --docs 16 --seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gemmascope_jax.gemma3.loading import load_gemma3  # noqa: E402

HELDOUT = Path(__file__).resolve().parents[1] / "gemmascope_jax/data/heldout/english_prose.jsonl"


def _ce(logits: jax.Array, tokens: jax.Array) -> float:
    """Mean next-token CE (nats) over positions 1.. (the prediction made at BOS excluded)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return float(-jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[:, 1:].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="resid_post.9")
    ap.add_argument("--docs", type=int, default=16, help="held-out documents read")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model, tok = load_gemma3(None, progress=False)
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()[: args.docs]
    seqs = [tok.encode(json.loads(line)["text"])[: args.seq_len] for line in lines]
    tokens = jnp.asarray([s for s in seqs if len(s) == args.seq_len])
    clean = model(tokens, capture=(args.site,))
    x = np.asarray(clean.sites[args.site], np.float32)  # [B, T, D]
    flat = x[:, 1:].reshape(-1, x.shape[-1])  # BOS excluded
    mean, var = flat.mean(0), flat.var(0)
    order = np.argsort(-var)
    ce_clean = _ce(clean.logits, tokens)
    norms = np.linalg.norm(flat, axis=1)
    print(
        f"{args.site}: {tokens.shape[0]} x {tokens.shape[1]} tokens of held-out prose, clean CE "
        f"{ce_clean:.3f} nats; token norm median {np.median(norms):.0f} (BOS "
        f"{np.linalg.norm(x[:, 0], axis=-1).mean():.0f})"
    )
    shares = ", ".join(f"dim {i}: {var[i] / var.sum():.1%}" for i in order[:5])
    print(f"largest shares of the variance: {shares}\n")

    keep = jnp.arange(tokens.shape[1])[None, :, None] > 0
    rng = np.random.default_rng(args.seed)

    def delta_ce(x_hat: np.ndarray) -> float:
        new = jnp.asarray(x_hat, jnp.float32)
        out = model(tokens, interventions={args.site: lambda v: jnp.where(keep, new, v)})
        return _ce(out.logits, tokens) - ce_clean

    def fvu(x_hat: np.ndarray) -> float:
        err = (x_hat[:, 1:] - x[:, 1:]).reshape(-1, x.shape[-1])
        return float((err**2).sum() / ((flat - mean) ** 2).sum())

    shapes = {
        "noise proportional to each dim's std": lambda f: (
            x + rng.standard_normal(x.shape) * np.sqrt(var * f)
        ),
        "isotropic noise": lambda f: (
            x + rng.standard_normal(x.shape) * np.sqrt(var.sum() * f / x.shape[-1])
        ),
        "shrink toward the mean": lambda f: mean + (x - mean) * (1 - np.sqrt(f)),
    }
    print("| error | FVU | delta CE (nats) |\n|---|---:|---:|")
    for name, make in shapes.items():
        for f in (0.02, 0.1, 0.3):
            x_hat = make(f).astype(np.float32)
            print(f"| {name} | {fvu(x_hat):.3f} | {delta_ce(x_hat):+.3f} |", flush=True)
    x_hat = np.broadcast_to(mean, x.shape).astype(np.float32)
    print(f"| mean ablation | {fvu(x_hat):.3f} | {delta_ce(x_hat):+.3f} |")


if __name__ == "__main__":
    main()
