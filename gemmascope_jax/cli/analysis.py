"""`gemmascope-jax inspect` and `gemmascope-jax steer`: a dictionary's latents on a prompt.

    gemmascope-jax inspect "The Eiffel Tower is in Paris" --dictionary D [--splice] [--latent 123]
    gemmascope-jax steer --dictionary D --feature 123 --alpha 8 [--mode raw|clamp] "prompt"

`inspect` prints the strongest latents per token and over the prompt, and with `--latent` a
latent's logit lens; `steer` prints a baseline and a steered completion. The library behind
them: `analysis.features.top_features`, `analysis.logit_lens.logit_lens` and
`analysis.steering.steer`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gemmascope_jax.analysis.steering import MODES
from gemmascope_jax.cli._common import add_model_argument, load_model

# ---- inspect ----------------------------------------------------------------------------------


def add_inspect_parser(subparsers) -> None:
    """Register `inspect`."""
    p = subparsers.add_parser(
        "inspect", help="top dictionary latents per token of a prompt; a latent's logit lens"
    )
    p.add_argument("text", nargs="?", default=None, help="prompt (a JSON chat with --chat)")
    p.add_argument("--dictionary", required=True, help="dictionary folder (any format)")
    add_model_argument(p)
    p.add_argument("--k", type=int, default=10, help="latents per token / lens tokens")
    p.add_argument("--splice", action="store_true", help="also print reconstruction errors")
    p.add_argument("--chat", action="store_true", help="the text is a JSON list of turns")
    p.add_argument("--latent", type=int, default=None, help="print this latent's logit lens")
    p.add_argument("--layer", type=int, default=None, help="source layer of --latent (CLTs)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=inspect_command)


def _print_report(rep, top_ranked: int = 20) -> None:
    """Print a `FeatureReport`: the top latents per token, then the prompt's ranking."""
    print(f"== {rep.dictionary}: top latents per token ==")
    multi = bool(len(rep.top_layers)) and len(set(rep.top_layers[rep.top_ids >= 0].tolist())) > 1
    name = lambda layer, i: f"L{layer}/{i}" if multi else str(i)
    for t, token in enumerate(rep.tokens):
        active = rep.top_ids[t] >= 0
        cells = "  ".join(
            f"{name(layer, i)}:{v:.3g}"
            for layer, i, v in zip(
                rep.top_layers[t][active],
                rep.top_ids[t][active],
                rep.top_values[t][active],
                strict=True,
            )
        )
        err = ""
        if rep.error_norm is not None:
            err = f"  |err| {rep.error_norm[t].mean():.3g} (rel {rep.relative_error[t].mean():.3f})"
        print(f"{t:4d} {token!r:>16}{err}  {cells}")
    print(f"\n== latents ranked by total activation (top {top_ranked}) ==")
    for layer, i, total, count in list(
        zip(rep.ranked_layers, rep.ranked_ids, rep.ranked_totals, rep.ranked_counts, strict=True)
    )[:top_ranked]:
        print(f"  latent {name(layer, i):>10}  total {total:10.4g}  on {count} tokens")


def inspect_command(args: argparse.Namespace) -> int:
    """Handler of `inspect`: the prompt's latents and/or a latent's logit lens."""
    from gemmascope_jax.analysis.common import checked_dictionary, dictionary_label
    from gemmascope_jax.analysis.features import top_features
    from gemmascope_jax.analysis.logit_lens import logit_lens
    from gemmascope_jax.formats import load_dictionary

    model, tok = load_model(args.model)
    d = checked_dictionary(model, load_dictionary(args.dictionary))
    if args.latent is not None:
        lens = logit_lens(model, d, args.latent, layer=args.layer, k=args.k, tokenizer=tok)
        print(f"logit lens of latent {args.latent} (layer {lens.layer}), {dictionary_label(d)}")
        for title, toks, vals in (
            ("promoted", lens.promoted_tokens, lens.promoted_values),
            ("suppressed", lens.suppressed_tokens, lens.suppressed_values),
        ):
            print(
                f"  {title}: "
                + "  ".join(f"{t!r} {v:+.3f}" for t, v in zip(toks, vals, strict=True))
            )
        result: Any = lens
    if args.text is not None:
        prompt = json.loads(args.text) if args.chat else args.text
        result = top_features(model, tok, d, prompt, k=args.k, splice=args.splice)
        _print_report(result)
    if args.latent is None and args.text is None:
        raise ValueError("give a prompt text and/or --latent ID")
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0


# ---- steer ------------------------------------------------------------------------------------


def add_steer_parser(subparsers) -> None:
    """`gemmascope-jax steer [--model PATH] --dictionary PATH --feature N ... "prompt"`."""
    p = subparsers.add_parser("steer", help="baseline vs steered completion with latents")
    p.add_argument("prompt", help="the prompt text (a user turn with --chat)")
    add_model_argument(p)
    p.add_argument("--dictionary", required=True, help="dictionary folder (any format)")
    p.add_argument("--feature", type=int, action="append", required=True, help="latent id")
    p.add_argument("--alpha", type=float, default=8.0, help="strength (clamp: the value)")
    p.add_argument("--mode", choices=MODES, default="norm")
    p.add_argument("--source-layer", type=int, default=None, help="multi-layer: model layer")
    p.add_argument("--output-layer", type=int, default=None, help="multi-layer: model layer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat turn")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=steer_command)


def _one_dictionary(loaded, layer: int | None):
    """A loaded dictionary, or the member of a per-layer transcoder set at `layer`."""
    from gemmascope_jax.dictionaries import Dictionary

    if isinstance(loaded, Dictionary):
        return loaded
    members = getattr(loaded, "transcoders", None)
    if members is None:
        raise ValueError(f"cannot steer with a {type(loaded).__name__}")
    if layer is None or not 0 <= layer < len(members):
        raise ValueError(
            f"this is a set of {len(members)} per-layer transcoders: pick one with "
            f"--source-layer 0..{len(members) - 1}"
        )
    return members[layer]


def steer_command(args: argparse.Namespace) -> int:
    """Handler of `steer`: prints the baseline and the steered completion."""
    from gemmascope_jax.analysis.steering import steer
    from gemmascope_jax.formats import load_dictionary

    d = _one_dictionary(load_dictionary(args.dictionary), args.source_layer)
    model, tok = load_model(args.model)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    result = steer(
        model,
        tok,
        d,
        prompt,
        args.feature,
        args.alpha,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        source_layer=args.source_layer,
        output_layer=args.output_layer,
    )
    s = result.settings
    print(f"{s['dictionary']}  latents {s['latents']}  mode {s['mode']}  alpha {s['alpha']}")
    print(f"== baseline ==\n{result.baseline_text}")
    print(f"== steered ==\n{result.steered_text}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0
