"""RowStore: rows kept over their reachable sources only, read back exactly (float32) or
within 2^-11 of the row's largest edge (float16); influence equal to circuit-tracer's on the
dense rows; a byte budget that is never exceeded."""

from __future__ import annotations

import numpy as np
import pytest

from gemmascope_jax.analysis.attribution.graph import partial_influence
from gemmascope_jax.analysis.attribution.row_store import RowStore

N_LAYERS, N_POS = 4, 6


def _features(rng, per_cell=3):
    """Active features sorted by (layer, pos), 0..per_cell per (layer, position)."""
    counts = rng.integers(0, per_cell + 1, size=(N_LAYERS, N_POS))
    layer = np.repeat(np.arange(N_LAYERS), counts.sum(axis=1))
    pos = np.concatenate([np.repeat(np.arange(N_POS), c) for c in counts])
    return layer, pos


def _reach_mask(layer, pos, f_layer, f_pos, target_layer, target_pos):
    """[n_columns] bool: sources that can reach a target, from first principles."""
    features = (f_layer < target_layer) & (f_pos <= target_pos)
    err_layer, err_pos = np.divmod(np.arange(N_LAYERS * N_POS), N_POS)
    errors = (err_layer < target_layer) & (err_pos <= target_pos)
    tokens = np.arange(N_POS) <= target_pos
    return np.concatenate([features, errors, tokens])


def _dense_rows(rng, f_layer, f_pos, n_logits=2, n_feature_rows=12):
    """Random rows with exact zeros outside each target's reach; features then logits."""
    n_features = f_layer.size
    n_columns = n_features + (N_LAYERS + 1) * N_POS
    nodes = rng.choice(n_features, size=min(n_feature_rows, n_features), replace=False)
    targets = [(int(f_layer[i]), int(f_pos[i])) for i in nodes]
    nodes = [*nodes.tolist(), *(n_columns + np.arange(n_logits)).tolist()]
    targets += [(N_LAYERS, N_POS - 1)] * n_logits
    rows = np.zeros((len(nodes), n_columns + n_logits), np.float32)
    for row, (layer, pos) in zip(rows, targets, strict=True):
        mask = _reach_mask(layer, pos, f_layer, f_pos, layer, pos)
        row[:n_columns][mask] = rng.standard_normal(mask.sum()) * rng.choice([1e-3, 1, 30])
    return rows, np.asarray(nodes), targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_and_influence_match_dense_rows(seed):
    rng = np.random.default_rng(seed)
    f_layer, f_pos = _features(rng)
    rows, nodes, targets = _dense_rows(rng, f_layer, f_pos)
    n_logits = 2
    store32 = RowStore(f_layer, f_pos, N_LAYERS, N_POS, dtype="float32")
    store16 = RowStore(f_layer, f_pos, N_LAYERS, N_POS, dtype="float16")
    for row, node, (layer, pos) in zip(rows, nodes, targets, strict=True):
        assert store32.append(node, layer, pos, row) and store16.append(node, layer, pos, row)
    n_columns = store32.n_columns
    assert store32.nbytes == 4 * sum(int(np.count_nonzero(
        _reach_mask(la, p, f_layer, f_pos, la, p))) for la, p in targets)  # fmt: skip
    assert store32.nbytes < 4 * len(rows) * n_columns  # only logit rows are full length
    assert store16.nbytes * 2 == store32.nbytes
    every = np.arange(n_columns + n_logits)
    np.testing.assert_array_equal(store32.columns(np.arange(len(rows)), every), rows)
    got16 = store16.columns(np.arange(len(rows)), every)
    bound = np.abs(rows).max(axis=1, keepdims=True) * 2.0**-11
    assert (np.abs(got16 - rows) <= bound).all()
    shuffled = rng.permutation(every)[: len(every) // 2]  # any order, any subset
    np.testing.assert_array_equal(store32.columns([3, 0], shuffled), rows[[3, 0]][:, shuffled])

    probs = np.array([0.7, 0.2], np.float32)
    expected = partial_influence(rows, probs, nodes)[:n_columns]
    np.testing.assert_allclose(store32.influence(probs), expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(store16.influence(probs), expected, rtol=5e-3, atol=1e-6)


def test_budget_is_never_exceeded():
    rng = np.random.default_rng(3)
    f_layer, f_pos = _features(rng)
    rows, nodes, targets = _dense_rows(rng, f_layer, f_pos, n_feature_rows=20)
    budget = 4 * rows.shape[1] * 3  # about three full-length rows
    store = RowStore(f_layer, f_pos, N_LAYERS, N_POS, budget_bytes=budget)
    accepted = [
        store.append(n, la, p, r) for r, n, (la, p) in zip(rows, nodes, targets, strict=True)
    ]
    assert not all(accepted) and any(accepted)
    assert store.nbytes <= budget and len(store) == sum(accepted)
    kept = np.nonzero(accepted)[0]
    np.testing.assert_array_equal(store.columns(np.arange(len(store)), np.arange(store.n_columns)),
                                  rows[kept][:, : store.n_columns])  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="sorted"):
        RowStore(np.array([1, 0]), np.array([0, 0]), N_LAYERS, N_POS)
    with pytest.raises(ValueError, match="in range"):
        RowStore(np.array([0, N_LAYERS]), np.array([0, 0]), N_LAYERS, N_POS)
    with pytest.raises(ValueError, match="row dtype"):
        RowStore(np.array([0]), np.array([0]), N_LAYERS, N_POS, dtype="bfloat16")
