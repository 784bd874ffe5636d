"""Lazy, memory-mapped safetensors reading and atomic writing, bfloat16 included.

The `safetensors` package's NumPy backend has no bfloat16; this module reads the format
directly (8-byte little-endian header length, JSON header, raw little-endian data) into
`np.memmap` views, so a loader can slice one shard of a tensor without reading the rest,
and every error names the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A malformed or inconsistent safetensors file; the message names the file."""


class SafetensorsFile:
    """Header of one safetensors file plus lazy memory-mapped tensor access."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} exceeds the file size {size} "
                    "(truncated or not a safetensors file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: unreadable JSON header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            self._validate(name, entry, size)

    def _validate(self, name: str, entry: dict, size: int) -> None:
        try:
            dtype = DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}"
            ) from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != expected:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} spans {end - start} bytes but shape {shape} "
                f"{entry['dtype']} needs {expected}"
            )
        if self._data_start + end > size:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the "
                f"file has {size} bytes (truncated file)"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view; copy or slice it to materialize."""
        entry = self._entry(name)
        start, _ = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not shape or 0 in shape:
            return np.zeros(shape, DTYPES[entry["dtype"]])
        return np.memmap(
            self.path,
            dtype=DTYPES[entry["dtype"]],
            mode="r",
            offset=self._data_start + start,
            shape=shape,
        )

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a file, materialized as ordinary arrays."""
    f = SafetensorsFile(path)
    return {name: np.array(f.tensor(name)) for name in f.keys()}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors (C order, little endian) to `path` atomically (temp file + rename)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(np.asarray(value))
        if arr.dtype not in _NAMES:
            raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
