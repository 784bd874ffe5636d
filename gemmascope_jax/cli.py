"""`gemmascope-jax` command line: one parser, one verb per subcommand.

One convention for every verb (tests/test_cli_conventions.py): bad input -- a missing or
malformed file, a bad config, an unknown site, a dictionary that does not fit the model --
raises a `ValueError` or `OSError` (the project's own errors subclass `ValueError`), which
`main` prints as one line, `gemmascope-jax VERB: error: MESSAGE` on stderr (argparse's own
format for usage errors), and exits 2. A run that fails for another reason (a plan that does
not fit, a missing optional package) exits 1 with the same prefix. `GEMMASCOPE_JAX_DEBUG=1`
re-raises instead, for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_CHAT = [{"role": "user", "content": "In one sentence, what does a microscope let you do?"}]
DEMO_PLAIN = "The Eiffel Tower is located in"
DEMO_TEXT = "The Eiffel Tower is in Paris, and the Colosseum is in Rome."
DEMO_SITES = ("resid_post.5", "model.layers.9.pre_feedforward_layernorm.output", "attn_z.12")
COMING = """\
Next: `make demo` now trains a Matryoshka JumpReLU SAE on resid_post.9 and a JumpReLU
skip-transcoder at layer 9 on these activations (configs/demo.yaml), then exports them in
the Gemma Scope 2, SAELens and native layouts and writes a feature dashboard. Then look
inside with `gemmascope-jax inspect / steer / refusal / jailbreak / cot / attribute`."""


def _demo(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np

    import gemmascope_jax as gsj
    from gemmascope_jax.gemma3.generate import generate

    t0 = time.perf_counter()
    model, tok = gsj.load_gemma3(args.model)
    cfg = model.cfg
    print(
        f"Loaded {cfg.name}: {cfg.num_layers} layers, d_model {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} in {time.perf_counter() - t0:.1f}s"
    )

    chat, plain = tok.chat(DEMO_CHAT), tok.encode(DEMO_PLAIN)
    t0 = time.perf_counter()
    chat_new, plain_new = generate(model, [chat, plain], max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    print("\n== Chat-formatted completion (greedy) ==")
    if args.model is None:
        print("(the embedded 270M is the pretrained model, 4-bit quantized: chat turns are out of")
        print(" its distribution; pass --model with an -it checkpoint for real chat answers)")
    print(tok.decode(chat), end="")
    print(tok.decode(chat_new, skip_special_tokens=True).strip())
    print("\n== Plain completion (greedy) ==")
    print(DEMO_PLAIN + tok.decode(plain_new, skip_special_tokens=True))
    print(f"[{len(chat_new) + len(plain_new)} tokens in {seconds:.1f}s]")

    ids = tok.encode(DEMO_TEXT)
    pieces = [tok.decode([i]) for i in ids]
    out = model(jnp.asarray([ids]), capture=DEMO_SITES, logits=False)
    print(f"\n== Top activations on {DEMO_TEXT!r} (BOS excluded) ==")
    for site in DEMO_SITES:
        acts = np.asarray(out.sites[site][0, 1:], np.float32)
        flat = np.argsort(-np.abs(acts), axis=None)[: args.top]
        print(f"{site}  [{acts.shape[0]} tokens x {acts.shape[1]} dims]")
        for pos, dim in zip(*np.unravel_index(flat, acts.shape), strict=True):
            print(f"    token {pieces[pos + 1]!r:>12}  dim {dim:5d}  value {acts[pos, dim]:+9.2f}")
    _plot_residual_norms(model, ids, pieces, Path(args.out))
    print("\n" + COMING)
    return 0


def _plot_residual_norms(model, ids, pieces, out_dir: Path) -> None:
    """Heatmap of ||resid_post|| per layer and token: where the residual stream grows."""
    import jax.numpy as jnp
    import numpy as np

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sites = [f"resid_post.{i}" for i in range(model.cfg.num_layers)]
    out = model(jnp.asarray([ids]), capture=sites, logits=False)
    norms = np.stack([np.linalg.norm(np.asarray(out.sites[s][0, 1:]), axis=-1) for s in sites])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(ids)), 5))
    im = ax.imshow(np.log10(norms), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(ids) - 1), [repr(p)[1:-1] for p in pieces[1:]], rotation=60)
    ax.set_ylabel("layer")
    ax.set_title("log10 ||resid_post|| per token (BOS excluded)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "resid_norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nSaved {path}")


def _train(args: argparse.Namespace) -> int:
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


def _plan(args: argparse.Namespace) -> int:
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


def _sites(args: argparse.Namespace) -> int:
    from gemmascope_jax.gemma3.config import preset
    from gemmascope_jax.gemma3.sites import valid_forms

    print(valid_forms(preset(args.preset).num_layers))
    return 0


def error_line(verb: str, message: object) -> None:
    """Print the one error line of the CLI convention (module docstring) to stderr."""
    print(f"gemmascope-jax {verb}: error: {message}", file=sys.stderr)


def run_verb(verb: str, func, args: argparse.Namespace) -> int:
    """Run a verb's handler under the CLI convention: bad input exits 2, a missing package 1."""
    try:
        return func(args)
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("GEMMASCOPE_JAX_DEBUG"):
            raise
        error_line(verb, e)
        return 1 if isinstance(e, ImportError) else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemmascope-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load the embedded Gemma 3 270M, chat, show activations")
    demo.add_argument("--model", default=None, help="HF dir, hub id or .gguf (default: embedded)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--top", type=int, default=4, help="activations shown per site")
    demo.add_argument("--out", default="out/demo", help="folder for the plot")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train dictionaries from a YAML config")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    train.set_defaults(func=_train)
    plan = sub.add_parser(
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
    plan.set_defaults(func=_plan)
    from gemmascope_jax.analysis.attribution_cli import add_attribute_parser
    from gemmascope_jax.analysis.chat_cli import (
        add_cot_parser,
        add_jailbreak_parser,
        add_refusal_parser,
    )
    from gemmascope_jax.analysis.dashboard import add_dashboard_parser
    from gemmascope_jax.analysis.features import add_inspect_parser
    from gemmascope_jax.analysis.steering import add_steer_parser
    from gemmascope_jax.data.rollouts import add_rollouts_parser
    from gemmascope_jax.evals.card import add_evaluate_parser
    from gemmascope_jax.formats.convert import add_convert_parser
    from gemmascope_jax.training.finetune import add_finetune_parser

    add_finetune_parser(sub)
    add_convert_parser(sub)
    add_rollouts_parser(sub)
    add_attribute_parser(sub)
    add_steer_parser(sub)
    add_refusal_parser(sub)
    add_jailbreak_parser(sub)
    add_cot_parser(sub)
    add_inspect_parser(sub)
    add_dashboard_parser(sub)
    add_evaluate_parser(sub)
    sites = sub.add_parser("sites", help="list accepted activation-site names")
    sites.add_argument("--preset", default="270m")
    sites.set_defaults(func=_sites)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "plan" and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]  # key=value after --topology
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_verb(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
