"""Shared reading and writing rules for every dictionary format.

- `TensorReader`: read tensors from one safetensors file, checking name, shape, dtype and
  finiteness, and naming the file and tensor in every error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemmascope_jax.safetensors_io import SafetensorsFile


class FormatError(ValueError):
    """A dictionary file that is malformed or disagrees with its config; names file and tensor."""


def path_inside(folder: str | os.PathLike, entry, source: str | os.PathLike) -> Path:
    """The path `entry`, read from the file `source`, resolved relative to `folder` (the
    folder of `source`); FormatError when it is not a relative path string or when it leaves
    `folder` (an absolute path, `..`, or a symlink pointing out). Paths inside a file never
    reach beyond its folder; a user who means another place passes that path explicitly."""
    folder = Path(folder)
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise FormatError(f"{source}: path entry {entry!r} is not a relative path string")
    rel = Path(entry)
    if rel.is_absolute():
        raise FormatError(
            f"{source}: path {entry!r} is absolute; paths in this file must be relative to "
            f"its folder {folder} (pass other files explicitly)"
        )
    resolved, base = (folder / rel).resolve(), folder.resolve()
    if resolved != base and base not in resolved.parents:
        raise FormatError(
            f"{source}: path {entry!r} resolves to {resolved}, outside the folder {folder}; "
            "refused (pass files outside it explicitly)"
        )
    return folder / rel


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_json(path: str | os.PathLike, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


class TensorReader:
    """Checked access to the tensors of one safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.file = SafetensorsFile(self.path)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: file not found") from None
        except ValueError as e:
            raise FormatError(str(e)) from None

    def keys(self) -> list[str]:
        return self.file.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def require(self, names: Sequence[str], optional: Sequence[str] = ()) -> None:
        """Every name in `names` present, nothing beyond `names` + `optional`."""
        present = set(self.file.keys())
        if missing := [n for n in names if n not in present]:
            raise FormatError(f"{self.path}: missing tensor(s) {missing}; found {sorted(present)}")
        if extra := sorted(present - set(names) - set(optional)):
            raise FormatError(f"{self.path}: unexpected tensor(s) {extra}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def read(
        self,
        name: str,
        shape: Sequence[int | None] | None = None,
        dtype: np.dtype | type | None = np.float32,
    ) -> np.ndarray:
        """The tensor as an array (converted to `dtype` unless None); `shape` may hold None for
        a free dimension. Raises FormatError for a missing tensor, wrong shape (a transposed
        matrix included) or NaN/inf values."""
        if name not in self.file:
            raise FormatError(f"{self.path}: missing tensor {name!r}; found {self.file.keys()}")
        got = self.file.shape(name)
        if shape is not None and (
            len(got) != len(shape)
            or any(s is not None and s != g for s, g in zip(shape, got, strict=True))
        ):
            want = tuple("?" if s is None else s for s in shape)
            hint = " (transposed?)" if tuple(reversed(got)) == tuple(shape) else ""
            raise FormatError(
                f"{self.path}: tensor {name!r} has shape {got}, expected {want}{hint}"
            )
        value = np.asarray(self.file.tensor(name))
        floating = value.dtype.kind == "f" or str(value.dtype) == "bfloat16"
        if not floating:  # dictionary weights are floats: an int/bool dtype is a lying header
            raise FormatError(
                f"{self.path}: tensor {name!r} has dtype {value.dtype}, expected a floating-point "
                "dtype (float32, bfloat16, float16 or float64)"
            )
        if not np.isfinite(value.astype(np.float32)).all():
            raise FormatError(f"{self.path}: tensor {name!r} contains NaN or inf")
        return value.astype(dtype) if dtype is not None else np.array(value)
