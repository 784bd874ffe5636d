"""`gemmascope-jax evaluate DICT`: the quality card of a dictionary (docs/evaluate.md).

    gemmascope-jax evaluate runs/demo/export/resid_post_9_matryoshka/native --tokens 4096

Loads the dictionary (any format, or a folder of per-layer transcoder folders) and the model,
tokenises held-out text (`--text-file`, the held-out split of a run config's data with
`--data`, or by default the packaged English prose of `data/heldout/`) and writes the card.
The library behind it: `evals.card` (`token_batches`, `check_compatible`, `write_card`).
`--data` rebuilds the split as a training run does (`training.trainer`), which is why this
lives on the CLI floor rather than in `evals`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gemmascope_jax.cli._common import load_model
from gemmascope_jax.evals.card import (
    DEFAULT_BATCH,
    DEFAULT_SEQ_LEN,
    DEFAULT_TOKENS,
    HELDOUT_PROSE,
    EvaluateError,
)


def add_evaluate_parser(subparsers) -> None:
    """Register `evaluate`."""
    p = subparsers.add_parser(
        "evaluate", help="quality card of a dictionary: SAEBench core metrics, absorption, plots"
    )
    p.add_argument(
        "dictionary", help="dictionary folder (native, Gemma Scope 2, SAELens, circuit-tracer)"
    )
    p.add_argument("--model", default=None, help="HF dir, hub id or .gguf (default: embedded 270M)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--text-file", default=None, help="plain text (documents split at blank lines)"
    )
    src.add_argument("--data", default=None, help="run config YAML: its held-out documents")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens to evaluate on")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="sequences per forward")
    p.add_argument("--out", default=None, help="card folder (default: ./card-NAME of DICT)")
    p.add_argument("--force", action="store_true", help="replace an --out folder we did not make")
    p.add_argument("--no-absorption", action="store_true", help="skip the absorption task")
    p.add_argument(
        "--no-graph-scores",
        action="store_true",
        help="skip the attribution-graph scores (transcoder sets and CLTs)",
    )
    p.add_argument("--json", action="store_true", help="last line: the card as JSON")
    p.set_defaults(func=evaluate_command)


def load_any_dictionary(path):
    """`load_dictionary`, or a transcoder set from a folder of per-layer folders."""
    from gemmascope_jax.formats import FormatError, load_dictionary, load_transcoder_set

    path = Path(path)
    try:
        return load_dictionary(path)
    except FormatError:
        if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
            try:
                return load_transcoder_set(path)
            except (FormatError, ValueError):
                pass
        raise


def heldout_documents(config_path, model, tok):
    """The held-out split of a run config's documents, as its training run splits them."""
    from gemmascope_jax.data.pipeline import split_run_documents
    from gemmascope_jax.training.config import load_config

    cfg = load_config(config_path, [])
    return split_run_documents(cfg, model, tok, progress=False)[1]


def _source(args, model, tok):
    from gemmascope_jax.data.sources import JsonlSource, TextFileSource

    if args.text_file:
        return TextFileSource([args.text_file], split="blank_lines"), f"text file {args.text_file}"
    if args.data:
        return heldout_documents(args.data, model, tok), f"held-out split of {args.data}"
    return JsonlSource(HELDOUT_PROSE), "held-out English prose (data/heldout/english_prose.jsonl)"


def evaluate_command(args: argparse.Namespace) -> int:
    """Handler of `evaluate`; bad input raises (printed by `run_verb`, exit 2)."""
    from gemmascope_jax.evals.card import check_compatible, token_batches, write_card
    from gemmascope_jax.evals.card_render import fmt
    from gemmascope_jax.io.files import check_replaceable

    if args.tokens < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise EvaluateError("--tokens, --batch-size must be >= 1 and --seq-len >= 2")
    out = Path(args.out) if args.out else Path(f"card-{Path(args.dictionary).resolve().name}")
    # before loading anything: write_card checks again before it writes
    check_replaceable(out, force=args.force, replace_ours=True)
    try:
        dictionary = load_any_dictionary(args.dictionary)
    except (ValueError, OSError) as e:
        raise EvaluateError(f"cannot load dictionary {args.dictionary}: {e}") from e
    try:
        model, tok = load_model(args.model)
    except Exception as e:  # noqa: BLE001 - any failure to load is a bad --model
        raise EvaluateError(
            f"cannot load model {args.model or 'embedded'}: {type(e).__name__}: {e}"
        ) from e
    check_compatible(dictionary, model)
    source, what = _source(args, model, tok)
    tokens = token_batches(tok, source, args.tokens, args.seq_len, args.batch_size)
    card = write_card(
        dictionary,
        model,
        tokens,
        out,
        tokenizer=tok,
        absorption=not args.no_absorption,
        graph_scores=not args.no_graph_scores,
        data_description=what,
        force=args.force,
    )
    core = card["saebench_core"]
    print(
        f"{card['dictionary']['kind']}: explained_variance "
        f"{fmt(core['reconstruction_quality']['explained_variance'])}, ce_loss_score "
        f"{fmt(core['model_performance_preservation']['ce_loss_score'])}, kl_div_score "
        f"{fmt(core['model_behavior_preservation']['kl_div_score'])}, l0 "
        f"{fmt(core['sparsity']['l0'])} on {card['data']['tokens']} tokens"
    )
    print(f"card: {out / 'card.md'}")
    if args.json:
        print(json.dumps(card))
    return 0
