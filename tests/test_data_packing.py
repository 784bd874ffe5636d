"""Packing documents into BOS-led windows: coverage, determinism, host shards, resume."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from gemmascope_jax.data import ListSource, PackedTokens

BOS, PAD = 2, 0


class StubTokenizer:
    """Documents are space-separated integers; `encode` prepends <bos>, like the real one."""

    bos_id, pad_id = BOS, PAD

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [int(w) for w in text.split()]
        return [BOS, *ids] if add_bos else ids


def make_docs(n: int, seed: int = 0, max_len: int = 40, base: int = 1000) -> list[list[int]]:
    """Token lists with globally unique ids: doc i holds base*(i+1) + j; some are empty."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n)
    lengths[::7] = 0  # empty documents are skipped
    lengths[1] = 3 * max_len  # a document longer than several windows
    return [[base * (i + 1) + j for j in range(k)] for i, k in enumerate(lengths)]


def as_source(docs: list[list[int]]) -> ListSource:
    return ListSource([" ".join(map(str, d)) for d in docs])


def packed(docs, **kw) -> PackedTokens:
    kw = {"seq_len": 16, "batch_size": 4, "seed": 0, **kw}
    return PackedTokens(as_source(docs), StubTokenizer(), **kw)


def reference_windows(doc_order: list[list[int]], seq_len: int) -> list[list[int]]:
    """Token-by-token packing: a full window starts a new one, with <bos> if mid-document."""
    stream = [t for d in doc_order if d for t in [BOS, *d]]
    windows, cur = [], []
    for t in stream:
        if len(cur) == seq_len:
            windows.append(cur)
            cur = [] if t == BOS else [BOS]
        cur.append(t)
    if cur:
        windows.append(cur + [PAD] * (seq_len - len(cur)))
    return windows


def doc_order_of(tokens: np.ndarray, base: int = 1000) -> list[int]:
    """Document indices in the order their first tokens appear."""
    content = tokens[(tokens != BOS) & (tokens != PAD)]
    ids = content // base - 1
    return [int(i) for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]


def test_one_epoch_matches_reference_packing():
    docs = make_docs(60)
    it = packed(docs, num_epochs=1)
    batches = list(it)
    tokens = np.concatenate(batches)
    assert all(b.shape == (4, 16) and b.dtype == np.int32 for b in batches)
    real_rows = tokens[(tokens != PAD).any(axis=1)]
    assert (real_rows[:, 0] == BOS).all()  # every window starts with <bos>
    order = doc_order_of(tokens)
    nonempty = [i for i, d in enumerate(docs) if d]
    assert sorted(order) == nonempty  # every document once
    assert order != nonempty  # shuffled
    expected = reference_windows([docs[i] for i in order], 16)
    got = [list(r) for r in tokens]
    assert got[: len(expected)] == expected
    assert all((np.asarray(r) == PAD).all() for r in got[len(expected) :])  # filler rows
    # no content token lost or duplicated
    content = tokens[(tokens != BOS) & (tokens != PAD)]
    assert sorted(content.tolist()) == sorted(t for d in docs for t in d)
    with pytest.raises(StopIteration):
        next(it)


def test_epochs_reshuffle_and_each_covers_all_tokens():
    docs = make_docs(30)
    tokens = np.concatenate(list(packed(docs, num_epochs=3)))
    content = tokens[(tokens != BOS) & (tokens != PAD)]
    values, counts = np.unique(content, return_counts=True)
    assert (counts == 3).all() and len(values) == sum(map(len, docs))
    order = doc_order_of(tokens)
    n = len([d for d in docs if d])
    epochs = [order[i * n : (i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_deterministic_and_seeded():
    docs = make_docs(40)

    def first(seed, k=8):
        it = packed(docs, seed=seed)
        return np.stack([next(it) for _ in range(k)])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    unshuffled = np.concatenate(list(packed(docs, shuffle=False, num_epochs=1)))
    assert doc_order_of(unshuffled) == [i for i, d in enumerate(docs) if d]


@pytest.mark.parametrize("count", [2, 3])
def test_host_shards_are_disjoint_and_cover(count):
    docs = make_docs(50)
    seen = []
    for index in range(count):
        tokens = np.concatenate(
            list(packed(docs, num_epochs=1, shard_index=index, shard_count=count))
        )
        seen.append(tokens[(tokens != BOS) & (tokens != PAD)].tolist())
    flat = [t for s in seen for t in s]
    assert len(flat) == len(set(flat)) == sum(map(len, docs))
    for a in range(count):
        for b in range(a + 1, count):
            assert not set(seen[a]) & set(seen[b])


@pytest.mark.parametrize("skip", [0, 1, 3, 7])
def test_resume_continues_at_the_exact_next_batch(skip):
    docs = make_docs(40)
    it = packed(docs, seq_len=12, batch_size=3)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = [next(it) for _ in range(10)]  # crosses epoch boundaries
    fresh = packed(docs, seq_len=12, batch_size=3)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)
    assert fresh.get_state() == it.get_state()


def test_resume_mid_document_state():
    """A state taken while a long document is split across windows restores mid-document."""
    docs = [list(range(1000, 1100)), list(range(2000, 2010))]
    it = packed(docs, seq_len=8, batch_size=1, shuffle=False)
    next(it)
    state = it.get_state()
    assert state["doc"] == 0 and state["offset"] == 8  # <bos> + 7 tokens consumed
    fresh = packed(docs, seq_len=8, batch_size=1, shuffle=False)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)[0], [BOS, *range(1007, 1014)])


def test_state_for_another_config_is_rejected():
    docs = make_docs(20)
    state = packed(docs).get_state()
    with pytest.raises(ValueError, match="seq_len"):
        packed(docs, seq_len=32).set_state(state)


def test_grain_checkpoint_handler_round_trip(tmp_path):
    """The orbax handler grain ships (`grain.checkpoint.CheckpointSave`) saves this iterator."""
    from etils import epath

    docs = make_docs(20)
    it = packed(docs)
    for _ in range(3):
        next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = next(it)
    fresh = handler.restore(epath.Path(tmp_path), item=packed(docs))
    np.testing.assert_array_equal(next(fresh), expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="every document"):
        next(packed([[], []]))
    with pytest.raises(ValueError, match="shard 3 of 4"):
        packed(make_docs(3), shard_index=3, shard_count=4)
    with pytest.raises(ValueError, match="seq_len"):
        packed(make_docs(3), seq_len=1)
