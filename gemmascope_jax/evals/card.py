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
  on fixed prompts, unpruned and pruned (`analysis.attribution.graph_quality`, docs/graph_scores.md;
  transcoder sets and CLTs covering every layer, when a tokenizer is given);
- `plots`: `frequency_histogram.png`, `fvu_per_layer.png` (multi-layer kinds),
  `absorption.png`.

This module computes the card and writes its folder; `evals.card_render` turns it into
`card.md` and the plots.

`gemmascope-jax evaluate DICT` (`cli.evaluate`) loads the dictionary and model, tokenises
held-out text (`token_batches`; by default the packaged English prose of `data/heldout/`,
`HELDOUT_PROSE`) and writes the card.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.evals import saebench, saebench_run
from gemmascope_jax.evals.card_render import json_safe, render_markdown, write_plots
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
    from gemmascope_jax.analysis.attribution.replacement import check_transcoders

    try:
        check_transcoders(model.cfg, dictionary)
    except ValueError as e:
        return {"skipped": f"not a replacement model: {e}"}
    from gemmascope_jax.analysis.attribution import graph_quality

    return graph_quality.graph_quality(model, tokenizer, dictionary, graph_quality.DEFAULT_PROMPTS)


def write_card(
    dictionary, model, tokens, out_dir, *, tokenizer=None, force: bool = False, **kwargs
) -> dict[str, Any]:
    """Evaluate and write `card.json`, `card.md` and the plots as the folder `out_dir`; returns
    the card (as written: non-finite numbers become null). kwargs go to `evaluate_card`.

    The folder is written whole or not at all; an existing one is replaced only when an
    earlier card (any output of this package) made it, or with `force`, checked before the
    evaluation runs."""
    from gemmascope_jax.io.files import atomic_output_dir, check_replaceable

    out_dir = Path(out_dir)
    check_replaceable(out_dir, force=force, replace_ours=True)
    card, density = evaluate_card(dictionary, model, tokens, tokenizer=tokenizer, **kwargs)
    with atomic_output_dir(out_dir, force=force, replace_ours=True) as tmp:
        card["plots"] = write_plots(card, density, tmp)
        card = json_safe(card)
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        (tmp / "card.md").write_text(render_markdown(card))
    return card
