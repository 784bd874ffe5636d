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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class SafetensorsFile:
    """Header of one safetensors file plus lazy memory-mapped tensor access.

    Every rule of the format is checked when the file is opened, so a file that passes can
    only be read at the offsets its writer meant: the header length fits the file and is at
    most 100 MiB; the header is a JSON object (no duplicate keys) whose optional
    `__metadata__` maps strings to strings and whose other entries each hold exactly `dtype`
    (a known name), `shape` (non-negative ints) and `data_offsets` ([begin, end], ints,
    begin <= end); each tensor spans dtype size x elements bytes; the tensors, sorted by
    offset, start at 0 and follow each other without gaps or overlaps; and 8 + header
    length + the end of the last tensor is exactly the file size.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise SafetensorsError(f"{self.path}: a folder, not a safetensors file")
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_HEADER:
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} is over the {_MAX_HEADER}-byte "
                    "limit (corrupt or not a safetensors file)"
                )
            if header_len > size - 8:
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} exceeds the file size {size} "
                    "(truncated or not a safetensors file)"
                )
            if header_len < 2:
                raise SafetensorsError(f"{self.path}: header length {header_len} is too small")
            text = f.read(header_len)
        try:
            header = json.loads(text, object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(
                f"{self.path}: unreadable JSON header of {header_len} bytes ({e}); a wrong "
                "header length, a truncated file or not a safetensors file"
            ) from None
        if not isinstance(header, dict):
            raise SafetensorsError(
                f"{self.path}: the header is a JSON {type(header).__name__}, not an object"
            )
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise SafetensorsError(
                f"{self.path}: '__metadata__' must map strings to strings, got {metadata!r:.200}"
            )
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        self._entries: dict[str, dict] = {}
        for name, entry in header.items():
            self._entries[name] = self._validate(name, entry)
        self._check_layout(size - self._data_start, size)

    def _validate(self, name: str, entry) -> dict:
        """The entry as {"dtype", "shape" (tuple), "data_offsets" (tuple)}, checked."""

        def bad(why: str) -> SafetensorsError:
            return SafetensorsError(
                f"{self.path}: tensor {name!r} has a malformed header entry ({why}): {entry!r:.200}"
            )

        if not isinstance(entry, dict):
            raise bad(f"a JSON {type(entry).__name__}, not an object")
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad("keys must be exactly dtype, shape and data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise bad(f"dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad("shape must be a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
        ):
            raise bad("data_offsets must be [begin, end], non-negative ints")
        start, end = offsets
        if end < start:
            raise bad(f"data_offsets end {end} is before begin {start}")
        dtype = DTYPES[dtype_name]
        elements = 1
        for d in shape:
            elements *= d
        expected = elements * dtype.itemsize
        if end - start != expected:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} spans {end - start} bytes but shape "
                f"{tuple(shape)} {dtype_name} needs {expected}"
            )
        return {"dtype": dtype_name, "shape": tuple(shape), "data_offsets": (start, end)}

    def _check_layout(self, data_size: int, size: int) -> None:
        """Tensors contiguous from byte 0 of the data, in any order, and ending at the file's
        end: no gap, no overlap, nothing truncated, nothing left over."""
        spans = sorted((e["data_offsets"], n) for n, e in self._entries.items())
        at, previous = 0, None
        for (start, end), name in spans:
            if start != at:
                where = f"after tensor {previous!r}" if previous else "at the start of the data"
                what = "overlaps" if start < at else "leaves a gap"
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} begins at data byte {start}, which {what} "
                    f"{where} (expected {at}): inconsistent data_offsets"
                )
            if end > data_size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the "
                    f"file has {size} bytes (truncated file, or a wrong header length)"
                )
            at, previous = end, name
        if at != data_size:
            last = f"tensor {previous!r}" if previous else "the header"
            raise SafetensorsError(
                f"{self.path}: {data_size - at} byte(s) after the end of {last} (8 + header "
                f"length {self._data_start - 8} + data {at} != file size {size}): a wrong "
                "header length or data_offsets, or a damaged file"
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
        if 0 in shape:
            return np.zeros(shape, DTYPES[entry["dtype"]])
        if not shape:  # a 0-d tensor: one element (np.memmap wants at least one dimension)
            return np.memmap(
                self.path,
                dtype=DTYPES[entry["dtype"]],
                mode="r",
                offset=self._data_start + start,
                shape=(1,),
            ).reshape(())
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
    if bad := {k: v for k, v in (metadata or {}).items() if not isinstance(v, str)}:
        raise TypeError(f"{path}: safetensors metadata values must be strings, got {bad!r}")
    if "__metadata__" in tensors:
        raise ValueError(f"{path}: '__metadata__' is reserved and cannot name a tensor")
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d arrays 0-d
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
