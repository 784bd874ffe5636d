"""`gemmascope-jax dashboard --dictionary D --out O`: scan a corpus, write the HTML dashboard.

    gemmascope-jax dashboard --dictionary runs/demo/export/resid_post_9_matryoshka/native \\
        --max-tokens 16384 --out runs/demo/dashboard

The library behind it: `analysis.max_examples` (`corpus_batches`, `scan_corpus`) and
`analysis.dashboard.build_dashboard`, whose module doc describes the site.
"""

from __future__ import annotations

import argparse

from gemmascope_jax.analysis.dashboard import DEFAULT_PAGES
from gemmascope_jax.cli._common import add_model_argument, load_model


def add_dashboard_parser(subparsers) -> None:
    """Register `dashboard`."""
    p = subparsers.add_parser(
        "dashboard", help="static HTML feature dashboard (max examples, density, logit lens)"
    )
    p.add_argument("--dictionary", required=True, help="dictionary folder (any format)")
    p.add_argument("--corpus", default="embedded", help="'embedded' or text/jsonl/parquet path")
    add_model_argument(p)
    p.add_argument(
        "--latents",
        default=None,
        help=f"number of pages (default {DEFAULT_PAGES}) or a comma list of ids (L9/123 for CLTs)",
    )
    p.add_argument("--max-tokens", type=int, default=65536, help="corpus tokens to scan")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-n", type=int, default=20, help="examples per latent")
    p.add_argument("--left", type=int, default=12, help="context tokens before an example")
    p.add_argument("--right", type=int, default=4, help="context tokens after an example")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or an earlier dashboard (replaced); anything else "
        "only with --force",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out that is not a dashboard"
    )
    p.add_argument(
        "--card",
        default=None,
        help="the dictionary's quality card folder (`evaluate`, or a run's report/cards/NAME): "
        "copied in and linked from the index",
    )
    p.set_defaults(func=dashboard_command)


def _parse_latents(value: str | None) -> int | list[str] | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else [v for v in value.split(",") if v.strip()]


def dashboard_command(args: argparse.Namespace) -> int:
    """Handler of `dashboard`: checks `--out` and `--card` before loading or scanning."""
    import importlib.util
    import time

    from gemmascope_jax.analysis.common import checked_dictionary
    from gemmascope_jax.analysis.dashboard import build_dashboard, check_card
    from gemmascope_jax.analysis.max_examples import corpus_batches, scan_corpus
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.io.files import check_replaceable

    t0 = time.perf_counter()
    check_replaceable(args.out, force=args.force, replace_ours=True)  # before the scan
    if args.card is not None:
        check_card(args.card)  # a bad card fails before the scan too
    if importlib.util.find_spec("matplotlib") is None:
        raise FileNotFoundError(
            "the dashboard draws its histograms with matplotlib, which is not installed: "
            "pip install matplotlib (or pip install 'gemmascope-jax[demo]')"
        )
    model, tok = load_model(args.model)
    d = checked_dictionary(model, load_dictionary(args.dictionary))
    latents = _parse_latents(args.latents)
    batches = corpus_batches(
        args.corpus,
        tok,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
    )
    total = (
        None if args.max_tokens is None else -(-args.max_tokens // (args.seq_len * args.batch_size))
    )
    ex = scan_corpus(
        model,
        d,
        batches,
        top_n=args.top_n,
        left=args.left,
        right=args.right,
        tokenizer=tok,
        total_batches=total,
    )
    index = build_dashboard(
        model, tok, d, ex, args.out, latents=latents, force=args.force, card=args.card
    )
    print(f"scanned {ex.n_tokens} tokens in {time.perf_counter() - t0:.1f}s")
    print(f"dashboard: {index.resolve()}")
    return 0
