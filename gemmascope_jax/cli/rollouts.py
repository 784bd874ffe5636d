"""`gemmascope-jax rollouts PROMPTS --out OUT`: the model's own answers to chat prompts.

The library behind it is `data.rollouts` (`load_prompts`, `generate_rollouts`): resumable,
and reused when the settings match. Train on the output with a jsonl source
`{path: OUT, text_field: messages, chat: true}` or a `rollouts` source.
"""

from __future__ import annotations

import argparse

from gemmascope_jax.cli._common import add_model_argument


def add_rollouts_parser(subparsers) -> argparse.ArgumentParser:
    """Register `rollouts` on an `argparse` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "rollouts",
        help="answer chat prompts with a model into chat documents (JSONL) for IT training",
        description="Generate the model's own responses to chat prompts and write them as "
        "chat documents (resumable; reused when the settings match). Train on them with a "
        "jsonl source {path: OUT, text_field: messages, chat: true} or a rollouts source.",
    )
    p.add_argument("prompts", help="prompts JSONL (one chat per line) or 'packaged'")
    p.add_argument("--out", required=True, help="output JSONL of chat documents")
    add_model_argument(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--field", default="messages", help="field of a record holding its turns")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, default=None)
    p.set_defaults(func=rollouts_command)
    return p


def rollouts_command(args: argparse.Namespace) -> int:
    """Handler of `rollouts`: prints the output path and counts (errors: `run_verb`)."""
    from gemmascope_jax.data.rollouts import RolloutSettings, generate_rollouts, load_prompts
    from gemmascope_jax.gemma3.loading import load_gemma3

    settings = RolloutSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_prompts=args.max_prompts,
    )
    prompts = load_prompts(args.prompts, field=args.field)
    model, tok = load_gemma3(args.model, dtype=args.dtype)
    model_id = f"{args.model or 'embedded'} ({args.dtype})"
    out = generate_rollouts(model, tok, prompts, args.out, settings=settings, model_id=model_id)
    n = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"{n} rollouts -> {out}")
    return 0
