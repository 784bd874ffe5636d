"""Training verbs: `train` a run config, `plan` its step for a TPU slice, `finetune` it (KL)."""

from __future__ import annotations

import argparse

from gemmascope_jax.cli._common import error_line


def add_train_parser(subparsers) -> None:
    """Register `train CONFIG [key=value ...]`."""
    train = subparsers.add_parser("train", help="train dictionaries from a YAML config")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    train.set_defaults(func=train_command)


def add_plan_parser(subparsers) -> None:
    """Register `plan CONFIG --topology T [key=value ...]` (overrides may follow the options:
    `gemmascope_jax.cli.main` adds them)."""
    plan = subparsers.add_parser(
        "plan", help="compile a config's train step for a TPU slice (no TPU needed): fits?"
    )
    plan.add_argument("config", help="YAML run config (see configs/)")
    plan.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:2x2x1, v6e:2x2")
    plan.add_argument("--json", action="store_true", help="last line: the plan as JSON")
    plan.add_argument(
        "--fsdp",
        choices=("auto", "on", "off"),
        default="auto",
        help="shard the LM weights over data too (auto: the config's mesh.fsdp, else when "
        "tensor parallelism alone leaves them above a quarter of a chip's HBM)",
    )
    plan.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    plan.set_defaults(func=plan_command)


def add_finetune_parser(subparsers) -> None:
    """Register `finetune CONFIG [key=value ...]` (the config's `finetune:` section)."""
    p = subparsers.add_parser(
        "finetune", help="end-to-end KL finetuning of a trained run's dictionaries (TR §2.4)"
    )
    p.add_argument("config", help="the run's YAML config, with a `finetune:` section")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.beta=2")
    p.set_defaults(func=finetune_command)


def train_command(args: argparse.Namespace) -> int:
    """Handler of `train`: run (or resume) the config, print where everything went."""
    import logging

    from gemmascope_jax.training.config import load_config
    from gemmascope_jax.training.trainer import run_training, summary_json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    print(cfg.describe())
    result = run_training(cfg)
    if result.stopped_early:
        print(f"stopped at step {result.steps} (checkpoint saved); rerun to resume")
        return 0
    print(summary_json(result))
    print(f"report: {result.report_dir}")
    for name, paths in result.exports.items():
        for fmt, path in paths.items():
            print(f"export {name} [{fmt}]: {path}")
    for name, path in result.cards.items():
        print(f"quality card {name}: {path}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """AOT-compile the run's step for a TPU topology; exit 0 fits, 1 does not, 2 bad input."""
    import json

    from gemmascope_jax.training.config import load_config
    from gemmascope_jax.training.plan import make_plan

    fsdp = {"auto": None, "on": True, "off": False}[args.fsdp]
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.topology, fsdp=fsdp)
    print(plan.describe())
    if not plan.fits:
        error_line("plan", f"does not fit on {args.topology}: {plan.dominant()}")
    if args.json:
        print(json.dumps(plan.to_json()))
    return 0 if plan.fits else 1


def finetune_command(args: argparse.Namespace) -> int:
    """Handler of `finetune`: run (or resume) the KL stage, print the before/after summary."""
    import logging

    from gemmascope_jax.training.config import load_config
    from gemmascope_jax.training.finetune import finetune_summary, run_finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    ft = cfg.finetune
    print(
        f"finetune {cfg.run.name}: beta {ft.beta:g}, {ft.steps} steps, from "
        f"{ft.init_from or cfg.run.dir} -> {cfg.path(ft.dir)}"
    )
    result = run_finetune(cfg)
    if result.stopped_early:
        print(f"stopped at step {result.steps} (checkpoint saved); rerun to resume")
        return 0
    print(finetune_summary(result))
    for name, paths in result.exports.items():
        for fmt, path in paths.items():
            print(f"export {name} [{fmt}]: {path}")
    return 0
