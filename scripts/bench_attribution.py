"""Time and peak memory of an attribution graph on the real Gemma 3 270M (issue 7).

    .venv/bin/python scripts/bench_attribution.py [--lengths 64 256 1024 2048] [--width 4096]
        [--active-per-token 30] [--max-feature-nodes 7500] [--batch-size N] [--row-dtype auto]
        [--row-memory-gb G] [--out r.json]

Each prompt length runs in a fresh subprocess (`--child T`), so the peak resident memory of
one graph is the child's high-water mark: the parent reads `getrusage(RUSAGE_CHILDREN)`
after each child (a running maximum over the children so far; lengths run in increasing
order) and the child reports its own `RUSAGE_SELF` too. A child:

1. loads the embedded 270M (float32; 18 layers, d_model 640) and its tokenizer;
2. builds a random skip-transcoder set, `--width` latents per layer, whose JumpReLU
   thresholds are each latent's (1 - k / width) quantile of its pre-activation on a
   calibration sequence of corpus text (positions after BOS), so about k = --active-per-token
   latents fire per token and layer, as in trained transcoders;
3. takes the first T tokens (BOS included) of other corpus text as the prompt and times
   `ReplacementModel.build`, `attribute(max_feature_nodes=..., batch_size=...)` (compilation
   included) and `write_graph_files` (pruning + JSON, no PNG).

`--max-feature-nodes` defaults to circuit-tracer's CLI default (7500); `--batch-size`,
`--row-dtype` and `--row-memory-gb` default to `attribute`'s own choices (by prompt length
and available memory). Each row also reports the row store: its dtype, bytes, budget, and
the bytes circuit-tracer's dense float32 rows would take for the same rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _corpus_tokens(tok, n: int, skip_docs: int) -> np.ndarray:
    """The first n tokens (BOS first) of the embedded corpus from document `skip_docs` on."""
    from gemmascope_jax.data.corpus import embedded_corpus

    source, ids, i = embedded_corpus(), [], skip_docs
    while len(ids) < n:
        doc = source[i % len(source)]
        ids += tok.encode(doc if isinstance(doc, str) else doc.text, add_bos=False)
        i += 1
    return np.asarray([tok.bos_id, *ids[: n - 1]], np.int32)


def calibrated_transcoders(model, tok, width: int, active_per_token: float, seed: int = 0):
    """Random skip transcoders on every layer with quantile-calibrated JumpReLU thresholds."""
    import jax.numpy as jnp

    from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    cfg = model.cfg
    n, d = cfg.num_layers, cfg.hidden_size
    calib = _corpus_tokens(tok, 512, skip_docs=200)
    sites = [f"mlp_in.{i}" for i in range(n)]
    out = model.jitted(capture=sites, logits=False)(jnp.asarray(calib)[None])
    quantile = 1.0 - active_per_token / width
    shape = dict(kind="skip_transcoder", architecture="jumprelu", d_in=d, d_out=d, width=width)
    members = []
    for layer in range(n):
        dcfg = DictionaryConfig(**shape, layers=(layer,), model_num_layers=n)
        member = random_dictionary(dcfg, seed=seed + layer)
        arrays = {k: np.asarray(v) for k, v in member.arrays().items()}
        x = np.asarray(out.sites[f"mlp_in.{layer}"][0, 1:], np.float32)
        pre = (x - arrays["b_pre"]) @ arrays["w_enc"] + arrays["b_enc"]
        arrays["threshold"] = np.maximum(np.quantile(pre, quantile, axis=0), 1e-3)
        members.append(type(member).from_arrays(dcfg, arrays))
    return TranscoderSet.from_transcoders(members, metadata={"scan": "bench-random"})


def child(args) -> dict:
    from gemmascope_jax.analysis.attribution.attribute import ReplacementModel, attribute
    from gemmascope_jax.analysis.attribution.graph import write_graph_files
    from gemmascope_jax.gemma3.loading import load_gemma3

    t0 = time.perf_counter()
    model, tok = load_gemma3(progress=False)
    transcoders = calibrated_transcoders(model, tok, args.width, args.active_per_token)
    tokens = _corpus_tokens(tok, args.child, skip_docs=0)
    t1 = time.perf_counter()
    rep = ReplacementModel.build(model, transcoders, tokens)
    t2 = time.perf_counter()
    graph = attribute(rep, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes,
                      row_dtype=args.row_dtype, row_memory_gb=args.row_memory_gb)  # fmt: skip
    t3 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_graph_files(graph, tmp, slug="bench", png=False)
    t4 = time.perf_counter()
    n_active = len(graph.active_features)
    return {
        "tokens": int(len(tokens)),
        "active_features": n_active,
        "active_per_token_per_layer": n_active / (len(tokens) - 1) / rep.num_layers,
        "feature_nodes": graph.n_features,
        "logit_nodes": graph.n_logits,
        "rows": graph.n_features + graph.n_logits,
        "columns": graph.adjacency_rows.shape[1],
        "setup_s": round(t1 - t0, 1),
        "build_s": round(t2 - t1, 1),
        "attribute_s": round(t3 - t2, 1),
        "prune_json_s": round(t4 - t3, 1),
        "batch_size": graph.info["batch_size"],
        "row_dtype": graph.info["row_dtype"],
        "row_gib": graph.info["row_bytes"] / 2**30,
        "row_budget_gib": (graph.info["row_budget_bytes"] or 0) / 2**30,
        "dense_f32_row_gib": graph.info["dense_row_bytes"] / 2**30,
        "truncated_by_budget": graph.info["truncated_by_budget"],
        "self_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--active-per-token", type=float, default=30.0)
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--row-dtype", default="auto", choices=["auto", "float32", "float16"])
    p.add_argument("--row-memory-gb", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    results = []
    for length in sorted(args.lengths):
        cmd = [sys.executable, __file__, "--child", str(length), "--width", str(args.width),
               "--active-per-token", str(args.active_per_token), "--max-feature-nodes",
               str(args.max_feature_nodes), "--row-dtype", args.row_dtype]  # fmt: skip
        for flag, value in (("--batch-size", args.batch_size),
                            ("--row-memory-gb", args.row_memory_gb)):  # fmt: skip
            cmd += [] if value is None else [flag, str(value)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"T={length}: child failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - start, 1)
        row["children_peak_rss_gib"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        )
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
