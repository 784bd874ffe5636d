"""Quality card of a dictionary: `card.json`, `card.md` and PNG plots (docs/evaluate.md).

    from gemmascope_jax.evals.card import write_card
    card = write_card(dictionary, model, tokens, "out/card", tokenizer=tok)

`dictionary` is anything `formats.load_dictionary` returns (SAE, transcoder, skip-transcoder,
CLT, crosscoder, or a per-layer `TranscoderSet`); `tokens` int [N, T] (BOS first) or a list of
such batches. The card holds:

- `saebench_core`: SAEBench 0.6.0's core metrics under its names and groups (`saebench.py`);
- `gemma_scope`: FVU (per layer for multi-layer kinds), L0, dead and dense fractions, the
  log10 feature-density histogram;
- `absorption`: SAEBench's first-letter absorption, adapted to Gemma 3's vocabulary
  (`absorption.py`; SAEs and crosscoders, when a tokenizer is given);
- `graph_scores`: circuit-tracer's replacement and completeness scores of attribution graphs
  on fixed prompts, unpruned and pruned (`analysis.graph_quality`, docs/graph_scores.md;
  transcoder sets and CLTs covering every layer, when a tokenizer is given);
- `plots`: `frequency_histogram.png`, `fvu_per_layer.png` (multi-layer kinds),
  `absorption.png`.

This module computes the card and writes its folder; `evals.card_render` turns it into
`card.md` and the plots.

`gemmascope-jax evaluate DICT` (`run_evaluate_cli`) loads the dictionary and model, tokenises
held-out text (`--text-file`, the held-out split of a run config's data with `--data`, or by
default the packaged English prose of `data/heldout/`) and writes the card.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.evals import saebench, saebench_run
from gemmascope_jax.evals.card_render import fmt, json_safe, render_markdown, write_plots
from gemmascope_jax.evals.metrics import DENSE_FREQUENCY, log10_frequency_histogram

CARD_VERSION = 1
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH = 4
HELDOUT_PROSE = Path(__file__).resolve().parent.parent / "data" / "heldout" / "english_prose.jsonl"


class EvaluateError(ValueError):
    """Bad input to `evaluate`: reported as `error: ...`, exit status 2."""


# ---- tokens -----------------------------------------------------------------------------------


def token_batches(
    tokenizer, source, n_tokens: int, seq_len=DEFAULT_SEQ_LEN, batch_size=DEFAULT_BATCH
):
    """Packed windows [batch_size, seq_len] (BOS first, documents in order, one pass) until
    `n_tokens` tokens; fewer when the text runs out."""
    from gemmascope_jax.data.packing import PackedTokens

    packed = PackedTokens(
        source, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False, num_epochs=1
    )
    out, total = [], 0
    for batch in packed:
        tokens = np.asarray(batch["tokens"] if isinstance(batch, dict) else batch)
        out.append(tokens)
        total += tokens.size
        if total >= n_tokens:
            break
    if not out:
        raise EvaluateError(f"no tokens in {source!r}")
    return out


def _as_batches(tokens, batch_size=DEFAULT_BATCH) -> list:
    if isinstance(tokens, list | tuple):
        return list(tokens)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]


# ---- the card ---------------------------------------------------------------------------------


def _describe(dictionary) -> dict[str, Any]:
    t = saebench.as_target(dictionary)
    cfg = t.members[0].cfg
    out = {
        "kind": t.kind,
        "architecture": cfg.architecture,
        "width": list(t.widths) if t.kind == saebench.TRANSCODER_SET else cfg.width,
        "layers": [m.cfg.layers[0] for m in t.members]
        if t.kind == saebench.TRANSCODER_SET
        else list(cfg.layers),
        "input_sites": list(t.input_sites),
        "output_sites": list(t.output_sites),
        "d_in": cfg.d_in,
        "d_out": cfg.d_out,
        "model_name": cfg.model_name,
        "l0_target": cfg.l0_target,
    }
    return out


def check_compatible(dictionary, model) -> None:
    """EvaluateError when the dictionary cannot read this model (width, depth)."""
    t = saebench.as_target(dictionary)
    mcfg = model.cfg
    from gemmascope_jax.gemma3.sites import resolve_site

    for m in t.members:
        cfg = m.cfg
        for name in (*cfg.input_sites, *cfg.output_sites):
            site = resolve_site(name, mcfg.num_layers)
            if site.layer is not None and site.layer >= mcfg.num_layers:
                raise EvaluateError(
                    f"the dictionary reads {name}, but the model has {mcfg.num_layers} layers"
                )
        widths = {cfg.d_in, cfg.d_out}
        sites = (*cfg.input_sites, *cfg.output_sites)
        if all(
            s.split(".")[0] in ("resid_post", "resid_mid", "resid_pre", "mlp_in", "mlp_out")
            for s in sites
        ) and widths != {mcfg.hidden_size}:
            raise EvaluateError(
                f"the dictionary has d_in={cfg.d_in}, d_out={cfg.d_out}, but {mcfg.name} has "
                f"hidden size {mcfg.hidden_size}: wrong --model for this dictionary?"
            )


def evaluate_card(
    dictionary,
    model,
    tokens,
    *,
    tokenizer=None,
    absorption: bool = True,
    words_per_letter: int = 24,
    data_description: str = "",
    graph_scores: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """(card dict, feature density [ΣF]) of `dictionary` on `tokens` (see the module doc)."""
    t0 = time.perf_counter()
    check_compatible(dictionary, model)
    batches = _as_batches(tokens)
    core, density = saebench_run.core_metrics(model, dictionary, batches)
    t = saebench.as_target(dictionary)
    counts, edges, dead = log10_frequency_histogram(density)
    recon = core["reconstruction_quality"]
    gs = {
        "fvu": 1.0 - recon["explained_variance"],
        "fvu_per_layer": [1.0 - v for v in recon["explained_variance_per_layer"]],
        "l0": core["sparsity"]["l0"],
        "dead_fraction": float(np.mean(density <= 0)),
        "dense_fraction": float(np.mean(density > DENSE_FREQUENCY)),
        "delta_loss": core["model_performance_preservation"]["ce_loss_with_sae"]
        - core["model_performance_preservation"]["ce_loss_without_sae"],
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist(), "dead": dead},
    }
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "dictionary": _describe(dictionary),
        "model": {
            "name": model.cfg.name,
            "num_layers": model.cfg.num_layers,
            "hidden_size": model.cfg.hidden_size,
            "vocab_size": model.cfg.vocab_size,
        },
        "data": {
            "description": data_description,
            "sequences": int(sum(len(b) for b in batches)),
            "seq_len": int(np.asarray(batches[0]).shape[1]),
            "tokens": int(sum(np.asarray(b).size for b in batches)),
            "ignored_token_ids": list(saebench.SPECIAL_IDS),
        },
        "saebench_core": core,
        "gemma_scope": gs,
    }
    card["absorption"] = _absorption(t, model, tokenizer, absorption, words_per_letter)
    card["graph_scores"] = _graph_scores(dictionary, model, tokenizer, graph_scores)
    card["seconds"] = round(time.perf_counter() - t0, 2)
    return card, density


def _absorption(t, model, tokenizer, enabled: bool, words_per_letter: int) -> dict[str, Any]:
    if not enabled:
        return {"skipped": "disabled"}
    if tokenizer is None:
        return {"skipped": "no tokenizer"}
    if t.kind not in ("sae", "crosscoder"):
        return {
            "skipped": f"{t.kind}: the probe reads the input site, the decoder writes another "
            "site (defined for SAEs and crosscoders)"
        }
    from gemmascope_jax.evals.absorption import first_letter_absorption

    return first_letter_absorption(
        model, tokenizer, t.members[0], words_per_letter=words_per_letter
    )


def _graph_scores(dictionary, model, tokenizer, enabled: bool) -> dict[str, Any]:
    """Replacement / completeness over `graph_quality.DEFAULT_PROMPTS`, or why they were not
    computed (they need transcoders for every layer: a replacement model)."""
    if not enabled:
        return {"skipped": "disabled"}
    if tokenizer is None:
        return {"skipped": "no tokenizer"}
    from gemmascope_jax.analysis.replacement import check_transcoders

    try:
        check_transcoders(model.cfg, dictionary)
    except ValueError as e:
        return {"skipped": f"not a replacement model: {e}"}
    from gemmascope_jax.analysis import graph_quality

    return graph_quality.graph_quality(model, tokenizer, dictionary, graph_quality.DEFAULT_PROMPTS)


def write_card(
    dictionary, model, tokens, out_dir, *, tokenizer=None, force: bool = False, **kwargs
) -> dict[str, Any]:
    """Evaluate and write `card.json`, `card.md` and the plots as the folder `out_dir`; returns
    the card (as written: non-finite numbers become null). kwargs go to `evaluate_card`.

    The folder is written whole or not at all; an existing one is replaced only when an
    earlier card (any output of this package) made it, or with `force`, checked before the
    evaluation runs."""
    from gemmascope_jax.output_folders import atomic_output_dir, check_replaceable

    out_dir = Path(out_dir)
    check_replaceable(out_dir, force=force, replace_ours=True)
    card, density = evaluate_card(dictionary, model, tokens, tokenizer=tokenizer, **kwargs)
    with atomic_output_dir(out_dir, force=force, replace_ours=True) as tmp:
        card["plots"] = write_plots(card, density, tmp)
        card = json_safe(card)
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        (tmp / "card.md").write_text(render_markdown(card))
    return card


# ---- command line -----------------------------------------------------------------------------


def add_evaluate_parser(subparsers) -> None:
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
    p.set_defaults(func=run_evaluate_cli)


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


def _source(args, model, tok):
    from gemmascope_jax.data.sources import JsonlSource, TextFileSource

    if args.text_file:
        return TextFileSource([args.text_file], split="blank_lines"), f"text file {args.text_file}"
    if args.data:
        from gemmascope_jax.data.sources import split_documents
        from gemmascope_jax.training.config import load_config
        from gemmascope_jax.training.trainer import HELDOUT_FRACTION, _documents

        cfg = load_config(args.data, [])
        docs = _documents(cfg, model, tok, progress=False)
        _, held = split_documents(docs, holdout=HELDOUT_FRACTION, seed=cfg.data.seed)
        return held, f"held-out split of {args.data}"
    return JsonlSource(HELDOUT_PROSE), "held-out English prose (data/heldout/english_prose.jsonl)"


def run_evaluate_cli(args) -> int:
    """Handler of `evaluate`; bad input raises (printed by `gemmascope_jax.cli`, exit 2)."""
    from gemmascope_jax.output_folders import check_replaceable

    if args.tokens < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise EvaluateError("--tokens, --batch-size must be >= 1 and --seq-len >= 2")
    out = Path(args.out) if args.out else Path(f"card-{Path(args.dictionary).resolve().name}")
    # before loading anything: write_card checks again before it writes
    check_replaceable(out, force=args.force, replace_ours=True)
    try:
        dictionary = load_any_dictionary(args.dictionary)
    except (ValueError, OSError) as e:
        raise EvaluateError(f"cannot load dictionary {args.dictionary}: {e}") from e
    from gemmascope_jax.gemma3.loading import load_gemma3

    try:
        model, tok = load_gemma3(args.model, progress=False)
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
