"""Rows of direct effects, kept only over the sources that can reach their target.

Columns are the graph's source nodes in graph order: N features by (layer, position,
latent), L*T errors layer-major, T tokens (logits are never sources). A target at (layer l,
position p) -- a feature's pre-activation at layer l, or a logit (l = L, p = T - 1) -- is
reached only by features and errors of layers < l at positions <= p and by tokens at
positions <= p; its edges from every other source are exactly zero (causal attention, and
a layer's MLP output comes after its MLP input). Those sources are 2l + 1 column ranges --
per source layer a prefix of its feature block and of its error block, then the tokens --
and `RowStore` keeps a row as just those ranges, concatenated. Against circuit-tracer's
dense [R, N + (L+1) T] rows that is about half the memory for targets spread over the
layers, and a quarter when they are also spread over positions; logit rows stay full.

Storage is float32, or float16 scaled by the row's largest magnitude (`dtype="float16"`:
half the memory, each edge within 2^-11 of its row's largest edge), inside a byte budget:
`append` refuses a row that would exceed it, so the store never outgrows the budget.
"""

from __future__ import annotations

import os

import numpy as np

ROW_DTYPES = ("float32", "float16")


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (else free physical pages); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class RowStore:
    """Rows of direct effects on targets, each over its reachable sources only.

    feature_layer, feature_pos [N]: the active features in graph order (sorted by layer,
    then position). `append(node, layer, pos, row)` takes a row over all N + (L+1) T
    source columns; `columns(...)`, `influence(...)` and `adjacency(...)` read them back.
    """

    def __init__(
        self,
        feature_layer: np.ndarray,
        feature_pos: np.ndarray,
        n_layers: int,
        n_pos: int,
        *,
        dtype: str = "float32",
        budget_bytes: int | None = None,
    ):
        if dtype not in ROW_DTYPES:
            raise ValueError(f"row dtype must be one of {ROW_DTYPES}, got {dtype!r}")
        feature_layer, feature_pos = np.asarray(feature_layer), np.asarray(feature_pos)
        key = feature_layer.astype(np.int64) * n_pos + feature_pos
        if key.size and (np.any(np.diff(key) < 0) or feature_layer.max() >= n_layers
                         or feature_pos.max() >= n_pos or key.min() < 0):  # fmt: skip
            raise ValueError("features must be sorted by (layer, position) and in range")
        self.n_layers, self.n_pos, self.n_features = n_layers, n_pos, int(key.size)
        self.feature_pos = feature_pos.astype(np.int64)
        counts = np.bincount(key, minlength=n_layers * n_pos).reshape(n_layers, n_pos)
        self.features_upto = np.cumsum(counts, axis=1)  # [L, T]: features at pos <= p
        self.feature_start = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])  # [L + 1]
        self.error_start = self.n_features
        self.token_start = self.n_features + n_layers * n_pos
        self.n_columns = self.token_start + n_pos
        self.dtype = np.dtype(dtype)
        self.budget_bytes = budget_bytes
        self.rows: list[np.ndarray] = []
        self.nodes: list[int] = []
        self.targets: list[tuple[int, int]] = []
        self.scales: list[float] = []
        self.abs_sums: list[float] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def layout(self, layer: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored column ranges of a target at (layer, pos): (global starts, lengths), [2l+1]."""
        n = min(layer, self.n_layers)
        starts, lengths = np.empty(2 * n + 1, np.int64), np.empty(2 * n + 1, np.int64)
        starts[0 : 2 * n : 2] = self.feature_start[:n]
        lengths[0 : 2 * n : 2] = self.features_upto[:n, pos]
        starts[1 : 2 * n : 2] = self.error_start + np.arange(n) * self.n_pos
        lengths[1 : 2 * n : 2] = pos + 1
        starts[-1], lengths[-1] = self.token_start, pos + 1
        return starts, lengths

    def row_bytes(self, layer: int, pos: int) -> int:
        return int(self.layout(layer, pos)[1].sum()) * self.dtype.itemsize

    def append(self, node: int, layer: int, pos: int, row: np.ndarray) -> bool:
        """Store the reachable part of `row` [>= n_columns] for target `node` at (layer,
        pos); False (nothing stored) when it would exceed the budget."""
        starts, lengths = self.layout(layer, pos)
        size = int(lengths.sum()) * self.dtype.itemsize
        if self.budget_bytes is not None and self.nbytes + size > self.budget_bytes:
            return False
        compact = np.concatenate([row[s : s + k] for s, k in zip(starts, lengths, strict=True)])
        compact = compact.astype(np.float32, copy=False)
        scale = 1.0
        if self.dtype == np.float16:
            scale = float(np.abs(compact).max(initial=0.0)) or 1.0
            compact = (compact / scale).astype(np.float16)
        self.rows.append(compact)
        self.nodes.append(int(node))
        self.targets.append((int(layer), int(pos)))
        self.scales.append(scale)
        self.abs_sums.append(float(np.abs(compact).sum(dtype=np.float64)) * scale)
        self.nbytes += size
        return True

    def _column_keys(self, columns: np.ndarray):
        """Per global column: kind (0 feature, 1 error, 2 token, 3 none), source layer (-1
        for tokens), position, and a feature's rank within its layer's block."""
        columns = np.asarray(columns, np.int64)
        kind = np.full(columns.shape, 3, np.int8)
        layer = np.full(columns.shape, self.n_layers, np.int64)
        pos = np.full(columns.shape, self.n_pos, np.int64)
        rank = np.zeros(columns.shape, np.int64)
        feat = (columns >= 0) & (columns < self.error_start)
        layer[feat] = np.searchsorted(self.feature_start, columns[feat], side="right") - 1
        rank[feat] = columns[feat] - self.feature_start[layer[feat]]
        pos[feat], kind[feat] = self.feature_pos[columns[feat]], 0
        err = (columns >= self.error_start) & (columns < self.token_start)
        layer[err], pos[err] = np.divmod(columns[err] - self.error_start, self.n_pos)
        kind[err] = 1
        tok = (columns >= self.token_start) & (columns < self.n_columns)
        layer[tok], pos[tok], kind[tok] = -1, columns[tok] - self.token_start, 2
        return kind, layer, pos, rank

    def columns(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Stored rows `rows` (indices into the store) over global `columns`: [R, C] float32
        (zero where a column cannot reach the row's target, and for logit columns)."""
        rows = np.asarray(rows, np.int64)
        kind, col_layer, col_pos, rank = self._column_keys(columns)
        safe_layer = np.clip(col_layer, 0, self.n_layers)
        out = np.zeros((len(rows), len(kind)), np.float32)
        targets = np.asarray([self.targets[i] for i in rows], np.int64).reshape(-1, 2)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (layer, pos) in enumerate(targets.tolist()):
            groups.setdefault((layer, pos), []).append(j)
        for (layer, pos), members in groups.items():
            n = min(layer, self.n_layers)
            _, lengths = self.layout(layer, pos)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            feat_base = np.zeros(self.n_layers + 1, np.int64)
            err_base = np.zeros(self.n_layers + 1, np.int64)
            feat_base[:n], err_base[:n] = offsets[0 : 2 * n : 2], offsets[1 : 2 * n : 2]
            local = np.where(
                kind == 0,
                feat_base[safe_layer] + rank,
                np.where(kind == 1, err_base[safe_layer] + col_pos, offsets[-1] + col_pos),
            )
            reach = (kind < 3) & (col_layer < n) & (col_pos <= pos)
            where = np.nonzero(reach)[0]
            for j in members:
                i = rows[j]
                out[j, where] = self.rows[i][local[where]].astype(np.float32) * self.scales[i]
        return out

    def influence(self, logit_probs: np.ndarray) -> np.ndarray:
        """circuit-tracer's `compute_partial_influences` over the stored rows: [n_columns].

        N: |rows| row-normalised, [R, n]; y_0: the logit probabilities on the logit rows
        (node ids >= n_columns; logit j is node n_columns + j). circuit-tracer sums
        p_k = y_{k-1} @ N over k >= 1 with y_k = p_k at the row nodes; here that is
        (Σ_k y_k) @ N with y_{k+1} = y_k @ N[:, row nodes]: a small [R, R] recurrence,
        then a single pass over the stored rows."""
        nodes = np.asarray(self.nodes, np.int64)
        inverse = 1.0 / np.maximum(np.asarray(self.abs_sums, np.float64), 1e-8)
        is_feature = nodes < self.n_columns
        square = np.zeros((len(nodes), len(nodes)), np.float32)
        square[:, is_feature] = np.abs(self.columns(np.arange(len(nodes)), nodes[is_feature]))
        square *= inverse[:, None].astype(np.float32)
        current = np.zeros(len(nodes), np.float64)
        logits = ~is_feature
        current[logits] = np.asarray(logit_probs, np.float64)[nodes[logits] - self.n_columns]
        total = np.zeros_like(current)
        for _ in range(self.n_layers + 3):
            total += current
            current = current @ square
            if not current.any():
                break
        else:
            raise RuntimeError("influence did not converge (rows do not form a DAG)")
        out = np.zeros(self.n_columns, np.float64)
        for i in np.nonzero(total)[0]:
            weight = total[i] * inverse[i] * self.scales[i]
            starts, lengths = self.layout(*self.targets[i])
            magnitude = np.abs(self.rows[i], dtype=np.float32) * np.float32(weight)
            offset = 0
            for s, k in zip(starts.tolist(), lengths.tolist(), strict=True):
                out[s : s + k] += magnitude[offset : offset + k]
                offset += k
        return out.astype(np.float32)
