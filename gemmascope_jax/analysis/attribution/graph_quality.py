"""Replacement and completeness scores of attribution graphs over a fixed set of prompts.

    report = graph_quality(model, tokenizer, transcoders)     # DEFAULT_PROMPTS
    report["unpruned"]["replacement"]["mean"], report["pruned"]["completeness"]["min"]

Each prompt is tokenized (`tokenizer.encode`, BOS included as the CLI does), its graph built
with `ReplacementModel.build` + `attribution.attribute`, and scored with `graph.graph_scores`
(circuit-tracer's `compute_graph_scores`) as is and after `graph.prune_graph` (docs/
graph_scores.md). Works for per-layer transcoder sets and CLTs alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemmascope_jax.analysis.attribution.attribute import attribute
from gemmascope_jax.analysis.attribution.graph import graph_scores, prune_graph
from gemmascope_jax.analysis.attribution.replacement import ReplacementModel

# Short prompts of the kinds circuit-tracer's demos attribute (facts, multi-hop, antonyms,
# arithmetic, code, multilingual); fixed so scores are comparable between transcoder sets.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Fact: the capital of the state containing Dallas is",
    "Fact: Michael Jordan plays the sport of",
    'The opposite of "small" is "',
    "36 + 59 = 95 and 12 + 30 =",
    "def add(a, b):\n    return a",
    'Le contraire de "petit" est "',
    "The doctor said that the patient",
    "When Mary and John went to the store, John gave a drink to",
)

SCORES = ("replacement", "completeness")


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(arr)), "min": float(np.nanmin(arr))}


def graph_quality(
    model,
    tokenizer,
    transcoders,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int | None = 7500,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int | None = None,
    row_dtype: str = "auto",
) -> dict:
    """Replacement / completeness scores of the attribution graphs of `prompts`.

    model: Gemma 3 (`load_gemma3`); tokenizer: has `encode(text) -> ids` with BOS first (and
    `decode` for token strings); transcoders: a `TranscoderSet` or a CLT covering every
    layer. The attribution arguments are `attribute`'s (defaults as the `attribute` CLI);
    node_threshold / edge_threshold are `prune_graph`'s.

    Returns a JSON-ready dict: "unpruned" and "pruned", each {"replacement": {"mean", "min"},
    "completeness": {"mean", "min"}} over the prompts; "per_prompt": one entry per prompt
    with "prompt", "n_tokens", "n_features" (graph feature nodes), "n_pruned_nodes" (nodes
    kept by pruning) and {"unpruned", "pruned"}: {"replacement", "completeness"}; plus
    "n_prompts", "node_threshold", "edge_threshold", "max_feature_nodes".
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("graph_quality needs at least one prompt")
    per_prompt = []
    for prompt in prompts:
        tokens = np.asarray(tokenizer.encode(prompt)).reshape(-1)
        rep = ReplacementModel.build(model, transcoders, tokens)
        graph = attribute(
            rep,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            row_dtype=row_dtype,
            prompt=prompt,
            tokenizer=tokenizer,
        )
        pruned = prune_graph(graph, node_threshold, edge_threshold)
        unpruned_scores = graph_scores(graph)
        pruned_scores = graph_scores(graph, pruned.node_mask, pruned.edge_mask)
        per_prompt.append(
            {
                "prompt": prompt,
                "n_tokens": int(graph.n_pos),
                "n_features": int(graph.n_features),
                "n_pruned_nodes": int(pruned.node_mask.sum()),
                "unpruned": dict(zip(SCORES, unpruned_scores, strict=True)),
                "pruned": dict(zip(SCORES, pruned_scores, strict=True)),
            }
        )
    out = {
        "n_prompts": len(prompts),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_feature_nodes": max_feature_nodes,
    }
    for which in ("unpruned", "pruned"):
        out[which] = {name: _summary([p[which][name] for p in per_prompt]) for name in SCORES}
    out["per_prompt"] = per_prompt
    return out
