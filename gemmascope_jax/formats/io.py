"""Shared reading and writing rules for every dictionary format.

- `FormatError`: a dictionary file that is malformed or disagrees with its config (defined
  in `gemmascope_jax.io.files`, beside `read_json` / `write_json` / `path_inside`, which raise it).
- `TensorReader`: read tensors from one safetensors file, checking name, shape, dtype and
  finiteness, and naming the file and tensor in every error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemmascope_jax.io.files import FormatError
from gemmascope_jax.io.safetensors import SafetensorsFile

__all__ = ["FormatError", "TensorReader"]


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
