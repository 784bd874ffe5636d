"""Attribution graphs: direct effects between transcoder features, errors, tokens and logits.

    rep = ReplacementModel.build(model, transcoders, tokens)   # replacement.py
    graph = attribute(rep, batch_size=32, max_feature_nodes=7500)
    write_graph_files(graph, "out/", slug="demo")            # graph.py: JSON + PNG

Edges `A[t, s]` (rows: targets, columns: sources) are the direct effects in the frozen
replacement model, activation included: `A[t, s] = a_s * <d(target)/d(source input), source
vector>` by one reverse-mode pass per target (`jax.vjp` of the frozen linear forward,
`jax.vmap` over a batch of targets). A feature's target is its pre-activation
`w_enc[:, i] . mlp_in.l[p]`; a logit's is the demeaned logit `(W_U[tok] - mean_v W_U[v]) .
final_norm[T-1]`. So each row sums, over all sources, to the target's value minus its
constant part (biases, zeroed positions); the test suite checks that identity. Token edges
use the embedding the model adds (the row times sqrt(d_model)); circuit-tracer 0.5.0
contracts the same gradient with the unscaled embedding row, so its token edges are ours
divided by sqrt(d_model) (every other edge agrees; tests/test_attribution.py).

Memory: the computed rows over all N active features (the influence ranking needs every
column), each kept only over the sources that can reach its target, in float32 or
row-scaled float16, within a byte budget (`row_store.RowStore`: about half to a quarter of
circuit-tracer's dense [max_feature_nodes + K, N + (L+1) T] float32 rows), plus about five
gradient buffers [batch_size, L, T, d] per batch (`auto_batch_size` keeps them near 4 GiB).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.analysis.attribution.graph import AttributionGraph
from gemmascope_jax.analysis.attribution.replacement import (
    ReplacementModel,
    intervene,
    linear_forward,
)
from gemmascope_jax.analysis.attribution.row_store import (
    ROW_DTYPES,
    RowStore,
    available_memory_bytes,
)

__all__ = ["ReplacementModel", "attribute", "auto_batch_size", "intervene", "select_logits"]

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=6)
def _target_grads(state, embed, mlp_add, t_layer, t_pos, vectors, num_kv):
    """Gradients of B targets w.r.t. the frozen model's inputs.

    t_layer [B] (L means the final-norm output, i.e. a logit), t_pos [B], vectors [B, d]
    (encoder column or demeaned unembedding) -> (d/d embed [B, T, d], d/d mlp_add [B, L, T, d]).
    """
    n = mlp_add.shape[0]
    _, vjp = jax.vjp(lambda e, m: linear_forward(state, e, m, num_kv), embed, mlp_add)

    def one(layer, pos, vec):
        is_logit = (layer >= n).astype(vec.dtype)
        ct_in = jnp.zeros_like(mlp_add).at[jnp.minimum(layer, n - 1), pos].set(vec * (1 - is_logit))
        ct_final = jnp.zeros_like(embed).at[pos].set(vec * is_logit)
        return vjp((ct_in, ct_final))

    return jax.vmap(one)(t_layer, t_pos, vectors)


@jax.jit
def _token_error_edges(g_embed, g_mlp, embed, errors):
    """[B, T] token edges and [B, L*T] error edges (layer-major)."""
    tok = jnp.einsum("btd,td->bt", g_embed, embed, precision=_HIGHEST)
    err = jnp.einsum("bltd,ltd->blt", g_mlp, errors, precision=_HIGHEST)
    return tok, err.reshape(err.shape[0], -1)


@functools.partial(jax.jit, static_argnames="r_chunk")
def _feature_edges(g_mlp, layer, block, row_pos, latent, act, r_chunk: int):
    """Edges from the active features of source layer `layer`, laid out in rows: [B, R, W].

    g_mlp [B, L, T, d]; block [F, J, d] writes output layers layer..layer+J-1; row_pos [R]:
    the position of each row; latent, act [R, W]: up to W active latents of that position
    and their activations (padding: activation 0; a position with more than W takes several
    rows). A feature reads only its own position's gradient, so the work is one small matmul
    per row (no gather of gradients per feature); rows go r_chunk at a time.
    """
    b, n_out, (n_rows, w) = g_mlp.shape[0], block.shape[1], latent.shape
    g = jax.lax.dynamic_slice_in_dim(g_mlp, layer, n_out, axis=1)[:, :, row_pos]  # [B, J, R, d]
    g = jnp.moveaxis(g.reshape(b, n_out, n_rows // r_chunk, r_chunk, -1), 2, 0)

    def one(args):
        g_part, latent_part, act_part = args  # [B, J, Rc, d], [Rc, W], [Rc, W]
        dec = block[latent_part]  # [Rc, W, J, d]
        return jnp.einsum("bjrd,rwjd->brw", g_part, dec, precision=_HIGHEST) * act_part

    parts = (g, latent.reshape(-1, r_chunk, w), act.reshape(-1, r_chunk, w))
    out = jax.lax.map(one, parts)  # [R / Rc, B, Rc, W]
    return jnp.moveaxis(out, 0, 1).reshape(b, n_rows, w)


def _row_layout(pos: np.ndarray, n_pos: int):
    """Rows of at most W features of one position for features sorted by position.

    -> (W, row of each feature [n], column of each feature [n], position of each row [R]);
    W is a power of two >= the mean count per active position, R rounded up to within 25%
    (few distinct shapes: few compilations).
    """
    counts = np.bincount(pos, minlength=n_pos)
    mean = counts.sum() / max(1, np.count_nonzero(counts))
    width = 1 << int(np.ceil(np.log2(max(1.0, mean))))
    slot = np.arange(pos.size) - np.searchsorted(pos, pos)  # index within its position
    rows_per_pos = -(-counts // width)
    first_row = np.concatenate([[0], np.cumsum(rows_per_pos)[:-1]])
    row, col = first_row[pos] + slot // width, slot % width
    n_rows = int(rows_per_pos.sum())
    step = 1 << max(0, int(np.log2(n_rows)) - 2)
    row_pos = np.zeros(-(-n_rows // step) * step, np.int32)
    row_pos[row] = pos
    return width, row, col, row_pos


@dataclasses.dataclass(frozen=True)
class _ActiveFeatures:
    layer: np.ndarray  # [N]
    pos: np.ndarray
    latent: np.ndarray
    value: np.ndarray

    @classmethod
    def of(cls, codes: list[np.ndarray]) -> _ActiveFeatures:
        parts = []
        for layer, c in enumerate(codes):
            pos, latent = np.nonzero(c)
            parts.append((np.full(pos.shape, layer), pos, latent, c[pos, latent]))
        cat = [np.concatenate(x) for x in zip(*parts, strict=True)]
        return cls(cat[0].astype(np.int32), cat[1].astype(np.int32), cat[2].astype(np.int32),
                   cat[3].astype(np.float32))  # fmt: skip


class _EdgeComputer:
    """Rows of direct effects on batches of targets, over all sources [N + (L+1) T]."""

    def __init__(self, rep: ReplacementModel, feats: _ActiveFeatures, batch_size: int):
        self.rep, self.batch_size = rep, batch_size
        self.groups = []  # per source layer: (layer, feature indices, block, r_chunk, arrays)
        d = rep.embed.shape[-1]
        for layer in range(rep.num_layers):
            where = np.nonzero(feats.layer == layer)[0]  # sorted by (pos, latent)
            if where.size == 0:
                continue
            width, row, col, row_pos = _row_layout(feats.pos[where], len(rep.tokens))
            latent = np.zeros((row_pos.size, width), np.int32)
            act = np.zeros((row_pos.size, width), np.float32)
            latent[row, col], act[row, col] = feats.latent[where], feats.value[where]
            block = rep.decoder_block(layer)
            budget = max(1, (1 << 28) // (width * block.shape[1] * d * 4))  # decoder rows: 256 MiB
            r_chunk = max(
                c for c in range(1, min(row_pos.size, budget) + 1) if row_pos.size % c == 0
            )
            arrays = (
                jnp.asarray(row_pos),
                jnp.asarray(latent),
                jnp.asarray(act),
                row * width + col,
            )
            self.groups.append((layer, where, block, r_chunk, arrays))
        self.n_features = feats.layer.size

    def rows(self, t_layer: np.ndarray, t_pos: np.ndarray, vectors: jax.Array) -> np.ndarray:
        """[B, N + L*T + T] edges into B targets (features, then errors, then tokens)."""
        rep = self.rep
        b = len(t_layer)
        pad = self.batch_size - b  # fixed batch shape: one compilation
        vectors = jnp.pad(vectors, ((0, pad), (0, 0)))
        t_layer, t_pos = np.pad(t_layer, (0, pad)), np.pad(t_pos, (0, pad))
        num_kv = rep.model.cfg.num_kv_heads
        g_embed, g_mlp = _target_grads(rep.state, rep.embed, rep.mlp_add, jnp.asarray(t_layer),
                                       jnp.asarray(t_pos), vectors, num_kv)  # fmt: skip
        tok, err = _token_error_edges(g_embed, g_mlp, rep.embed, rep.errors)
        out = np.zeros((b, self.n_features + err.shape[1] + tok.shape[1]), np.float32)
        for layer, where, block, r_chunk, (row_pos, latent, act, flat) in self.groups:
            edges = _feature_edges(g_mlp, layer, block, row_pos, latent, act, r_chunk=r_chunk)
            out[:, where] = np.asarray(edges[:b]).reshape(b, -1)[:, flat]
        out[:, self.n_features : self.n_features + err.shape[1]] = np.asarray(err[:b])
        out[:, self.n_features + err.shape[1] :] = np.asarray(tok[:b])
        return out


def select_logits(logits: np.ndarray, max_n_logits: int = 10, desired_logit_prob: float = 0.95):
    """circuit-tracer's salient logits: the top ones by probability until their cumulative
    probability reaches `desired_logit_prob`, at most `max_n_logits`. -> (ids [K], probs [K])."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:max_n_logits]
    cutoff = int(np.searchsorted(np.cumsum(probs[top]), desired_logit_prob)) + 1
    top = top[:cutoff]
    return top, probs[top].astype(np.float32)


def auto_batch_size(n_layers: int, n_pos: int, d_model: int, budget_bytes: int = 4 << 30):
    """Targets per backward batch: a power of two <= 64 whose gradient buffers (about five
    [L, T, d] float32 arrays per target, measured) stay within `budget_bytes`."""
    per_target = 5 * n_layers * n_pos * d_model * 4
    return int(2 ** np.clip(np.floor(np.log2(max(1, budget_bytes // per_target))), 0, 6))


def _row_store(feats, rep, n_rows, n_logits, batch_size, row_dtype, row_memory_gb):
    """The RowStore for `n_rows` rows: the budget is `row_memory_gb`, else 80% of the
    available memory less the backward batch's buffers and the final adjacency; "auto"
    stores float32 when even full-length rows would fit, else float16."""
    n_layers, n_pos, d = rep.num_layers, len(rep.tokens), rep.embed.shape[-1]
    n_columns = feats.layer.size + (n_layers + 1) * n_pos
    if row_memory_gb is not None:
        if row_memory_gb <= 0:
            raise ValueError(f"row_memory_gb must be positive, got {row_memory_gb}")
        budget = int(row_memory_gb * 2**30)
    elif (available := available_memory_bytes()) is None:
        budget = None
    else:
        adjacency = n_rows * (n_rows + (n_layers + 1) * n_pos + n_logits) * 4
        buffers = 5 * batch_size * n_layers * n_pos * d * 4 + batch_size * n_columns * 4
        budget = max(0, int(0.8 * available) - adjacency - buffers)
    if row_dtype == "auto":
        fits = budget is None or n_rows * n_columns * 4 <= budget
        row_dtype = "float32" if fits else "float16"
    return RowStore(feats.layer, feats.pos, n_layers, n_pos, dtype=row_dtype, budget_bytes=budget)


def attribute(
    rep: ReplacementModel,
    *,
    targets: Sequence[int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int | None = None,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    row_dtype: str = "auto",
    row_memory_gb: float | None = None,
    prompt: str | None = None,
    tokenizer=None,
    scan: str | None = None,
    verbose: bool = False,
) -> AttributionGraph:
    """The attribution graph of `rep`'s prompt (circuit-tracer's `attribute`, phases 2-5).

    tokenizer: decodes token strings for the graph file (ids are used without one).
    targets: logit token ids (default: `select_logits` of the last position).
    batch_size: targets per backward pass (default `auto_batch_size`: 64 for short prompts,
        8 at 2048 tokens on the 270M).
    max_feature_nodes: feature rows to compute; when fewer than the active features, they
        are visited in order of partial influence (recomputed every `update_interval`
        batches) and the others dropped from the graph.
    row_dtype, row_memory_gb: storage of the rows (`row_store.RowStore`): "float32",
        "float16" (row-scaled) or "auto" (float32 when it surely fits), within a budget
        (default: what the available memory leaves). When the budget is full, no more
        feature rows are computed: the graph keeps the features visited so far, with a
        warning.
    """
    logits = rep.logits[-1]
    if targets is None:
        logit_ids, logit_probs = select_logits(logits, max_n_logits, desired_logit_prob)
    else:
        logit_ids = np.asarray([int(t) for t in targets])
        if logit_ids.size == 0 or logit_ids.min() < 0 or logit_ids.max() >= logits.size:
            raise ValueError(f"target token ids must be in 0..{logits.size - 1}, got {targets}")
        p = np.exp(logits - logits.max())
        logit_probs = (p / p.sum())[logit_ids].astype(np.float32)
    if row_dtype not in ("auto", *ROW_DTYPES):
        raise ValueError(f"row_dtype must be 'auto' or one of {ROW_DTYPES}, got {row_dtype!r}")
    table = rep.model.embed_tokens[...].astype(jnp.float32)
    logit_vectors = table[logit_ids] - jnp.mean(table, axis=0)

    feats = _ActiveFeatures.of(rep.codes)
    n_feat, n_pos, n_layers, n_logits = (
        feats.layer.size,
        len(rep.tokens),
        rep.num_layers,
        len(logit_ids),
    )
    if batch_size is None:
        batch_size = auto_batch_size(n_layers, n_pos, rep.embed.shape[-1])
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    logit_offset = n_feat + (n_layers + 1) * n_pos
    total = logit_offset + n_logits
    max_feat = n_feat if max_feature_nodes is None else min(int(max_feature_nodes), n_feat)
    store = _row_store(feats, rep, max_feat + n_logits, n_logits, batch_size, row_dtype,
                       row_memory_gb)  # fmt: skip
    computer = _EdgeComputer(rep, feats, batch_size)
    log = print if verbose else (lambda *a: None)
    budget = "no limit" if store.budget_bytes is None else f"{store.budget_bytes / 2**30:.2f} GiB"
    log(f"{n_feat} active features; computing {max_feat} feature rows + {n_logits} logit rows "
        f"in batches of {batch_size}; rows stored as {store.dtype} within {budget}")  # fmt: skip

    for i in range(0, n_logits, batch_size):
        sl = slice(i, min(i + batch_size, n_logits))
        k = sl.stop - sl.start
        rows = computer.rows(np.full(k, n_layers), np.full(k, n_pos - 1), logit_vectors[sl])
        for j, row in zip(range(sl.start, sl.stop), rows, strict=True):
            if not store.append(logit_offset + j, n_layers, n_pos - 1, row):
                raise ValueError(
                    f"row_memory_gb too small: the {n_logits} logit rows need "
                    f"{n_logits * store.row_bytes(n_layers, n_pos - 1) / 2**30:.3f} GiB"
                )

    visited, full = np.zeros(n_feat, bool), False
    while not full and (n_visited := int(visited.sum())) < max_feat:
        if max_feat == n_feat:
            pending = np.arange(n_feat)
        else:
            rank = np.argsort(-store.influence(logit_probs)[:n_feat], kind="stable")
            queue = min(update_interval * batch_size, max_feat - n_visited)
            pending = rank[~visited[rank]][:queue]
        for i in range(0, len(pending), batch_size):
            idx = pending[i : i + batch_size]
            idx = idx[np.argsort(feats.layer[idx], kind="stable")]  # grouped by layer
            vectors = jnp.concatenate(
                [
                    rep.encoder_vectors(int(x), feats.latent[idx][feats.layer[idx] == x])
                    for x in np.unique(feats.layer[idx])
                ]
            )
            rows = computer.rows(feats.layer[idx], feats.pos[idx], vectors)
            for node, row in zip(idx, rows, strict=True):
                if not store.append(node, feats.layer[node], feats.pos[node], row):
                    full = True
                    break
                visited[node] = True
            if full:
                break
        log(f"  {int(visited.sum())}/{max_feat} feature rows ({store.nbytes / 2**30:.2f} GiB)")
    if full:
        warnings.warn(
            f"attribution rows reached their memory budget "
            f"({store.budget_bytes / 2**30:.2f} GiB) after {int(visited.sum())} of {max_feat} "
            "feature rows; the graph keeps those (raise row_memory_gb, use "
            "row_dtype='float16' or lower max_feature_nodes)",
            stacklevel=2,
        )

    selected = np.nonzero(visited)[0]
    columns = np.concatenate([selected, np.arange(n_feat, total)])
    order = np.argsort(store.nodes, kind="stable")  # features in graph order, then logits
    adjacency = store.columns(order, columns)
    info = {
        "batch_size": batch_size,
        "row_dtype": str(store.dtype),
        "row_bytes": store.nbytes,
        "row_budget_bytes": store.budget_bytes,
        "dense_row_bytes": len(store) * store.n_columns * 4,
        "truncated_by_budget": full,
    }
    del store
    return AttributionGraph(
        tokens=np.asarray(rep.tokens),
        token_strings=[_token_str(tokenizer, t) for t in rep.tokens],
        logit_strings=[_token_str(tokenizer, t) for t in logit_ids],
        prompt=prompt if prompt is not None else " ".join(str(int(t)) for t in rep.tokens),
        n_layers=n_layers,
        active_features=np.stack([feats.layer, feats.pos, feats.latent], axis=1),
        activation_values=feats.value,
        selected_features=selected,
        adjacency_rows=adjacency,
        logit_tokens=np.asarray(logit_ids),
        logit_probabilities=np.asarray(logit_probs),
        scan=scan,
        info=info,
    )


def _token_str(tokenizer, token) -> str:
    return str(int(token)) if tokenizer is None else tokenizer.decode([int(token)])
