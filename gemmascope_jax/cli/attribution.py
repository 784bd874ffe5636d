"""`gemmascope-jax attribute`: the attribution graph of a prompt, written as circuit-tracer
graph files (JSON for the viewer / Neuronpedia) and a PNG.

The library behind it (`analysis.attribution`): `replacement.ReplacementModel`,
`attribute.attribute` and `graph.write_graph_files`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmascope_jax.cli._common import load_model


def add_attribute_parser(subparsers) -> argparse.ArgumentParser:
    """Register `attribute` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "attribute",
        help="attribution graph of a prompt (circuit-tracer JSON + PNG)",
        description="Build the attribution graph of a prompt with a transcoder set or CLT and "
        "write {slug}.json (circuit-tracer / Neuronpedia schema), graph-metadata.json and a PNG.",
    )
    p.add_argument("prompt", help="prompt text (BOS is prepended)")
    p.add_argument("--transcoders", required=True, help="transcoder set / CLT folder")
    p.add_argument("--model", default=None, help="Gemma 3 checkpoint (default: embedded 270M)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slug", default="graph")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        default=7500,
        help="feature rows to compute, most influential first (circuit-tracer's default 7500)",
    )
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="targets per backward pass (default: by prompt length, gradient buffers ~4 GiB)",
    )
    p.add_argument(
        "--row-dtype",
        choices=["auto", "float32", "float16"],
        default="auto",
        help="storage of the edge rows (auto: float32 when it surely fits, else row-scaled "
        "float16)",
    )
    p.add_argument(
        "--row-memory-gb",
        type=float,
        default=None,
        help="memory budget of the edge rows (default: 80%% of the available memory less the "
        "batch buffers); when full, the graph keeps the features visited so far",
    )
    p.set_defaults(func=attribute_command)
    return p


def attribute_command(args: argparse.Namespace) -> int:
    """Handler of `attribute`; prints the written paths, errors to stderr."""
    from gemmascope_jax.analysis.attribution.attribute import attribute
    from gemmascope_jax.analysis.attribution.graph import write_graph_files
    from gemmascope_jax.analysis.attribution.replacement import ReplacementModel
    from gemmascope_jax.dictionaries.sets import TranscoderSet
    from gemmascope_jax.formats.sets import load_transcoder_set

    transcoders = load_transcoder_set(args.transcoders)
    model, tok = load_model(args.model)
    tokens = tok.encode(args.prompt)
    rep = ReplacementModel.build(model, transcoders, tokens)
    scan = (
        getattr(transcoders, "metadata", {}).get("scan")
        if isinstance(transcoders, TranscoderSet)
        else None
    )
    graph = attribute(
        rep,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        row_dtype=args.row_dtype,
        row_memory_gb=args.row_memory_gb,
        prompt=args.prompt,
        tokenizer=tok,
        scan=scan or Path(args.transcoders).name,
    )
    paths = write_graph_files(graph, args.out, args.slug, args.node_threshold, args.edge_threshold)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
