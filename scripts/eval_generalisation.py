"""Generalisation of a run's dictionaries: FVU, L0, dense latents and spliced delta loss on the
held-out sources, on the training sources and on text from outside the corpus (issue 13).

    python scripts/eval_generalisation.py runs/demo [--tokens 8192] \
        [--extra prose=gemmascope_jax/data/heldout/english_prose.jsonl] [--json out.json]

Reads the run's `config.yaml` and its native exports (`export/<name>/native`: normalisation
folded in, raw activations), and evaluates every dictionary with the trainer's own held-out
evaluation (`evals.heldout.HeldoutEval`: the same packing, BOS masking, metrics and splice) on:

- `heldout sources`: the corpus's held-out split (whole sources training never sees), and
  each held-out kind of text on its own (wikipedia.en, chat, kjv, code);
- `training sources`: documents of the training split, packed with another seed than
  training's (the demo trains on ~82k tokens of ~560k, so most are unseen documents of
  seen sources);
- `pydoc`: the narrow corpus (the old default);
- every `--extra NAME=PATH` (any path `open_source` reads: jsonl with a "text" field, txt).

Prints a markdown table (and writes JSON with --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from gemmascope_jax.data.corpus import embedded_corpus, open_source, source_kind
from gemmascope_jax.data.pipeline import split_run_documents
from gemmascope_jax.data.sources import SubsetSource, source_labels
from gemmascope_jax.evals.heldout import HeldoutEval
from gemmascope_jax.formats import load_dictionary
from gemmascope_jax.gemma3.loading import load_gemma3
from gemmascope_jax.training.config import load_config

KEYS = ("fvu", "l0", "dense_fraction", "delta_loss", "kl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (config.yaml, export/)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per evaluation set")
    p.add_argument("--extra", action="append", default=[], help="NAME=PATH, more text")
    p.add_argument("--no-splice", action="store_true", help="FVU/L0 only (faster)")
    p.add_argument("--only", action="append", default=[], help="evaluate only these sets")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    cfg = load_config(args.run / "config.yaml")
    cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, heldout_tokens=args.tokens, splice=not args.no_splice),
    )
    source = None if cfg.model.source == "embedded" else cfg.model.source
    model, tok = load_gemma3(source, dtype=cfg.model.dtype, progress=False)
    dicts = {}
    for spec in cfg.dictionaries:
        path = args.run / cfg.export.dir / spec.name / "native"
        dicts[spec.name] = load_dictionary(path)
    sites = sorted({s for d in dicts.values() for s in (*d.cfg.input_sites, *d.cfg.output_sites)})

    train, heldout = split_run_documents(cfg, model, tok, progress=False)
    sets = {"heldout sources": heldout, "training sources": train}
    labels = source_labels(heldout)
    if labels is not None:
        kinds = sorted({source_kind(x) for x in labels if x})
        for kind in kinds:
            idx = [i for i, x in enumerate(labels) if x and source_kind(x) == kind]
            sets[f"heldout: {kind}"] = SubsetSource(heldout, idx)
    sets["pydoc (narrow corpus)"] = embedded_corpus("pydoc")
    for item in args.extra:
        name, _, path = item.partition("=")
        sets[name] = open_source(path)

    if args.only:
        sets = {k: v for k, v in sets.items() if k in args.only}
    results = {}
    for set_name, set_docs in sets.items():
        t0 = time.perf_counter()
        evals = HeldoutEval(cfg, model, tok, sites, set_docs)(dicts)
        results[set_name] = {
            name: {k: float(v) for k, v in m.items() if k in KEYS and np.ndim(v) == 0}
            for name, m in evals.items()
        }
        print(f"{set_name}: {len(set_docs)} documents, {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)  # fmt: skip

    names = list(dicts)
    head = "| text | " + " | ".join(f"{n} FVU | {n} L0" for n in names) + " |"
    print(head)
    print("|---" * (1 + 2 * len(names)) + "|")
    for set_name, r in results.items():
        cells = [f"{r[n]['fvu']:.3f} | {r[n]['l0']:.1f}" for n in names]
        print(f"| {set_name} | " + " | ".join(cells) + " |")
    if not args.no_splice:
        print()
        print("| text | " + " | ".join(f"{n} delta loss | {n} KL" for n in names) + " |")
        print("|---" * (1 + 2 * len(names)) + "|")
        for set_name, r in results.items():
            cells = [
                f"{r[n].get('delta_loss', float('nan')):.3f} | {r[n].get('kl', float('nan')):.3f}"
                for n in names
            ]
            print(f"| {set_name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
