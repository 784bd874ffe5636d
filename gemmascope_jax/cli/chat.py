"""CLI verbs of the chat-model analyses; each writes a JSON file and PNG plots into `--out`.

    gemmascope-jax refusal --dictionary D [--model M] [--site resid_post.9] --out O [--layer-sweep]
    gemmascope-jax jailbreak --dictionary D [--wrapper roleplay] --out O "prompt"
    gemmascope-jax cot --dictionary D --out O "question" [--response-file R]

The model defaults to the embedded Gemma 3 270M. Files: `refusal.json`, `refusal_projection.png`,
`refusal_aligned.png`, `refusal_rates.png` (with generation), `refusal_sweep.png`
(`--layer-sweep`); `jailbreak.json`, `jailbreak_deltas.png`, `jailbreak_tokens.png`;
`cot.json`, `cot_latents.png`, `cot_tokens.png`. The analyses are library code
(`analysis.chat.refusal.refusal_analysis`, `analysis.chat.jailbreak.compare_jailbreak`,
`analysis.chat.cot.cot_generate` / `cot_from_response`); this module draws their plots.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemmascope_jax.cli._common import add_model_argument, load_model
from gemmascope_jax.gemma3.sites import resolve_site

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _label(row: dict) -> str:
    return f"L{row['layer']}/{row['id']}"


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dictionary", required=True, help="dictionary folder (any format)")
    add_model_argument(p)
    p.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    p.add_argument("--top-k", type=int, default=20, help="latents reported")


def _command(body: Callable[[argparse.Namespace], list[Path]]):
    """Wrap a verb: print what it wrote (bad input raises; `run_verb` reports it)."""

    def handler(args: argparse.Namespace) -> int:
        written = body(args)
        for path in written:
            print(f"wrote {path}")
        return 0

    return handler


def _setup(args: argparse.Namespace, site: str | None = None):
    """Load and check everything (and `site`, when given) before making the output folder."""
    from gemmascope_jax.analysis.common import checked_dictionary
    from gemmascope_jax.formats import load_dictionary

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    d = load_dictionary(args.dictionary)
    model, tok = load_model(args.model)
    checked_dictionary(model, d)
    if site is not None:
        resolve_site(site, model.cfg.num_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return model, tok, d, out


# ---- refusal ---------------------------------------------------------------------------------


def refusal_site(d, num_layers: int) -> str:
    """Default direction site for a dictionary: its input site when that is a residual site,
    else `resid_post` of its first layer (a transcoder at l: `resid_post.l`)."""
    site = resolve_site(d.cfg.input_sites[0], num_layers)
    return site.name if site.kind in RESID_KINDS else f"resid_post.{d.cfg.layers[0]}"


def _refusal(args: argparse.Namespace) -> list[Path]:
    from gemmascope_jax.analysis.chat.refusal import refusal_analysis

    model, tok, d, out = _setup(args, site=args.site)
    site = args.site or refusal_site(d, model.cfg.num_layers)
    report = refusal_analysis(
        model,
        tok,
        d,
        site=site,
        n_prompts=args.n_prompts,
        n_eval=args.n_eval,
        max_new_tokens=args.max_new_tokens,
        k=args.top_k,
    )
    (out / "refusal.json").write_text(report.to_json())
    plt = _pyplot()
    rd, written = report.direction, [out / "refusal.json"]
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = np.arange(len(rd.harmful_projection))
    ax.plot(layers, rd.harmful_projection, "o-", label=f"harmful (n={rd.n_harmful})")
    ax.plot(layers, rd.harmless_projection, "s-", label=f"harmless (n={rd.n_harmless})")
    ax.set(xlabel="layer", ylabel="mean resid_post · r̂", title=f"projection on r̂ ({rd.site})")
    ax.legend()
    written.append(_save(fig, out / "refusal_projection.png"))
    if report.aligned is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, ("top_decoder", "top_encoder"), strict=True):
            rows = getattr(report.aligned, key)
            ax.barh([_label(r) for r in rows][::-1], [r["cosine"] for r in rows][::-1])
            ax.set(xlabel="cosine with r̂", title=key.replace("top_", "") + " vectors")
        written.append(_save(fig, out / "refusal_aligned.png"))
    if report.rates is not None:
        fig, ax = plt.subplots(figsize=(4, 3.5))
        ax.bar(["baseline", "ablated"], [report.rates.baseline_rate, report.rates.ablated_rate])
        ax.set(ylim=(0, 1), ylabel="refusal rate", title="harmful prompts")
        written.append(_save(fig, out / "refusal_rates.png"))
    if args.layer_sweep:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, values, name in zip(
            axes,
            (rd.sweep_norms, rd.sweep_separation, rd.sweep_cosines),
            ("||mean difference||", "separation (gap / pooled std)", f"cosine with {rd.site}"),
            strict=True,
        ):
            ax.plot(layers, values, "o-")
            ax.set(xlabel="layer (resid_post)", title=name)
        written.append(_save(fig, out / "refusal_sweep.png"))
    return written


def add_refusal_parser(subparsers) -> argparse.ArgumentParser:
    """Register `refusal`: direction, per-layer projection, aligned latents, ablation rates."""
    p = subparsers.add_parser(
        "refusal", help="refusal direction, aligned latents and directional ablation"
    )
    _common_args(p)
    p.add_argument("--site", default=None, help="direction site (default: see refusal_site)")
    p.add_argument("--layer-sweep", action="store_true", help="plot every layer's direction")
    p.add_argument("--n-prompts", type=int, default=None, help="first N prompts of each set")
    p.add_argument("--n-eval", type=int, default=8, help="harmful prompts generated (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_command(_refusal))
    return p


# ---- jailbreak -------------------------------------------------------------------------------


def _jailbreak(args: argparse.Namespace) -> list[Path]:
    from gemmascope_jax.analysis.chat.jailbreak import compare_jailbreak

    model, tok, d, out = _setup(args)
    diff = compare_jailbreak(model, tok, d, args.prompt, wrapper=args.wrapper, chat=not args.plain)
    data = diff.to_dict(args.top_k) | {"prompt": args.prompt, "wrapper": args.wrapper}
    (out / "jailbreak.json").write_text(json.dumps(data, indent=2))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.25 * args.top_k + 1)))
    for ax, by in zip(axes, ("shared", "all"), strict=True):
        rows = diff.rows(by, args.top_k)[::-1]
        ax.barh([_label(r) for r in rows], [r[f"delta_{by}"] for r in rows])
        ax.set(xlabel="wrapped - plain (mean activation)", title=f"by {by} tokens")
    written = [out / "jailbreak.json", _save(fig, out / "jailbreak_deltas.png")]
    top = diff.ranked("shared", min(args.top_k, 12))
    wrapped = diff.wrapped_codes[diff.shared_wrapped][:, top]
    delta = wrapped - diff.plain_codes[diff.shared_plain][:, top]
    labels = [_label(r) for r in diff.rows("shared", len(top))]
    tokens = [diff.wrapped_tokens[i] for i in diff.shared_wrapped]
    written.append(_heatmap(delta.T, labels, tokens, "wrapped - plain on shared tokens", out))
    return written


def _heatmap(values, row_labels, tokens, title, out: Path, name="jailbreak_tokens.png", lines=()):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(tokens) + 2), max(3, 0.3 * len(row_labels))))
    limit = float(np.abs(values).max()) or 1.0
    cmap, vmin = ("RdBu_r", -limit) if (values < 0).any() else ("viridis", 0.0)
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=limit)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=70, fontsize=7)
    for x in lines:
        ax.axvline(x - 0.5, color="k", lw=1)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, out / name)


def add_jailbreak_parser(subparsers) -> argparse.ArgumentParser:
    """Register `jailbreak`: latents that change when a prompt is wrapped."""
    from gemmascope_jax.analysis.chat.jailbreak import WRAPPERS

    p = subparsers.add_parser("jailbreak", help="latents that change under a jailbreak wrapper")
    _common_args(p)
    p.add_argument("prompt", help="the request")
    p.add_argument(
        "--wrapper",
        default="roleplay",
        help=f"one of {', '.join(WRAPPERS)}, or a template with {{prompt}}",
    )
    p.add_argument("--plain", action="store_true", help="no chat template")
    p.set_defaults(func=_command(_jailbreak))
    return p


# ---- chain of thought ------------------------------------------------------------------------


def _cot(args: argparse.Namespace) -> list[Path]:
    from gemmascope_jax.analysis.chat.cot import cot_from_response, cot_generate

    model, tok, d, out = _setup(args)
    if args.response_file:
        response = Path(args.response_file).read_text()
        view = cot_from_response(
            model, tok, d, args.question, response, marker=args.marker, k=args.top_k
        )
    else:
        view = cot_generate(
            model,
            tok,
            d,
            args.question,
            max_new_tokens=args.max_new_tokens,
            max_answer_tokens=args.max_answer_tokens,
            marker=args.marker,
            k=args.top_k,
        )
    (out / "cot.json").write_text(view.to_json(args.top_k))
    plt = _pyplot()
    rows = view.rows("answer", args.top_k)[::-1]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(rows) + 1)))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["reasoning_mean"] for r in rows], 0.4, label="reasoning")
    ax.barh(y + 0.2, [r["answer_mean"] for r in rows], 0.4, label="answer")
    ax.set_yticks(y, [_label(r) + (" *" if r["only_after_reasoning"] else "") for r in rows])
    ax.set(xlabel="mean activation", title="top answer latents (* only after reasoning)")
    ax.legend()
    written = [out / "cot.json", _save(fig, out / "cot_latents.png")]
    top = np.array([view.layers.index(r["layer"]) * view.width + r["id"] for r in rows[::-1]])
    start = view.reasoning_span[0]
    values = view.codes[start:, top].T if len(top) else np.zeros((1, len(view.tokens) - start))
    labels = [_label(r) for r in rows[::-1]] or ["(none)"]
    spans = (view.reasoning_span[1] - start, view.answer_span[0] - start)
    written.append(
        _heatmap(
            values,
            labels,
            view.tokens[start:],
            "answer latents over the response (| span edges)",
            out,
            name="cot_tokens.png",
            lines=spans,
        )
    )
    return written


def add_cot_parser(subparsers) -> argparse.ArgumentParser:
    """Register `cot`: latents of the reasoning span vs the answer span."""
    from gemmascope_jax.analysis.chat.cot import DEFAULT_MARKER

    p = subparsers.add_parser("cot", help="chain-of-thought view: reasoning vs answer latents")
    _common_args(p)
    p.add_argument("question", help="the question (a user turn)")
    p.add_argument("--response-file", default=None, help="use this response instead of generating")
    p.add_argument("--marker", default=DEFAULT_MARKER, help="text that starts the answer")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-answer-tokens", type=int, default=16)
    p.set_defaults(func=_command(_cot))
    return p
