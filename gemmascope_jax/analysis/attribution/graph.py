"""Attribution graph container, influence-based pruning, and circuit-tracer graph files.

Node order (as circuit-tracer 0.5.0 `Graph`): S selected features (in (layer, pos, latent)
order), L*T error nodes (layer-major), T token nodes, K logit nodes; n = S + (L+1) T + K.
Only feature and logit nodes have incoming edges, so the adjacency is stored by rows:
`adjacency_rows` [S + K, n] holds the rows of the features then the logits (rows = targets,
columns = sources); `dense_adjacency()` rebuilds circuit-tracer's [n, n] matrix.

Pruning (`prune_graph`) is circuit-tracer's: row-normalise |A|, node influence
`w_logit @ (A + A^2 + ...)`, keep nodes up to `node_threshold` of cumulative influence
(tokens and logits always), edge scores `Â * (influence + w_logit)[:, None]` on the pruned
graph kept up to `edge_threshold`, then drop feature/error nodes left without outgoing edges
(and features without incoming ones) until nothing changes. `graph_scores` is
circuit-tracer's `compute_graph_scores` (replacement and completeness), of the whole graph or
of the pruned one (docs/graph_scores.md). `write_graph_files` writes the
`{slug}.json` of `create_graph_files` (metadata, qParams, nodes, links), the
`graph-metadata.json` index the viewer reads, and a PNG of the pruned graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class AttributionGraph:
    """Result of `attribution.attribute` (fields as circuit-tracer's `Graph`).

    tokens [T]; token_strings [T] (decoded tokens); active_features [N, 3] (layer, pos,
    latent) of every active feature with activation_values [N]; selected_features [S]
    (indices into the active features that are graph nodes); adjacency_rows [S + K, n];
    logit_tokens [K] with logit_probabilities [K] and logit_strings [K]; info: how it was
    computed (batch size, row storage dtype, bytes and budget, whether the budget cut it).
    """

    tokens: np.ndarray
    token_strings: list[str]
    prompt: str
    n_layers: int
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    adjacency_rows: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    logit_strings: list[str] | None = None
    scan: str | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def row_nodes(self) -> np.ndarray:
        """Node index of each row of `adjacency_rows`: [S + K]."""
        return np.concatenate(
            [np.arange(self.n_features), np.arange(self.n_nodes - self.n_logits, self.n_nodes)]
        )

    def dense_adjacency(self) -> np.ndarray:
        """circuit-tracer's [n, n] adjacency (rows targets, columns sources)."""
        out = np.zeros((self.n_nodes, self.n_nodes), np.float32)
        out[self.row_nodes] = self.adjacency_rows
        return out

    def node_of_feature(self, layer: int, pos: int, latent: int) -> int:
        """Node index of a selected feature; ValueError when it is not a node."""
        feats = self.active_features[self.selected_features]
        hit = np.nonzero((feats == np.array([layer, pos, latent])).all(axis=1))[0]
        if hit.size == 0:
            raise ValueError(f"feature (layer {layer}, pos {pos}, latent {latent}) is no node")
        return int(hit[0])


def _normalized(rows: np.ndarray, row_mask=None, column_mask=None, edge_mask=None,
                dtype=None) -> np.ndarray:  # fmt: skip
    """|rows| (times the optional 0/1 masks: per row, per column, per edge [R, n]) divided by
    their row sums: one new array (of `dtype` when given, else of rows' dtype)."""
    a = np.abs(rows) if dtype is None else np.abs(rows, dtype=dtype)
    if row_mask is not None:
        a *= row_mask[:, None]
    if column_mask is not None:
        a *= column_mask[None, :]
    if edge_mask is not None:
        a *= edge_mask
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-10)
    return a


def _influence(norm_rows: np.ndarray, row_nodes: np.ndarray, weights: np.ndarray, max_iter=1000):
    """`weights @ (A + A^2 + ...)` for A given by its nonzero rows (a DAG: terminates)."""
    current = weights[row_nodes] @ norm_rows
    influence = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current[row_nodes] @ norm_rows
        influence += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (not a DAG?)")


def partial_influence(rows: np.ndarray, logit_probs: np.ndarray, row_nodes: np.ndarray):
    """Influence of every node from the rows computed so far (circuit-tracer's
    `compute_partial_influences`): rows [R, n] with node indices row_nodes [R]; the last
    len(logit_probs) columns are the logits. `row_store.RowStore.influence` computes the same
    from the compact rows `attribute` keeps."""
    weights = np.zeros(rows.shape[1], np.float32)
    weights[-len(logit_probs) :] = logit_probs
    return _influence(_normalized(rows), row_nodes, weights)


def _find_threshold(scores: np.ndarray, threshold: float, total_size: int | None = None):
    """Score keeping `threshold` of the total (circuit-tracer's `find_threshold`); scores
    may leave out zeros of a larger array of `total_size` entries."""
    ordered = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(ordered, dtype=np.float64) / max(float(ordered.sum()), 1e-30)
    index = int(np.searchsorted(cumulative, threshold))
    size = total_size or len(ordered)
    if index >= len(ordered):
        return 0.0 if size > len(ordered) else float(ordered[-1])
    return float(ordered[min(index, size - 1)])


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """node_mask [n]; edge_mask [S + K, n] (over `adjacency_rows`); cumulative_scores [n]."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative_scores: np.ndarray


def prune_graph(graph: AttributionGraph, node_threshold=0.8, edge_threshold=0.98) -> PruneResult:
    """circuit-tracer's `prune_graph` (module docstring); always keeps tokens and logits."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}")
    n, s, k, t = graph.n_nodes, graph.n_features, graph.n_logits, graph.n_pos
    rows, row_nodes = graph.adjacency_rows, graph.row_nodes
    weights = np.zeros(n, np.float32)
    weights[-k:] = graph.logit_probabilities
    node_influence = _influence(_normalized(rows), row_nodes, weights)
    node_mask = node_influence >= _find_threshold(node_influence, node_threshold)
    node_mask[-k - t :] = True

    # In place where possible: at 2048 tokens and 7,500 features each [S + K, n] array is
    # ~1.4 GB, and the edge threshold is found over the nonzero scores only.
    edge_scores = _normalized(rows, node_mask[row_nodes].astype(np.float32),
                              node_mask.astype(np.float32))  # fmt: skip
    pruned_influence = _influence(edge_scores, row_nodes, weights) + weights
    edge_scores *= pruned_influence[row_nodes][:, None]
    nonzero = edge_scores[edge_scores > 0]
    edge_mask = edge_scores >= _find_threshold(nonzero, edge_threshold, n * n)
    del edge_scores, nonzero

    feature_rows = slice(0, s)
    while True:
        old = node_mask.copy()
        edge_mask &= node_mask[row_nodes][:, None] & node_mask[None, :]
        node_mask[: -k - t] &= edge_mask[:, : -k - t].any(axis=0)
        node_mask[:s] &= edge_mask[feature_rows].any(axis=1)
        if (node_mask == old).all():
            break

    order = np.argsort(-node_influence, kind="stable")
    cumulative = np.cumsum(node_influence[order]) / max(float(node_influence.sum()), 1e-30)
    scores = np.zeros(n, np.float32)
    scores[order] = cumulative
    return PruneResult(node_mask, edge_mask, scores)


def graph_scores(
    graph: AttributionGraph,
    node_mask: np.ndarray | None = None,
    edge_mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """(replacement_score, completeness_score) of a graph: circuit-tracer 0.5.0's
    `compute_graph_scores` (circuit_tracer/graph.py), on our row-stored adjacency.

    With Â = |A| row-normalised (`normalize_matrix`), w the logit probabilities on the logit
    nodes (0 elsewhere) and influence I = w (Â + Â² + ...) (`compute_influence`):

        replacement  = Σ_tokens I / (Σ_tokens I + Σ_errors I)
        completeness = Σ_j (1 - Σ_{e ∈ errors} Â[j, e]) (I_j + w_j) / Σ_j (I_j + w_j)

    Replacement is the share of the token-to-logit influence that flows through features
    rather than error nodes; completeness the influence-weighted share of every node's
    (normalised) input that comes from features or tokens rather than errors. Nodes without
    incoming edges (errors, tokens, pruned nodes) count as fully explained in completeness.

    Pruned scores: pass `prune_graph`'s node_mask [n] and edge_mask ([S + K, n] over
    `adjacency_rows`, or circuit-tracer's dense [n, n]). The scores are then those of
    `compute_graph_scores` on the graph whose adjacency keeps only the edges in edge_mask
    between nodes in node_mask (the graph `create_graph_files` draws), every other entry 0,
    normalised afresh. circuit-tracer has no pruned-score function of its own; this is its
    `compute_graph_scores` applied to its `prune_graph` masks (tests/test_attribution.py
    checks both against circuit-tracer). Replacement is NaN when no token or error node has
    influence.
    """
    n, s, k, t = graph.n_nodes, graph.n_features, graph.n_logits, graph.n_pos
    rows, row_nodes = graph.adjacency_rows, graph.row_nodes
    error_end = s + graph.n_layers * t
    token_end = error_end + t
    row_mask = column_mask = None
    if node_mask is not None:
        node_mask = np.asarray(node_mask, bool)
        if node_mask.shape != (n,):
            raise ValueError(f"node_mask must have shape ({n},), got {node_mask.shape}")
        column_mask = node_mask.astype(np.float32)
        row_mask = column_mask[row_nodes]
    if edge_mask is not None:
        edge_mask = np.asarray(edge_mask, bool)
        if edge_mask.shape == (n, n):
            edge_mask = edge_mask[row_nodes]
        if edge_mask.shape != rows.shape:
            raise ValueError(f"edge_mask must have shape {rows.shape} or {(n, n)}, got "
                             f"{edge_mask.shape}")  # fmt: skip
    norm = _normalized(rows, row_mask, column_mask, edge_mask, dtype=np.float32)
    weights = np.zeros(n, np.float32)
    weights[-k:] = graph.logit_probabilities
    influence = _influence(norm, row_nodes, weights)
    token = float(influence[error_end:token_end].sum(dtype=np.float64))
    error = float(influence[s:error_end].sum(dtype=np.float64))
    replacement = token / (token + error) if token + error > 0 else float("nan")
    non_error = np.ones(n, np.float64)
    non_error[row_nodes] = 1.0 - norm[:, s:error_end].sum(axis=1, dtype=np.float64)
    output = influence.astype(np.float64) + weights
    completeness = float((non_error * output).sum() / output.sum())
    return replacement, completeness


# ---- circuit-tracer graph files ---------------------------------------------------------------


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id, feature, layer, ctx_idx, feature_type, js_id, **extra) -> dict:
    """A node with the field names and order of circuit-tracer's `frontend.graph_models.Node`."""
    return {
        "node_id": node_id,
        "feature": int(feature),
        "layer": str(layer),
        "ctx_idx": int(ctx_idx),
        "feature_type": feature_type,
        "token_prob": float(extra.get("token_prob", 0.0)),
        "is_target_logit": bool(extra.get("is_target_logit", False)),
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": extra.get("clerp", ""),
        "influence": extra.get("influence"),
        "activation": extra.get("activation"),
    }


def graph_nodes(graph: AttributionGraph, node_mask: np.ndarray, scores: np.ndarray) -> dict:
    """`{node index: node dict}` for the kept nodes (circuit-tracer's `create_nodes`)."""
    s, t, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    error_end = s + t * n_layers
    token_end = error_end + t
    logit_strings = graph.logit_strings or [str(int(x)) for x in graph.logit_tokens]
    nodes = {}
    for i in np.nonzero(node_mask)[0].tolist():
        influence = float(scores[i])
        if i < s:
            active = graph.selected_features[i]
            layer, pos, latent = (int(v) for v in graph.active_features[active])
            nodes[i] = _node(f"{layer}_{latent}_{pos}", _cantor(layer, latent), layer, pos,
                             "cross layer transcoder", f"{layer}_{latent}-0", influence=influence,
                             activation=float(graph.activation_values[active]))  # fmt: skip
        elif i < error_end:
            layer, pos = divmod(i - s, t)
            nodes[i] = _node(f"0_{layer}_{pos}", -1, layer, pos, "mlp reconstruction error",
                             f"{layer}_{pos}-0", influence=influence)  # fmt: skip
        elif i < token_end:
            pos = i - error_end
            vocab = int(graph.tokens[pos])
            nodes[i] = _node(f"E_{vocab}_{pos}", pos, "E", pos, "embedding", f"E_{vocab}-{pos}",
                             influence=influence)  # fmt: skip
        else:
            j = i - token_end
            vocab, prob = int(graph.logit_tokens[j]), float(graph.logit_probabilities[j])
            layer = n_layers + 1
            nodes[i] = _node(f"{layer}_{vocab}_{t - 1}", vocab, layer, t - 1, "logit",
                             f"L_{vocab}-{t - 1}", token_prob=prob, is_target_logit=j == 0,
                             clerp=f'Output "{logit_strings[j]}" (p={prob:.3f})')  # fmt: skip
    return nodes


def graph_json(graph: AttributionGraph, slug: str, node_threshold=0.8, edge_threshold=0.98):
    """The `{slug}.json` document of circuit-tracer's `create_graph_files`, as a dict."""
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    nodes = graph_nodes(graph, pruned.node_mask, pruned.cumulative_scores)
    row_nodes = graph.row_nodes
    links = []
    for r, src in zip(*np.nonzero(pruned.edge_mask), strict=True):
        dst = int(row_nodes[r])
        if int(src) in nodes and dst in nodes:
            weight = float(graph.adjacency_rows[r, src])
            links.append(
                {
                    "source": nodes[int(src)]["node_id"],
                    "target": nodes[dst]["node_id"],
                    "weight": weight,
                }  # fmt: skip
            )
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [
        node
        for node in nodes.values()
        if node["node_id"] in connected or node["feature_type"] in ("embedding", "logit")
    ]
    metadata = {
        "slug": slug,
        "scan": graph.scan or "gemmascope-jax",
        "transcoder_list": [],
        "prompt_tokens": list(graph.token_strings),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(
    graph: AttributionGraph,
    out_dir: str | os.PathLike,
    slug: str = "graph",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    png: bool = True,
) -> dict[str, Path]:
    """Write `{slug}.json`, update `graph-metadata.json` and draw `{slug}.png` in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = graph_json(graph, slug, node_threshold, edge_threshold)
    paths = {"json": out / f"{slug}.json", "metadata": out / "graph-metadata.json"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(paths["json"])
    index = {"graphs": []}
    if paths["metadata"].exists():
        index = json.loads(paths["metadata"].read_text())
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug]
    index["graphs"].append(doc["metadata"])
    paths["metadata"].write_text(json.dumps(index, indent=2))
    if png:
        paths["png"] = out / f"{slug}.png"
        render_png(doc, paths["png"], graph.n_layers)
    return paths


def render_png(doc: dict, path: str | os.PathLike, n_layers: int) -> None:
    """Draw a graph document: x = token position, y = layer (embeddings at the bottom,
    logits on top); links blue (positive) / red (negative), width by |weight|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_of = {"E": -1, str(n_layers + 1): n_layers}
    nodes = doc["nodes"]
    at = {}
    by_cell: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        y = y_of.get(node["layer"])
        y = int(node["layer"]) if y is None else y
        by_cell.setdefault((node["ctx_idx"], y), []).append(node["node_id"])
    n_pos = len(doc["metadata"]["prompt_tokens"])
    for (x, y), ids in by_cell.items():
        for j, node_id in enumerate(ids):
            at[node_id] = (x + (j - (len(ids) - 1) / 2) * 0.8 / max(len(ids), 1), y)
    logits = [node for node in nodes if node["feature_type"] == "logit"]
    spread = np.linspace(0, n_pos - 1, len(logits)) if len(logits) > 1 else [n_pos - 1]
    for node, x in zip(logits, spread, strict=True):  # a row of their own, labels readable
        at[node["node_id"]] = (float(x), n_layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * n_pos + 2), max(4, 0.35 * n_layers + 2)))
    weights = [abs(link["weight"]) for link in doc["links"]] or [1.0]
    top = max(weights)
    for link in doc["links"]:
        (x0, y0), (x1, y1) = at[link["source"]], at[link["target"]]
        color = "tab:blue" if link["weight"] > 0 else "tab:red"
        strength = abs(link["weight"]) / top
        width, alpha = 0.2 + 2.5 * strength, 0.1 + 0.6 * strength
        ax.plot([x0, x1], [y0, y1], color=color, alpha=alpha, lw=width)
    style = {
        "cross layer transcoder": ("o", "tab:green"),
        "mlp reconstruction error": ("s", "tab:gray"),
        "embedding": ("^", "black"),
        "logit": ("D", "tab:orange"),
    }
    for node in nodes:
        marker, color = style[node["feature_type"]]
        x, y = at[node["node_id"]]
        ax.scatter([x], [y], marker=marker, color=color, s=25, zorder=3)
        if node["feature_type"] == "logit":
            label = node["clerp"].removeprefix("Output ")
            ax.annotate(label, (x, y), xytext=(0, 6), textcoords="offset points", fontsize=7,
                        rotation=35, ha="left", va="bottom")  # fmt: skip
    ax.set_xticks(range(n_pos))
    ax.set_xticklabels(doc["metadata"]["prompt_tokens"], rotation=60, fontsize=7)
    ax.set_ylim(-1.5, n_layers + 2.0)
    ax.set_yticks(range(-1, n_layers + 1))
    ax.set_yticklabels(["emb"] + [str(i) for i in range(n_layers)] + ["logit"], fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    prompt = doc["metadata"]["prompt"]
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    ax.set_title(f"{prompt!r}: {len(nodes)} nodes, {len(doc['links'])} links", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
