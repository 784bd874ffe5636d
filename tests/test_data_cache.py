"""Activation cache: round trip against the stream, shuffled epochs, resume, shards, rejection
of partial or corrupted caches, and write/read throughput."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gemmascope_jax.data import (
    ActivationCacheReader,
    ActivationStream,
    CacheError,
    read_manifest,
    write_activation_cache,
)
from tests.test_data_activations import SITES, model, tokens  # noqa: F401  (fixture)

D = 64


@pytest.fixture(scope="module")
def stream_batches(model):  # noqa: F811
    stream = ActivationStream(
        model, SITES, tokens(n_docs=60), batch_tokens=50, buffer_tokens=200, drop_remainder=False
    )
    return list(stream)


@pytest.fixture(scope="module")
def cache(stream_batches, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(
        path, stream_batches, model="gemma-3-tiny", seq_len=16, chunk_tokens=70,
        metadata={"seed": 0},
    )  # fmt: skip
    return path


def concat(batches, sites=SITES):
    return {s: np.concatenate([b[s] for b in batches]) for s in sites}


def read_all(reader):
    return concat(list(reader), reader.sites)


def sort_rows(x):
    return x[np.lexsort(x.T[::-1])]


def test_round_trip_equals_the_stream(cache, stream_batches):
    m = read_manifest(cache, verify=True)
    n = sum(len(b[SITES[0]]) for b in stream_batches)
    assert m["n_tokens"] == n and m["seq_len"] == 16 and m["model"] == "gemma-3-tiny"
    assert m["sites"] == {s: {"d": D} for s in SITES} and m["dtype"] == "float32"
    assert len(m["chunks"]) == -(-n // 70) and m["metadata"] == {"seed": 0}
    reader = ActivationCacheReader(cache, 33, shuffle=False, drop_remainder=False)
    got, want = read_all(reader), concat(stream_batches)
    for s in SITES:
        np.testing.assert_array_equal(got[s], want[s])


def test_bfloat16_cache_is_the_rounded_stream(stream_batches, tmp_path):
    import ml_dtypes

    path = write_activation_cache(
        tmp_path / "bf16", stream_batches, model="m", seq_len=16, chunk_tokens=64,
        dtype="bfloat16", max_tokens=150,
    )  # fmt: skip
    got = read_all(ActivationCacheReader(path, 50, shuffle=False))
    want = concat(stream_batches)
    for s in SITES:
        rounded = want[s][:150].astype(ml_dtypes.bfloat16).astype(np.float32)
        assert got[s].dtype == np.float32
        np.testing.assert_array_equal(got[s], rounded)
    assert (path / "chunks" / "000000_0.npy").stat().st_size < 64 * D * 2 + 200


def test_shuffled_epochs_cover_every_row_and_keep_sites_aligned(cache, stream_batches):
    want = concat(stream_batches)
    n = len(want[SITES[0]])
    reader = ActivationCacheReader(cache, n, seed=3, num_epochs=2)
    epochs = [next(reader), next(reader)]  # one batch = one epoch here
    with pytest.raises(StopIteration):
        next(reader)
    for e in epochs:
        stacked = np.concatenate([e[s] for s in SITES], 1)
        ref = np.concatenate([want[s] for s in SITES], 1)
        np.testing.assert_array_equal(sort_rows(stacked), sort_rows(ref))  # rows kept whole
    assert not np.array_equal(epochs[0][SITES[0]], epochs[1][SITES[0]])
    assert not np.array_equal(epochs[0][SITES[0]], want[SITES[0]])
    again = ActivationCacheReader(cache, n, seed=3, num_epochs=2, prefetch=False)
    np.testing.assert_array_equal(next(again)[SITES[1]], epochs[0][SITES[1]])


@pytest.mark.parametrize("skip", [0, 2, 5, 9])
def test_reader_resume_is_exact(cache, skip):
    reader = ActivationCacheReader(cache, 40, seed=1, num_epochs=None, sites=SITES[:2])
    for _ in range(skip):
        next(reader)
    state = json.loads(json.dumps(reader.get_state()))
    want = [next(reader) for _ in range(12)]  # crosses chunk and epoch boundaries
    fresh = ActivationCacheReader(cache, 40, seed=1, num_epochs=None, sites=SITES[:2])
    fresh.set_state(state)
    for w in want:
        g = next(fresh)
        assert set(g) == set(SITES[:2])
        for s in SITES[:2]:
            np.testing.assert_array_equal(g[s], w[s])


def test_reader_host_shards_are_disjoint_and_cover(cache, stream_batches):
    want = sort_rows(concat(stream_batches)[SITES[0]])
    parts = [
        read_all(
            ActivationCacheReader(cache, 10, shard_index=i, shard_count=3, drop_remainder=False)
        )
        for i in range(3)
    ]
    got = np.concatenate([p[SITES[0]] for p in parts])
    np.testing.assert_array_equal(sort_rows(got), want)


def test_partial_and_corrupted_caches_are_rejected(stream_batches, tmp_path):
    def failing():
        yield stream_batches[0]
        raise RuntimeError("killed mid-write")

    path = tmp_path / "acts"
    with pytest.raises(RuntimeError, match="killed"):
        write_activation_cache(path, failing(), model="m", seq_len=16, chunk_tokens=10)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing left behind

    write_activation_cache(path, stream_batches[:3], model="m", seq_len=16, chunk_tokens=40)
    with pytest.raises(FileExistsError):
        write_activation_cache(path, stream_batches[:3], model="m", seq_len=16)
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="did not create"):  # not ours: never replaced
        write_activation_cache(user, stream_batches[:1], model="m", seq_len=16, replace_ours=True)
    assert (user / "notes").is_dir()
    f = path / "chunks" / "000001_2.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit: same size, caught by the checksum
    f.write_bytes(bytes(data))
    ActivationCacheReader(path, 8)  # the size check alone passes
    with pytest.raises(CacheError, match="000001_2.npy: checksum"):
        ActivationCacheReader(path, 8, verify=True)
    f.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(CacheError, match="000001_2.npy"):
        ActivationCacheReader(path, 8)
    (path / "manifest.json").unlink()  # what a half-written cache would look like
    with pytest.raises(CacheError, match="no manifest"):
        ActivationCacheReader(path, 8)
    with pytest.raises(CacheError, match="no manifest"):
        ActivationCacheReader(tmp_path / "missing", 8)


def test_manifest_paths_stay_inside_the_cache(stream_batches, tmp_path):
    path = tmp_path / "acts"
    write_activation_cache(path, stream_batches[:1], model="m", seq_len=16, chunk_tokens=40)
    outside = tmp_path / "elsewhere.npy"
    first = next(
        iter(json.loads((path / "manifest.json").read_text())["chunks"][0]["files"].values())
    )
    outside.write_bytes((path / first["path"]).read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in ("../elsewhere.npy", str(outside)):
        site = next(iter(manifest["chunks"][0]["files"]))
        manifest["chunks"][0]["files"][site]["path"] = entry
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CacheError, match="manifest.json: path"):
            ActivationCacheReader(path, 8)


def test_unknown_site_is_rejected(cache):
    with pytest.raises(CacheError, match="resid_post.9"):
        ActivationCacheReader(cache, 8, sites=["resid_post.9"])


def test_write_and_read_throughput(tmp_path):
    """Prints GB/s for a 256 MB float32 cache (2 sites x 65,536 tokens x 512)."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((8192, 512), dtype=np.float32)
    batches = [{"a": block, "b": block[::-1]} for _ in range(8)]
    nbytes = 2 * 8 * block.nbytes
    t0 = time.perf_counter()
    path = write_activation_cache(tmp_path / "big", batches, model="m", seq_len=1024)
    t1 = time.perf_counter()
    reader = ActivationCacheReader(path, 8192, seed=0)
    n = sum(len(b["a"]) for b in reader)
    t2 = time.perf_counter()
    reader = ActivationCacheReader(path, 8192, shuffle=False)
    n_plain = sum(len(b["a"]) for b in reader)
    t3 = time.perf_counter()
    assert n == n_plain == 65536
    gb = nbytes / 1e9
    print(
        f"\nactivation cache {gb:.2f} GB: write {gb / (t1 - t0):.2f} GB/s (fsync'd), "
        f"read shuffled {gb / (t2 - t1):.2f} GB/s, read in order {gb / (t3 - t2):.2f} GB/s"
    )
