"""What the skip buys: skip-transcoder vs plain transcoder vs an SAE on mlp_out, equal tokens
(issue 13.3, last part; docs/quality_h2h.md "Transcoders").

SAELens has no transcoder trainer, so the comparison the issue asks for is: our
skip-transcoder (`mlp_in.9 -> mlp_out.9`, `ŷ = f·W_dec + b_dec + x·W_skip`), our plain
transcoder (the same without W_skip), and SAEs on `mlp_out.9` itself (SAELens' JumpReLU and
TopK trainers, and ours). A transcoder predicts the MLP's output from its input, so it
replaces the MLP's computation; an SAE only re-encodes the output, so its FVU is a floor
that a transcoder of the same L0 approaches as it captures the MLP.

Setup as `scripts/bench_quality.py` (whose helpers it uses): the embedded Gemma 3 270M and the
default corpus split by source; `mlp_in.9` and `mlp_out.9` captured once (BOS dropped),
`--train-tokens` training and `--heldout-tokens` held-out tokens; every dictionary sees the
same batches in the same order. Ours train with the short-run settings of
docs/quality_h2h.md (`sqrt_d` units, θ0 0.01, ε 0.05, clip 1.0, no frequency penalty);
SAELens as in bench_quality. Evaluated by the project's own code on the folded (raw-unit)
dictionaries: `evals.metrics.evaluate` (FVU of mlp_out.9, L0, dead and dense fractions) on
the held-out activations, and `evals.splice.splice_eval` (delta LM loss and KL with
mlp_out.9 replaced by the prediction) on held-out text.

    JAX_PLATFORMS=cpu python scripts/bench_transcoder.py --out out/bench_transcoder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "scripts"))

import bench_quality as bq  # noqa: E402

from gemmascope_jax.data.activations import estimate_norm_scalars  # noqa: E402
from gemmascope_jax.data.corpus import embedded_corpus  # noqa: E402
from gemmascope_jax.data.sources import split_documents  # noqa: E402
from gemmascope_jax.dictionaries import DictionaryConfig, dictionary_class  # noqa: E402
from gemmascope_jax.evals.metrics import evaluate  # noqa: E402
from gemmascope_jax.evals.splice import splice_eval  # noqa: E402
from gemmascope_jax.training import (  # noqa: E402
    DictionaryTraining,
    make_train_step,
)

LAYER = 9
SITE_IN, SITE_OUT = f"mlp_in.{LAYER}", f"mlp_out.{LAYER}"
# (side, kind) -> what it is; ours train in sqrt_d units with the short-run settings
VARIANTS = {
    ("ours", "skip_transcoder"): "skip-transcoder mlp_in.9 -> mlp_out.9",
    ("ours", "transcoder"): "transcoder mlp_in.9 -> mlp_out.9",
    ("ours", "sae"): "JumpReLU SAE on mlp_out.9",
    ("saelens", "jumprelu"): "SAELens JumpReLU SAE on mlp_out.9",
    ("saelens", "topk"): "SAELens TopK SAE on mlp_out.9",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench_transcoder")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--l0s", default="16,32,64")
    p.add_argument("--lrs", default="2e-3", help="the same grid for every variant")
    p.add_argument("--train-tokens", type=int, default=24576)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="tokens per optimizer step")
    p.add_argument("--heldout-tokens", type=int, default=8192)
    p.add_argument("--splice-tokens", type=int, default=1016)
    p.add_argument("--lr-warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--sparsity-warmup", type=float, default=0.25, help="fraction of steps")
    p.add_argument("--dead-window", type=float, default=0.25, help="fraction of steps")
    p.add_argument("--plot", default=str(ROOT / "docs" / "transcoder_frontier.png"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def dictionary_config(kind: str, l0: int, d_in: int, d_out: int, width: int, k=None):
    """Our config of a variant: transcoders read mlp_in.9 (their default), SAEs mlp_out.9."""
    sae = kind in ("sae", "jumprelu", "topk")
    return DictionaryConfig(
        kind="sae" if sae else kind,
        architecture="topk" if k else "jumprelu",
        d_in=d_in,
        d_out=d_out,
        width=width,
        layers=(LAYER,),
        l0_target=None if k else l0,
        k=k,
        input_sites=(SITE_OUT,) if sae else None,
    )


def train_ours(kind, l0, lr, args, acts, order, scales, width):
    """Our dictionary after the run, folded to raw units (short-run settings)."""
    d = acts[SITE_IN].shape[1]
    cfg = dictionary_config(kind, l0, d, d, width)
    loss, opt = bq.recipe_configs(args, len(order), lr, short_run=True)
    sites = sorted({*cfg.input_sites, *cfg.output_sites})
    step = make_train_step([DictionaryTraining(cfg, loss, opt)])
    mean = {s: acts[s][:8192] / scales[s] for s in sites}
    state = step.init(seed=args.seed, mean_batch=mean)
    for idx in tqdm(order, desc=f"ours {kind} L0 {l0} lr {lr:g}", leave=False):
        state, _ = step(state, step.put_batch({s: acts[s][idx] / scales[s] for s in sites}))
    (trained,) = step.dictionaries(state)
    s_in, s_out = scales[cfg.input_sites[0]], scales[cfg.output_sites[0]]
    return trained.fold_input_scale(s_in, s_out)


def train_theirs(arch, l0, lr, args, acts, order, scales, width):
    """A SAELens SAE on mlp_out.9 (`bench_quality.train_saelens`), as our folded Dictionary."""
    y, s = acts[SITE_OUT], scales[SITE_OUT]
    _, arrays = bq.train_saelens(arch, l0, lr, args, y, order, s, width)
    k = l0 if arch == "topk" else None
    cfg = dictionary_config(arch, l0, y.shape[1], y.shape[1], width, k=k)
    arrays = {n: a for n, a in arrays.items() if n != "threshold" or not k}
    return dictionary_class("sae").from_arrays(cfg, arrays).fold_input_scale(s, s)


def held_out_metrics(d, acts) -> dict:
    x = acts[d.cfg.input_sites[0]]
    pairs = ((x[i : i + 2048], acts[SITE_OUT][i : i + 2048]) for i in range(0, len(x), 2048))
    m = evaluate(d, ((jnp.asarray(a), jnp.asarray(b)) for a, b in pairs))
    return {k: m[k] for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}


def table(results: list[dict]) -> str:
    lines = [
        "| side | dictionary | L0 target | lr | L0 | FVU (mlp_out.9) | dead | dense "
        "| delta loss | KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["side"], r["kind"], r["l0_target"], r["lr"])):
        lines.append(
            f"| {bq.SIDE_NAME[r['side']]} | {VARIANTS[(r['side'], r['kind'])]} "
            f"| {r['l0_target']} | {r['lr']:g} | {r['l0']:.1f} | {r['fvu']:.4f} "
            f"| {r['dead_fraction']:.3f} | {r['dense_fraction']:.4f} "
            f"| {r['delta_loss']:.4f} | {r['kl']:.4f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (side, kind), label in VARIANTS.items():
        rows = sorted(
            (r for r in results if (r["side"], r["kind"]) == (side, kind)),
            key=lambda r: r["l0"],
        )
        if not rows:
            continue
        style = "-o" if side == "ours" else "--s"
        for ax, key in zip(axes, ("fvu", "delta_loss"), strict=True):
            ax.plot([r["l0"] for r in rows], [r[key] for r in rows], style, label=label)
    for ax, name in zip(axes, ("FVU of mlp_out.9 (held-out)", "delta LM loss, nats"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Gemma 3 270M layer 9: what the skip buys (equal tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gemmascope_jax.gemma3.loading import load_gemma3

    torch.set_num_threads(os.cpu_count() or 1)
    jax.config.update("jax_default_matmul_precision", "highest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load_gemma3(None, dtype=jnp.float32, progress=True)
    train_docs, held_docs = split_documents(embedded_corpus(None), holdout=0.1, seed=0)
    data_path = out / "acts.npz"
    if data_path.exists():
        z = np.load(data_path)
        train = {SITE_IN: z["train_in"], SITE_OUT: z["train_out"]}
        held = {SITE_IN: z["held_in"], SITE_OUT: z["held_out"]}
        splice_tokens = list(z["splice"])
    else:
        sites = (SITE_IN, SITE_OUT)
        train, _ = bq.capture(model, tok, train_docs, args.train_tokens, 0, "capture train", sites)
        held, held_batches = bq.capture(
            model, tok, held_docs, args.heldout_tokens, 2, "held-out", sites
        )
        splice_tokens = held_batches[: max(1, args.splice_tokens // (8 * 127))]
        np.savez(
            data_path,
            train_in=train[SITE_IN],
            train_out=train[SITE_OUT],
            held_in=held[SITE_IN],
            held_out=held[SITE_OUT],
            splice=np.stack(splice_tokens),
        )
    scales = estimate_norm_scalars([train], 1, "sqrt_d")  # E||x/s||^2 = d for every side
    order = bq.epoch_order(len(train[SITE_IN]), args.batch, args.epochs, args.seed)
    print(f"{len(order)} steps of {args.batch} tokens; scales {scales}", flush=True)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["side"], r["kind"], r["l0_target"], r["lr"]) for r in results}
    for side, kind in VARIANTS:
        for l0 in (int(v) for v in args.l0s.split(",")):
            for lr in (float(v) for v in args.lrs.split(",")):
                if (side, kind, l0, lr) in done:
                    continue
                t0 = time.perf_counter()
                train_fn = train_ours if side == "ours" else train_theirs
                d = train_fn(kind, l0, lr, args, train, order, scales, args.width)
                train_s = time.perf_counter() - t0
                m = held_out_metrics(d, held)
                m.update(splice_eval(model, d, splice_tokens))
                results.append(
                    dict(side=side, kind=kind, l0_target=l0, lr=lr, train_s=train_s, **m)
                )
                print(
                    f"{side} {kind} L0 {l0} lr {lr:g}: L0 {m['l0']:.1f} FVU {m['fvu']:.4f} "
                    f"delta {m['delta_loss']:.3f} ({train_s:.0f} s)",
                    flush=True,
                )
                results_path.write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    (out / "table.md").write_text(text + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    print(f"this invocation: {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
