"""Synthetic ground-truth benchmark: does our training recipe find known sparse features?

For each scenario (superposition only; + correlated features; + hierarchical features; all
of it with bias and noise) a `SyntheticModel` with N true features in D dims generates
activations on the fly; JumpReLU (GS2 recipe: quadratic L0 penalty, target = the true L0),
TopK, BatchTopK and Matryoshka BatchTopK (k = the true L0, rounded) are trained with the
project's train step (`training.synthetic.train_on_synthetic`) and scored against the truth
(`gemmascope_jax.evals.synthetic`: MCC, uniqueness, shrinkage, FVU, L0, dead fraction).

    python scripts/eval_synthetic.py [--d 64 --n 256 --width 256 --steps 2000 --batch 512 --lr 3e-3]

Prints a markdown table; writes `--out`/synthetic.png (MCC per run, and per-feature best
|cos| against firing probability) and `--out`/synthetic.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gemmascope_jax.evals.synthetic import (  # noqa: E402
    SyntheticConfig,
    SyntheticModel,
    abs_cosines,
)
from gemmascope_jax.training.synthetic import train_on_synthetic  # noqa: E402

ARCHS = {  # label: (architecture, matryoshka)
    "jumprelu": ("jumprelu", False),
    "topk": ("topk", False),
    "batchtopk": ("batchtopk", False),
    "matryoshka-batchtopk": ("batchtopk", True),
}


def scenarios(base: SyntheticConfig) -> dict[str, SyntheticConfig]:
    rep = dataclasses.replace
    corr = {"correlation_rank": 8, "correlation_scale": 0.6}
    hier = {"hierarchy_roots": 16, "branching": 4, "hierarchy_depth": 1}
    return {
        "superposition": base,
        "correlated": rep(base, **corr),
        "hierarchical": rep(base, **hier),
        "all+bias+noise": rep(base, **corr, **hier, bias_norm=3.0, noise_std=0.05),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="true features")
    ap.add_argument("--width", type=int, default=256, help="dictionary latents")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-dec-init", choices=("mean", "zero"), default="mean")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--scenarios", default=None, help="comma list (default: all)")
    ap.add_argument("--out", type=Path, default=Path("out/synthetic"))
    args = ap.parse_args()

    base = SyntheticConfig(num_features=args.n, d=args.d, seed=args.seed)
    scen = scenarios(base)
    if args.scenarios:
        scen = {k: scen[k] for k in args.scenarios.split(",")}
    archs = args.archs.split(",")
    runs = [(s, a) for s in scen for a in archs]
    rows, per_feature = [], {}
    bar = tqdm(total=len(runs) * args.steps, unit="step", mininterval=5.0)
    t_all = time.perf_counter()
    for s_name, a_name in runs:
        model = SyntheticModel(scen[s_name])
        _, f = model.sample(16384, np.random.default_rng(args.seed + 7))
        true_l0 = float((f > 0).sum(1).mean())
        arch, matry = ARCHS[a_name]
        l0 = true_l0 if arch == "jumprelu" else max(1, round(true_l0))
        bar.set_description(f"{s_name}/{a_name}")
        t0 = time.perf_counter()
        out, d = train_on_synthetic(
            model, arch, width=args.width, l0=l0, steps=args.steps, batch_size=args.batch,
            lr=args.lr, matryoshka=matry, seed=args.seed, b_dec_init=args.b_dec_init,
            on_step=lambda i, m: bar.update(1),
        )  # fmt: skip
        out.update(scenario=s_name, arch=a_name, target_l0=l0, seconds=time.perf_counter() - t0)
        rows.append(out)
        cos = abs_cosines(np.asarray(d.w_dec[...]), model.features)
        per_feature[(s_name, a_name)] = (model.probs, cos.max(axis=0))
        out["best_cos_per_feature"] = [round(float(c), 4) for c in cos.max(axis=0)]
        out["firing_probability"] = [float(p) for p in model.probs]
    bar.close()
    total = time.perf_counter() - t_all

    cols = ["mcc", "mcc_max", "uniqueness", "recovered", "shrinkage", "magnitude_ratio",
            "fvu", "l0", "true_l0", "dead_fraction"]  # fmt: skip
    print(
        f"\nD={args.d}, N={args.n} true features, width {args.width}, {args.steps} steps x "
        f"{args.batch} tokens = {args.steps * args.batch:,} tokens per run, lr {args.lr}, "
        f"seed {args.seed}, b_dec init {args.b_dec_init}; {len(runs)} runs in {total:.0f} s\n"
    )
    print("| scenario | dictionary | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        vals = " | ".join(
            f"{r[c]:.3f}" if c not in ("l0", "true_l0") else f"{r[c]:.2f}" for c in cols
        )
        print(f"| {r['scenario']} | {r['arch']} | {vals} |")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
    )
    plot(rows, per_feature, scen, archs, args.out / "synthetic.png")
    print(f"\nwrote {args.out / 'synthetic.json'} and {args.out / 'synthetic.png'}")


def plot(rows, per_feature, scen, archs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(archs)
    names = list(scen)
    for k, a in enumerate(archs):
        vals = [
            next(r["mcc"] for r in rows if r["scenario"] == s and r["arch"] == a) for s in names
        ]
        ax0.bar(np.arange(len(names)) + k * width, vals, width, label=a)
    ax0.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax0.set_ylim(0, 1)
    ax0.set_ylabel("MCC (Hungarian)")
    ax0.legend(fontsize=8, loc="lower left")
    ax0.set_title("recovery of the true features")
    s0 = names[0]
    for a in archs:
        p, best = per_feature[(s0, a)]
        ax1.scatter(p, best, s=6, alpha=0.6, label=a)
    ax1.set_xscale("log")
    ax1.set_xlabel("true firing probability")
    ax1.set_ylabel("best |cos| with a latent")
    ax1.set_title(f"per feature, scenario '{s0}'")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
