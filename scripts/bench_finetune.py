"""End-to-end KL finetuning, measured (issue 16 part 3; docs/quality.md).

On the embedded Gemma 3 270M:

1. **First stage**: the demo-scale dictionaries of `configs/demo.yaml` (Matryoshka JumpReLU
   SAE on `resid_post.9`, width 4096, and the skip-transcoder `mlp_in.9 -> mlp_out.9`, both
   L0 target 32), trained with `run_training` on the config's data (the demo: the default
   embedded corpus), `--steps` steps (the demo's settings otherwise).
2. **Finetune**: for each β in `--betas`, `run_finetune` (training/finetune.py) from the first
   stage's final checkpoint, `--ft-steps` steps of `--ft-batch` windows of 128 tokens at lr
   `--ft-lr`. β = 0 is the control: the same steps with MSE + sparsity only, so that the
   KL term's effect is separated from "more training".
3. **Measure** on held-out text unlike the training text: the public-domain English prose
   and dialogue of `gemmascope_jax/data/heldout/english_prose.jsonl` (Carroll, Austen; never
   a training source). The trainer's own held-out eval (`evals.heldout.HeldoutEval`:
   `evals.metrics.evaluate` for FVU / L0 and `evals.splice.splice_eval` for delta LM loss
   and KL) runs on the exported (folded, raw-unit) dictionaries, before and after.
   `--train-heldout` also measures on the first stage's held-out split of its training data.

Writes `results.json`, `table.md` and `finetune.png` under `--out` and prints the table.
Rerunning resumes: finished stages are restored from their checkpoints.

    JAX_PLATFORMS=cpu nice python scripts/bench_finetune.py --out out/bench_finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "gemmascope_jax" / "data" / "heldout" / "english_prose.jsonl"
HEAD = ("l0", "fvu", "delta_loss", "kl", "ce_clean", "ce_spliced")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench_finetune")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=640, help="first-stage steps (demo: 640)")
    p.add_argument("--ft-steps", type=int, default=60, help="finetune steps per beta")
    p.add_argument("--ft-batch", type=int, default=4, help="128-token windows per finetune step")
    p.add_argument("--ft-lr", type=float, default=3e-4, help="finetune lr (constant)")
    p.add_argument("--betas", default="0,1,4", help="comma-separated; 0 = MSE-only control")
    p.add_argument("--heldout-tokens", type=int, default=8192)
    p.add_argument(
        "--train-heldout", action="store_true", help="also measure on the run's held-out split"
    )
    p.add_argument("--override", action="append", default=[], help="extra key=value for all")
    return p.parse_args(argv)


def _fmt_beta(b: float) -> str:
    return f"{b:g}".replace(".", "p")


def stage_configs(args, out: Path):
    from gemmascope_jax.training.config import load_config

    common = [
        f"run.dir={out / 'stage1'}",
        f"train.steps={args.steps}",
        "eval.heldout_tokens=0",  # measured below, on the English held-out text
        "export.formats=[native]",
        "report.progress=false",
        *args.override,
    ]
    first = load_config(args.config, common)
    ft = {}
    for b in [float(x) for x in args.betas.split(",") if x.strip()]:
        ft[b] = load_config(
            args.config,
            [
                *common,
                f"finetune.beta={b}",
                f"finetune.steps={args.ft_steps}",
                f"finetune.batch_size={args.ft_batch}",
                f"finetune.lr={args.ft_lr}",
                f"finetune.dir=finetune_beta{_fmt_beta(b)}",
                "report.log_every=5",
            ],
        )
    return first, ft


def _native(exports: dict[str, dict[str, str]], export_dir: Path) -> dict[str, str]:
    """{name: native export folder}; a rerun's export that was skipped (the folder exists
    and was not replaced) is the same final state's: use the folder."""
    out = {}
    for name, paths in exports.items():
        path = paths["native"]
        if path.startswith("skipped"):
            path = str(export_dir / name / "native")
            if not Path(path).is_dir():
                raise FileNotFoundError(f"no native export of {name}: {paths['native']}")
        out[name] = path
    return out


def measure(cfg, model, tok, exports: dict[str, str], docs, tokens: int) -> dict[str, dict]:
    """Held-out FVU / L0 / delta loss / KL of each exported dictionary (the trainer's eval)."""
    import dataclasses

    from gemmascope_jax.evals.heldout import HeldoutEval
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.training.report import _scalars

    dicts = {name: load_dictionary(path) for name, path in exports.items()}
    sites = sorted({s for d in dicts.values() for s in (*d.cfg.input_sites, *d.cfg.output_sites)})
    ecfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, heldout_tokens=tokens, splice=True)
    )
    evals = HeldoutEval(ecfg, model, tok, sites, docs)(dicts)
    return {n: {k: v for k, v in _scalars(e).items()} for n, e in evals.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import jax

    from gemmascope_jax.data.corpus import open_source
    from gemmascope_jax.data.pipeline import split_run_documents
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.training.finetune import run_finetune
    from gemmascope_jax.training.trainer import run_training

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    first_cfg, ft_cfgs = stage_configs(args, out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    r1 = run_training(first_cfg)
    timings["first_stage_s"] = time.perf_counter() - t
    exports = {"first stage": _native(r1.exports, first_cfg.export_dir)}
    print(f"first stage: {r1.steps} steps, {timings['first_stage_s']:.0f} s", flush=True)

    for b, cfg in ft_cfgs.items():
        t = time.perf_counter()
        r = run_finetune(cfg)
        timings[f"finetune_beta{b:g}_s"] = time.perf_counter() - t
        if r.stopped_early:
            print(f"finetune beta {b:g} stopped at step {r.steps}; rerun to resume")
            return 1
        exports[f"beta={b:g}"] = _native(r.exports, cfg.path(cfg.finetune.dir) / "export")
        print(
            f"finetune beta {b:g}: {r.steps} steps, {timings[f'finetune_beta{b:g}_s']:.0f} s",
            flush=True,
        )

    t = time.perf_counter()
    model, tok = load_gemma3(None, dtype=first_cfg.model.dtype)
    english = open_source(str(HELDOUT), field="text")
    sets = {"english": english}
    if args.train_heldout:
        sets["training held-out"] = split_run_documents(first_cfg)[1]
    results: dict[str, dict] = {k: {} for k in sets}
    for set_name, docs in sets.items():
        for variant, paths in exports.items():
            results[set_name][variant] = measure(
                first_cfg, model, tok, paths, docs, args.heldout_tokens
            )
            print(f"measured {set_name} / {variant}", flush=True)
    timings["measure_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    payload = {
        "args": vars(args),
        "model": "embedded Gemma 3 270M (float32)",
        "heldout": {
            "english": str(HELDOUT.relative_to(ROOT)),
            "training held-out": "first stage's held-out split" if args.train_heldout else None,
        },
        "devices": [str(d) for d in jax.devices()],
        "timings": timings,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(results)
    (out / "table.md").write_text(table)
    plot(results["english"], out / "finetune.png")
    print(table)
    print(
        f"total {timings['total_s'] / 60:.1f} min; wrote {out}/results.json, table.md, finetune.png"
    )
    return 0


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (held-out set, dictionary, variant); relative delta loss vs the first
    stage and vs the β = 0 control."""
    lines = []
    for set_name, by_variant in results.items():
        lines += [
            f"Held-out: {set_name}",
            "",
            "| dictionary | variant | L0 | FVU | delta loss (nats) | KL | delta loss vs first "
            "stage | delta loss vs beta=0 | FVU change |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        first = by_variant["first stage"]
        control = by_variant.get("beta=0")
        for name in first:
            for variant, m in by_variant.items():
                e = m[name]
                rel = e["delta_loss"] / first[name]["delta_loss"] - 1.0
                rel0 = (
                    f"{e['delta_loss'] / control[name]['delta_loss'] - 1.0:+.1%}"
                    if control and variant not in ("first stage", "beta=0")
                    else ""
                )
                rel_s = f"{rel:+.1%}" if variant != "first stage" else ""
                dfvu = f"{e['fvu'] - first[name]['fvu']:+.3f}" if variant != "first stage" else ""
                lines.append(
                    f"| {name} | {variant} | {e['l0']:.1f} | {e['fvu']:.3f} | "
                    f"{e['delta_loss']:.3f} | {e['kl']:.3f} | {rel_s} | {rel0} | {dfvu} |"
                )
        ce = next(iter(first.values()))["ce_clean"]
        lines += ["", f"Clean LM loss on this text: {ce:.3f} nats/token.", ""]
    return "\n".join(lines)


def plot(by_variant: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(by_variant)
    names = list(by_variant["first stage"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 5.6), squeeze=False)
    colors = ["#999999"] + [f"C{i}" for i in range(len(variants) - 1)]
    for j, name in enumerate(names):
        for row, (key, label) in enumerate(
            (("delta_loss", "delta LM loss (nats)"), ("fvu", "FVU"))
        ):
            ax = axes[row][j]
            vals = [by_variant[v][name][key] for v in variants]
            bars = ax.bar(range(len(variants)), vals, color=colors)
            for k, bar in enumerate(bars):
                l0 = by_variant[variants[k]][name]["l0"]
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height(),
                    f"{vals[k]:.3f}\nL0 {l0:.0f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_xticks(range(len(variants)), variants, fontsize=8)
            ax.set_ylabel(label)
            ax.set_ylim(0, max(vals) * 1.3)
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(
        "End-to-end KL finetuning, embedded Gemma 3 270M, held-out English prose", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
