"""On-disk activation cache: write once from a stream, read many epochs as fast as the disk.

Layout of a cache directory:

    manifest.json        format, version, sites {name: {d}}, dtype, n_tokens, chunk_tokens,
                         model, seq_len, metadata, chunks [{n, files {site: {path, bytes,
                         crc32}}}]
    chunks/000000_0.npy  rows [n, d] of chunk 0, site 0 (float32, or bfloat16 stored as uint16)

`write_activation_cache` writes into a temporary sibling directory and renames it into place
after the manifest (written last), so a killed writer leaves no cache at `path`. The reader
checks the manifest and every file's size (and crc32 with `verify=True`) before use.

`ActivationCacheReader` yields the stream's format `{site: float32 [batch_tokens, d]}`. Each
epoch visits this host's chunks (`shard_index::shard_count` of a seeded per-epoch chunk order)
and permutes rows within each chunk (seeded by epoch and position). A chunk file is read
sequentially in one call into a reused staging buffer, then gathered in permuted order; the
next chunk is read in a background thread while the current one is consumed. Batches are
slices of the concatenation of the permuted chunks over all epochs; the state `(epoch, chunk
position, row position)` resumes at the exact next batch.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import threading
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.io.files import atomic_output_dir, path_inside, read_json

FORMAT = "gemmascope_jax.activation_cache"
VERSION = 1
_DTYPES = ("float32", "bfloat16")


class CacheError(ValueError):
    """A missing, partial, corrupted or incompatible activation cache; names the file."""


def write_activation_cache(
    path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    model: str,
    seq_len: int,
    max_tokens: int | None = None,
    chunk_tokens: int = 65536,
    dtype: str = "float32",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    replace_ours: bool = False,
) -> Path:
    """Write `{site: [n, d]}` batches (up to `max_tokens` rows) as a cache; returns its path.

    An existing folder at `path` is refused, unless `overwrite`, or unless `replace_ours` and
    it is an output of this package (e.g. a cache too short for the run)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    path = Path(path)
    with atomic_output_dir(path, force=overwrite, replace_ours=replace_ours) as tmp:
        (tmp / "chunks").mkdir()
        sites: dict[str, int] | None = None
        pending: dict[str, list[np.ndarray]] = {}
        n_pending, n_total, chunks = 0, 0, []

        def flush():
            nonlocal n_pending
            chunks.append(_write_chunk(tmp, len(chunks), pending, sites, dtype))
            for s in pending:
                pending[s] = []
            n_pending = 0

        for batch in batches:
            if sites is None:
                sites = {s: int(np.shape(x)[-1]) for s, x in batch.items()}
                pending = {s: [] for s in sites}
            if set(batch) != set(sites):
                raise ValueError(f"batch sites {sorted(batch)} differ from {sorted(sites)}")
            rows = len(next(iter(batch.values())))
            if max_tokens is not None:
                rows = min(rows, max_tokens - n_total)
            start = 0
            while start < rows:
                take = min(rows - start, chunk_tokens - n_pending)
                for s in sites:
                    pending[s].append(np.asarray(batch[s][start : start + take], np.float32))
                start, n_pending, n_total = start + take, n_pending + take, n_total + take
                if n_pending == chunk_tokens:
                    flush()
            if max_tokens is not None and n_total >= max_tokens:
                break
        if n_pending:
            flush()
        if not chunks:
            raise ValueError("write_activation_cache: the batch iterator yielded no tokens")
        manifest = dict(
            format=FORMAT,
            version=VERSION,
            sites={s: {"d": d} for s, d in sites.items()},
            dtype=dtype,
            n_tokens=n_total,
            chunk_tokens=chunk_tokens,
            model=model,
            seq_len=seq_len,
            metadata=dict(metadata or {}),
            chunks=chunks,
        )
        _write_durable(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    return path


def _write_chunk(root: Path, k: int, pending, sites, dtype) -> dict:
    files = {}
    for j, s in enumerate(sites):
        rows = np.concatenate(pending[s])
        if dtype == "bfloat16":
            import ml_dtypes

            rows = rows.astype(ml_dtypes.bfloat16).view(np.uint16)
        rel = f"chunks/{k:06d}_{j}.npy"
        header = _npy_header(rows)
        body = memoryview(rows).cast("B")
        _write_durable(root / rel, header, body)
        crc = zlib.crc32(body, zlib.crc32(header))
        files[s] = {"path": rel, "bytes": len(header) + len(body), "crc32": crc}
    return {"n": int(rows.shape[0]), "files": files}


def _npy_header(a: np.ndarray) -> bytes:
    """The .npy (version 1.0) header of a C-contiguous array; the raw data follows it."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(a))
    return out.getvalue()


def _write_durable(path: Path, *parts) -> None:
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())


def _read_npy_into(path: Path, dest: np.ndarray) -> None:
    """Read the data of a version-1.0 .npy file into `dest` (same shape and dtype)."""
    with open(path, "rb") as f:
        try:
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        except ValueError as e:
            raise CacheError(f"{path}: bad .npy header ({e})") from None
        if shape != dest.shape or dtype != dest.dtype or fortran:
            raise CacheError(
                f"{path}: holds {dtype}{list(shape)}, expected {dest.dtype}{list(dest.shape)}"
            )
        if f.readinto(memoryview(dest).cast("B")) != dest.nbytes:
            raise CacheError(f"{path}: truncated")


def read_manifest(path: str | os.PathLike, verify: bool = False) -> dict:
    """The checked manifest of a complete cache; raises CacheError naming the bad file."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CacheError(f"{path}: not a complete activation cache (no manifest.json)")
    m = read_json(mpath, error=CacheError)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CacheError(f"{mpath}: not a version-{VERSION} {FORMAT} manifest")
    if m.get("dtype") not in _DTYPES:
        raise CacheError(f"{mpath}: unknown dtype {m.get('dtype')!r}")
    if sum(c["n"] for c in m["chunks"]) != m["n_tokens"]:
        raise CacheError(f"{mpath}: chunk sizes do not add up to n_tokens={m['n_tokens']}")
    for chunk in m["chunks"]:
        for site, f in chunk["files"].items():
            try:  # a manifest names files inside its own folder only
                fp = path_inside(path, f["path"], mpath)
            except FormatError as e:
                raise CacheError(str(e)) from None
            if not fp.is_file():
                raise CacheError(f"{fp}: missing file of site {site!r}")
            if fp.stat().st_size != f["bytes"]:
                raise CacheError(f"{fp}: {fp.stat().st_size} bytes, manifest says {f['bytes']}")
            if verify and zlib.crc32(fp.read_bytes()) != f["crc32"]:
                raise CacheError(f"{fp}: checksum mismatch (corrupted)")
    return m


class ActivationCacheReader(grain.DatasetIterator):
    """Yields `{site: float32 [batch_tokens, d]}` from a cache, shuffled per epoch (see module)."""

    def __init__(
        self,
        path: str | os.PathLike,
        batch_tokens: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        sites: Iterable[str] | None = None,
        shard_index: int = 0,
        shard_count: int = 1,
        verify: bool = False,
        drop_remainder: bool = True,
        prefetch: bool = True,
    ):
        super().__init__()
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.sites = tuple(sites) if sites is not None else tuple(self.manifest["sites"])
        missing = [s for s in self.sites if s not in self.manifest["sites"]]
        if missing:
            raise CacheError(
                f"{self.path}: no site(s) {missing}; has {list(self.manifest['sites'])}"
            )
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        if len(self.manifest["chunks"]) < shard_count:
            raise CacheError(f"{self.path}: fewer chunks than the {shard_count} shards")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.batch_tokens, self.seed, self.shuffle = batch_tokens, seed, shuffle
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.shard_index, self.shard_count = shard_index, shard_count
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
        self._stage_lock, self._stage = threading.Lock(), np.empty(0, np.uint8)
        self._ahead: tuple[tuple[int, int], concurrent.futures.Future] | None = None
        self._epoch, self._k, self._pos = 0, -1, 0  # chunk position `_k` of epoch `_epoch`
        self._buf: dict[str, np.ndarray] = {}
        self._orders: dict[str, Any] = {}

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def _order(self, epoch: int) -> np.ndarray:
        """This host's chunk indices in the order epoch `epoch` visits them."""
        cached = self._orders
        if cached.get("epoch") != epoch:
            n = len(self.manifest["chunks"])
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            cached = {"epoch": epoch, "order": order[self.shard_index :: self.shard_count]}
            self._orders = cached
        return cached["order"]

    def _load(self, epoch: int, k: int, index: int) -> dict[str, np.ndarray]:
        """Rows of chunk `index` (position `k` of epoch `epoch`), permuted; thread-safe.

        Each file is read sequentially into a reused staging buffer (fresh memory costs page
        faults), then gathered in permuted order into the returned array.
        """
        chunk = self.manifest["chunks"][index]
        n, bf16 = chunk["n"], self.manifest["dtype"] == "bfloat16"
        perm = None
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, k]).permutation(n)
        out = {}
        with self._stage_lock:
            for s in self.sites:
                shape = (n, self.manifest["sites"][s]["d"])
                raw = np.dtype(np.uint16 if bf16 else np.float32)
                if perm is None and not bf16:
                    dest = np.empty(shape, raw)
                else:
                    dest = self._staging(shape, raw)
                _read_npy_into(self.path / chunk["files"][s]["path"], dest)  # checked on open
                if bf16:
                    import ml_dtypes

                    dest = dest.view(ml_dtypes.bfloat16)
                a = dest if perm is None else dest[perm]
                out[s] = a.astype(np.float32) if bf16 else a
        return out

    def _staging(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        nbytes = shape[0] * shape[1] * dtype.itemsize
        if self._stage.nbytes < nbytes:
            self._stage = np.empty(nbytes, np.uint8)
        return self._stage[:nbytes].view(dtype).reshape(shape)

    def _get(self, epoch: int, k: int) -> dict[str, np.ndarray]:
        if self._ahead is not None and self._ahead[0] == (epoch, k):
            buf = self._ahead[1].result()
        else:
            buf = self._load(epoch, k, int(self._order(epoch)[k]))
        self._ahead = None
        nxt = self._following(epoch, k)
        if self._pool is not None and nxt is not None:
            index = int(self._order(nxt[0])[nxt[1]])
            self._ahead = (nxt, self._pool.submit(self._load, *nxt, index))
        return buf

    def _following(self, epoch: int, k: int) -> tuple[int, int] | None:
        if k + 1 < len(self._order(epoch)):
            return epoch, k + 1
        if self.num_epochs is not None and epoch + 1 >= self.num_epochs:
            return None
        return epoch + 1, 0

    def __next__(self) -> dict[str, np.ndarray]:
        pieces, need = [], self.batch_tokens
        while need > 0:
            left = (len(self._buf[self.sites[0]]) if self._buf else 0) - self._pos
            if left == 0:
                nxt = (self._epoch, 0) if self._k < 0 else self._following(self._epoch, self._k)
                if nxt is None:
                    break
                self._buf = self._get(*nxt)
                (self._epoch, self._k), self._pos = nxt, 0
                continue
            take = min(left, need)
            pieces.append({s: self._buf[s][self._pos : self._pos + take] for s in self.sites})
            self._pos, need = self._pos + take, need - take
        if need == self.batch_tokens or (need > 0 and self.drop_remainder):
            raise StopIteration
        if len(pieces) == 1:
            return pieces[0]  # views into the chunk: every row is handed out once
        return {s: np.concatenate([p[s] for p in pieces]) for s in self.sites}

    def get_state(self) -> dict[str, Any]:
        return dict(epoch=self._epoch, chunk=self._k, pos=self._pos, seed=self.seed)

    def set_state(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"cache-reader state has seed {state['seed']}, reader {self.seed}")
        self._epoch, self._k, self._pos = int(state["epoch"]), int(state["chunk"]), 0
        self._buf, self._ahead = {}, None
        if self._k >= 0:
            self._buf = self._get(self._epoch, self._k)
            self._pos = int(state["pos"])

    def close(self) -> None:
        pool = getattr(self, "_pool", None)  # absent if __init__ failed
        if pool is not None:  # may run in the pool's own thread (from __del__): do not join
            pool.shutdown(wait=False, cancel_futures=True)
        super().close()
