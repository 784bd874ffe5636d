"""Build circuit-tracer's attribution graph of a prompt with its nnsight backend (interop venv).

    .venv-interop/bin/python scripts/interop/circuit_tracer_attribution.py \
        MODEL_DIR TRANSCODER_DIR OUT.npz --tokens 2,10,50 [--batch-size N] \
        [--max-feature-nodes N] [--targets 5,17] [--validate-graph-json GRAPH.json] \
        [--token-scale X]

MODEL_DIR is a transformers Gemma 3 checkpoint with its tokenizer (circuit-tracer decodes the
prompt and the logit tokens with it); TRANSCODER_DIR a circuit-tracer transcoder folder
(`config.yaml` + per-layer safetensors, or a CLT), loaded the user's way:
`ReplacementModel.from_pretrained(MODEL_DIR, TRANSCODER_DIR, backend="nnsight")` on the CPU
in float32. The graph is `circuit_tracer.attribute(tokens, model, ...)`; tokens must start
with a special token (BOS) so circuit-tracer prepends nothing.

OUT.npz gets (n = S + (L+1) T + K nodes in circuit-tracer's order):
    adjacency           [n, n] float32 (rows targets, columns sources)
    active_features     [N, 3] int64 (layer, pos, latent)
    activation_values   [N] float32
    selected_features   [S] int64 (indices into active_features)
    logit_tokens        [K] int64
    logit_probabilities [K] float32
    input_tokens        [T] int64
    n_layers            scalar int64
    validated_nodes     scalar int64, with --validate-graph-json: the node count of GRAPH.json
                        parsed by circuit-tracer's frontend schema (`graph_models.Model`)
    scores              [2] float64: `compute_graph_scores(graph)` (replacement, completeness)
    prune_node_mask     [n] bool, prune_edge_mask [n, n] bool: `prune_graph(graph, 0.8, 0.98)`
    pruned_scores       [2]: `compute_graph_scores` of the graph whose adjacency keeps only
                        the masked edges between masked nodes (every other entry 0)
    scaled_*            with --token-scale X: the same three on the graph with its token
                        columns multiplied by X (sqrt(d_model) gives gemmascope-jax's token
                        edges: circuit-tracer contracts with the unscaled embedding row)

This script must not import gemmascope_jax or jax.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders must never touch the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
from circuit_tracer import ReplacementModel, attribute  # noqa: E402


def _ids(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def _with_adjacency(graph, adjacency):
    out = copy.copy(graph)
    out.adjacency_matrix = adjacency
    return out


def _scores(graph, prefix: str) -> dict[str, np.ndarray]:
    """circuit-tracer's scores of `graph` and of its pruned graph (prune_graph's masks)."""
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    node_mask, edge_mask, _ = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    keep = edge_mask & node_mask[:, None] & node_mask[None, :]
    pruned = _with_adjacency(graph, graph.adjacency_matrix * keep)
    return {
        f"{prefix}scores": np.array(compute_graph_scores(graph), np.float64),
        f"{prefix}prune_node_mask": node_mask.numpy(),
        f"{prefix}prune_edge_mask": edge_mask.numpy(),
        f"{prefix}pruned_scores": np.array(compute_graph_scores(pruned), np.float64),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("transcoder_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tokens", required=True, help="comma-separated prompt token ids, BOS first")
    p.add_argument("--targets", default=None, help="comma-separated logit token ids")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--validate-graph-json", type=Path, default=None)
    p.add_argument("--token-scale", type=float, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = ReplacementModel.from_pretrained(
        str(args.model_dir.resolve()),
        str(args.transcoder_dir.resolve()),
        backend="nnsight",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    tokens = torch.tensor(_ids(args.tokens), dtype=torch.long)
    targets = _ids(args.targets)
    graph = attribute(
        tokens,
        model,
        attribution_targets=None if targets is None else torch.tensor(targets),
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    if graph.input_tokens.tolist() != tokens.tolist():
        raise SystemExit(f"circuit-tracer changed the prompt to {graph.input_tokens.tolist()}")
    extra = {}
    if args.validate_graph_json is not None:
        from circuit_tracer.frontend.graph_models import Model

        doc = Model.model_validate_json(args.validate_graph_json.read_text())
        extra["validated_nodes"] = np.int64(len(doc.nodes))
    extra.update(_scores(graph, ""))
    if args.token_scale is not None:
        n_features = len(graph.selected_features)
        start = n_features + len(graph.input_tokens) * graph.cfg.n_layers
        adjacency = graph.adjacency_matrix.clone()
        adjacency[:, start : start + len(graph.input_tokens)] *= args.token_scale
        extra.update(_scores(_with_adjacency(graph, adjacency), "scaled_"))
    np.savez(
        args.out,
        adjacency=graph.adjacency_matrix.float().numpy(),
        active_features=graph.active_features.numpy().astype(np.int64),
        activation_values=graph.activation_values.float().numpy(),
        selected_features=graph.selected_features.numpy().astype(np.int64),
        logit_tokens=np.array([t.vocab_idx for t in graph.logit_targets], np.int64),
        logit_probabilities=graph.logit_probabilities.float().numpy(),
        input_tokens=graph.input_tokens.numpy().astype(np.int64),
        n_layers=np.int64(model.cfg.n_layers),
        **extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
