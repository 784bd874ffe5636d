"""Gemma Scope 2's CLT prefix init against a CLT trained from scratch (issue 13 part 4;
docs/quality.md), on the embedded Gemma 3 270M, through the real trainer.

1. **Single-layer stage**: one Matryoshka JumpReLU transcoder `mlp_in.l -> mlp_out.l` per
   layer (`{kind: transcoder, layers: all}`), width `--single-width`, L0 target
   `--single-l0` each.
2. **L0 at init**: the prefix-init CLT built from those exports in raw units
   (`training.init_from.prefix_init` with unit scalars) is run on held-out activations;
   its L0 summed over layers is the report's "sum of the chosen single-layer L0s", the
   prefix arm's `l0_target_init`.
3. **Two CLTs**, same data, steps, lr and final L0 target `--clt-l0`, width `--clt-width`
   per layer: `scratch` (GS2 init) and `prefix` (`init_from_layers` + `l0_target_init`,
   decaying to the target over the first half of the steps).
4. **Measure**: the trainer's held-out eval (FVU, L0, spliced delta LM loss and KL, all
   layers spliced at once), and circuit-tracer's replacement and completeness scores of the
   attribution graphs of the first `--graph-prompts` prompts of the quality card's set
   (`analysis.attribution.graph_quality`).

All runs share one activation cache (`--out/cache`) and the short-run settings of
docs/recipe.md ("Units, and short runs"). Writes `results.json` and `table.md` under
`--out`; reruns resume (finished runs are restored from their checkpoints).

    JAX_PLATFORMS=cpu nice python scripts/bench_clt_init.py --out out/bench_clt_init
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = [
    "data.normalization=sqrt_d",
    "train.threshold_init=0.01",
    "train.bandwidth=0.05",
    "train.grad_clip_norm=1.0",
    "train.freq_penalty_coeff=0",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench_clt_init")
    p.add_argument("--single-width", type=int, default=1024)
    p.add_argument("--single-l0", type=float, default=16)
    p.add_argument("--single-steps", type=int, default=200)
    p.add_argument("--clt-width", type=int, default=64, help="latents per layer")
    p.add_argument("--clt-l0", type=float, default=72, help="summed over layers")
    p.add_argument("--clt-steps", type=int, default=300)
    p.add_argument("--heldout-tokens", type=int, default=4096)
    p.add_argument(
        "--graph-prompts", type=int, default=4, help="first N of graph_quality.DEFAULT_PROMPTS"
    )
    return p.parse_args(argv)


def run_config(args, out: Path, name: str, dictionary: str, steps: int, epochs: int, extra=()):
    from gemmascope_jax.training.config import load_config

    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"run.name={name}",
            f"run.dir={out / name}",
            f"data.cache_dir={out / 'cache'}",
            f"data.epochs={epochs}",
            "data.shuffle_buffer_tokens=8192",  # 36 sites x 640 floats a token: 0.75 GB
            f"train.steps={steps}",
            "train.batch_tokens=1024",
            "train.lr=2e-3",
            f"train.sparsity_warmup_steps={steps // 4}",
            f"train.l0_target_decay_steps={steps // 2}",
            f"eval.heldout_tokens={args.heldout_tokens}",
            "eval.every_steps=0",
            "eval.card=false",  # graph scores below, on --graph-prompts prompts (CPU time)
            "export.formats=[native]",
            "report.progress=false",
            f"dictionaries=[{dictionary}]",
            *SHORT_RUN,
            *extra,
        ],
    )


def l0_at_init(args, out: Path, single_run: Path, clt_cfg) -> float:
    """L0 (summed over layers) of the prefix-init CLT on held-out raw activations."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemmascope_jax.data.pipeline import split_run_documents
    from gemmascope_jax.dictionaries.base import stack_sites
    from gemmascope_jax.dictionaries.registry import dictionary_class
    from gemmascope_jax.evals.heldout import HeldoutEval
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.training.config import dictionary_trainings
    from gemmascope_jax.training.init_from import prefix_init

    model, tok = load_gemma3(None, dtype="float32", progress=False)
    (training,) = dictionary_trainings(clt_cfg, model)
    cfg = training.cfg
    singles = [
        load_dictionary(single_run / "export" / f"tc_{layer}" / "native") for layer in cfg.layers
    ]
    fresh = dictionary_class("clt").from_arrays(
        cfg, dictionary_class("clt").init_arrays(cfg, jax.random.key(0))
    )
    ones = {s: 1.0 for s in (*cfg.input_sites, *cfg.output_sites)}
    clt, info = prefix_init(fresh, singles, ones)
    heldout = split_run_documents(clt_cfg)[1]
    _, acts = HeldoutEval(clt_cfg, model, tok, cfg.input_sites, heldout).tokens_and_sites()
    l0s = []
    for a in acts:
        x = stack_sites(a, cfg.input_sites, True).reshape(-1, cfg.num_layers, cfg.d_in)
        codes = np.asarray(clt.encode(jnp.asarray(x)))
        l0s.append((codes > 0).sum(axis=(1, 2)))
    (out / "prefix_info.json").write_text(json.dumps({str(k): v for k, v in info.items()}))
    return float(np.concatenate(l0s).mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from gemmascope_jax.training.trainer import run_training

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.perf_counter()
    single = (
        f"{{name: tc, kind: transcoder, layers: all, width: {args.single_width}, "
        f"l0_target: {args.single_l0:g}, matryoshka: true}}"
    )
    t = time.perf_counter()
    # the singles write the shared cache: as many tokens as the CLTs read (8 epochs)
    epochs = max(1, round(8 * args.single_steps / args.clt_steps))
    quiet = ("eval.splice=false",)  # the CLTs are measured, not these
    run_training(run_config(args, out, "singles", single, args.single_steps, epochs, quiet))
    timings["singles_s"] = time.perf_counter() - t
    clt = (
        f"{{name: clt, kind: clt, layers: all, width: {args.clt_width}, "
        f"l0_target: {args.clt_l0:g}, matryoshka: true"
    )
    scratch_cfg = run_config(args, out, "scratch", clt + "}", args.clt_steps, 8)
    saved = out / "l0_at_init.json"  # a rerun skips the model load
    if not saved.is_file():
        saved.write_text(json.dumps(l0_at_init(args, out, out / "singles", scratch_cfg)))
    l0_init = float(json.loads(saved.read_text()))
    print(f"prefix-init CLT L0 at init: {l0_init:.1f}", flush=True)
    init = f", init_from_layers: '{out / 'singles' / 'export' / 'tc_{layer}' / 'native'}'"
    init += f", l0_target_init: {max(l0_init, args.clt_l0):.1f}}}"
    prefix_cfg = run_config(args, out, "prefix", clt + init, args.clt_steps, 8)
    arms = {"scratch": scratch_cfg, "prefix": prefix_cfg}
    from gemmascope_jax.analysis.attribution import graph_quality
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.gemma3.loading import load_gemma3

    prompts = graph_quality.DEFAULT_PROMPTS[: args.graph_prompts]
    results, trained = {}, {}
    for arm, cfg in arms.items():  # train both first: one model in memory at a time
        t = time.perf_counter()
        trained[arm] = run_training(cfg).evals["clt"]
        timings[f"{arm}_s"] = time.perf_counter() - t
    model, tok = load_gemma3(None, dtype="float32", progress=False)
    for arm, cfg in arms.items():
        ev = trained[arm]
        t = time.perf_counter()
        scores = Path(cfg.run.dir) / "graph_scores.json"
        if prompts and not scores.is_file():
            clt = load_dictionary(Path(cfg.run.dir) / "export" / "clt" / "native")
            gq = graph_quality.graph_quality(model, tok, clt, prompts)
            scores.write_text(json.dumps(gq, indent=1))
        gs = json.loads(scores.read_text()) if scores.is_file() else {}
        timings[f"{arm}_graphs_s"] = time.perf_counter() - t
        results[arm] = {"fvu": ev["fvu"], "l0": ev["l0"]}
        results[arm].update({k: ev.get(k) for k in ("delta_loss", "kl", "dead_fraction")})
        for graphs, suffix in (("unpruned", ""), ("pruned", "_pruned")):
            for score in ("replacement", "completeness"):
                results[arm][score + suffix] = gs.get(graphs, {}).get(score, {}).get("mean")
        print(f"{arm}: {results[arm]}", flush=True)
    timings["total_s"] = time.perf_counter() - t_all
    payload = {"args": vars(args), "l0_at_init": l0_init, "timings": timings, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(results, l0_init, args)
    (out / "table.md").write_text(table)
    print(table)
    return 0


def markdown_table(results, l0_init, args) -> str:
    keys = ("l0", "fvu", "delta_loss", "kl", "dead_fraction", "replacement", "completeness")
    keys += ("replacement_pruned", "completeness_pruned")
    lines = [
        f"CLT width {args.clt_width} x 18 layers, L0 target {args.clt_l0:g}, {args.clt_steps} "
        f"steps; prefix arm from {args.single_width}-wide Matryoshka transcoders "
        f"(L0 {args.single_l0:g} each), l0_target_init {max(l0_init, args.clt_l0):.1f}",
        "",
        "| arm | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for arm, r in results.items():
        cells = ["-" if r[k] is None else f"{r[k]:.3f}" for k in keys]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
