"""The safetensors reader checks every rule of the format (issue 14).

Each test writes a valid file with the real `safetensors` package (or our writer), breaks one
rule by editing bytes, and expects a SafetensorsError (a ValueError) naming the file, and the
tensor where there is one. Through `TensorReader` (every dictionary format) the same errors
are FormatErrors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemmascope_jax.formats.io import FormatError, TensorReader
from gemmascope_jax.io.safetensors import (
    SafetensorsError,
    SafetensorsFile,
    read_safetensors,
    write_safetensors,
)


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
        "c": np.arange(6, dtype=np.int32),
    }


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, data: bytes, pad_to: int | None = None) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * ((pad_to - len(blob)) if pad_to else (-len(blob) % 8))
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def valid(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    return path


def _raises(path: Path, pattern: str):
    with pytest.raises(SafetensorsError, match=pattern) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)
    with pytest.raises(FormatError, match=pattern):  # the same through every format's reader
        TensorReader(path)
    return err


def test_valid_file_reads_exactly(valid):
    got = read_safetensors(valid)
    for name, value in _tensors().items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype


def test_header_length_a_few_bytes_short_is_refused(valid):
    """The silent wrong load of issue 14: the JSON still parses inside its padding."""
    header, data = _split(valid)
    _join(valid, header, data, pad_to=len(json.dumps(header)) + 16)
    assert SafetensorsFile(valid)  # 16 bytes of padding: valid
    raw = valid.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    valid.write_bytes(struct.pack("<Q", n - 5) + raw[8:])
    _raises(valid, r"byte\(s\) after the end of tensor .*file size")


@pytest.mark.parametrize("delta", [1, 8, 1 << 20])
def test_header_length_too_long(valid, delta):
    raw = valid.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    valid.write_bytes(struct.pack("<Q", n + delta) + raw[8:])
    _raises(valid, r"header|truncated")


def test_header_length_huge_or_tiny(valid, tmp_path):
    raw = valid.read_bytes()
    valid.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    _raises(valid, r"header length \d+ is over")
    valid.write_bytes(struct.pack("<Q", 0) + raw[8:])
    _raises(valid, r"header length 0 is too small")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    _raises(short, "too short")


def test_trailing_bytes_after_the_last_tensor(valid):
    valid.write_bytes(valid.read_bytes() + b"\x00" * 4)
    _raises(valid, r"4 byte\(s\) after the end of tensor 'c'")


@pytest.mark.parametrize("cut", [1, 4, 30])
def test_truncated_data(valid, cut):
    valid.write_bytes(valid.read_bytes()[:-cut])
    _raises(valid, r"tensor '[bc]' ends at byte \d+ but the file has \d+ bytes \(truncated")


def test_offsets_past_the_end(valid):
    header, data = _split(valid)
    header["c"]["data_offsets"] = [o + 1000 for o in header["c"]["data_offsets"]]
    _join(valid, header, data)
    _raises(valid, r"tensor 'c' begins at data byte \d+, which leaves a gap")


def test_overlapping_tensors(valid):
    header, data = _split(valid)
    b0, b1 = header["b"]["data_offsets"]
    header["b"]["data_offsets"] = [b0 - 4, b1 - 4]
    _join(valid, header, data)
    _raises(valid, r"tensor 'b' begins at data byte \d+, which overlaps after tensor 'a'")


def test_data_not_starting_at_zero(valid):
    header, data = _split(valid)
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    _join(valid, header, b"\x00" * 4 + data)
    _raises(valid, r"tensor 'a' begins at data byte 4, which leaves a gap at the start")


def test_tensors_in_any_order_are_fine(valid):
    header, data = _split(valid)
    _join(valid, dict(reversed(list(header.items()))), data)
    np.testing.assert_array_equal(read_safetensors(valid)["a"], _tensors()["a"])


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda e: e.update(shape=[3, 5]), r"tensor 'a' spans 48 bytes but shape \(3, 5\) F32"),
        (lambda e: e.update(dtype="F64"), r"tensor 'a' spans 48 bytes but shape \(3, 4\) F64"),
        (lambda e: e.update(dtype="F16"), r"tensor 'a' spans 48 bytes but shape \(3, 4\) F16"),
        (lambda e: e.update(dtype="Q4"), r"tensor 'a'.*dtype 'Q4' is not one of"),
        (lambda e: e.update(dtype=7), r"tensor 'a'.*dtype 7"),
        (lambda e: e.update(shape=[3, -4]), r"tensor 'a'.*shape must be a list of non-negative"),
        (lambda e: e.update(shape=[3.0, 4]), r"tensor 'a'.*shape must be"),
        (lambda e: e.update(shape=[True, 4]), r"tensor 'a'.*shape must be"),
        (lambda e: e.update(shape="3,4"), r"tensor 'a'.*shape must be"),
        (lambda e: e.update(data_offsets=[0]), r"tensor 'a'.*data_offsets must be"),
        (lambda e: e.update(data_offsets=[0, "48"]), r"tensor 'a'.*data_offsets must be"),
        (lambda e: e.update(data_offsets=[48, 0]), r"tensor 'a'.*end 0 is before begin 48"),
        (lambda e: e.pop("dtype"), r"tensor 'a'.*keys must be exactly"),
        (lambda e: e.update(extra=1), r"tensor 'a'.*keys must be exactly"),
    ],
)
def test_lying_header_entries(valid, change, pattern):
    header, data = _split(valid)
    change(header["a"])
    _join(valid, header, data)
    _raises(valid, pattern)


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        ([1, 2], r"header is a JSON list, not an object"),
        ({"a": 5}, r"tensor 'a'.*a JSON int, not an object"),
        ({"__metadata__": {"k": 1}}, r"'__metadata__' must map strings to strings"),
        ({"__metadata__": "x"}, r"'__metadata__' must map strings to strings"),
    ],
)
def test_header_json_of_the_wrong_shape(tmp_path, header, pattern):
    path = tmp_path / "h.safetensors"
    _join(path, header, b"")
    _raises(path, pattern)


def test_junk_and_duplicate_keys_in_the_header(tmp_path):
    path = tmp_path / "j.safetensors"
    blob = b'{"a": {'
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    _raises(path, "unreadable JSON header")
    blob = b"\xff\xfe\x00\x01 "
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    _raises(path, "unreadable JSON header")
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    blob = f'{{"x":{entry},"x":{entry}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x01")
    _raises(path, "duplicate key 'x'")


def test_folder_and_missing_file(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    _raises(folder, "a folder, not a safetensors file")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(FormatError, match=r"missing\.safetensors: file not found"):
        TensorReader(tmp_path / "missing.safetensors")


def test_zero_dim_tensors_round_trip(tmp_path):
    path = tmp_path / "z.safetensors"
    tensors = {
        "s": np.array(3.5, np.float32),
        "h": np.array(-2.0, ml_dtypes.bfloat16),
        "i": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "v": np.arange(3, dtype=np.float32),
    }
    write_safetensors(path, tensors)
    header, _ = _split(path)
    assert header["s"]["shape"] == [] and header["h"]["shape"] == []
    got = read_safetensors(path)
    for name, value in tensors.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)
    reference = load_file(str(path))  # the safetensors package agrees
    assert reference["s"].shape == () and float(reference["s"]) == 3.5
    save_file({"s": np.array(1.25, np.float32), "t": np.ones(2, np.float32)}, str(path))
    got = read_safetensors(path)
    assert got["s"].shape == () and float(got["s"]) == 1.25
    assert TensorReader(path).read("s", ()).shape == ()


def test_writer_refuses_what_the_reader_would(tmp_path):
    with pytest.raises(TypeError, match="metadata values must be strings"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(2)}, {"k": 1})
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors(tmp_path / "m.safetensors", {"__metadata__": np.zeros(2)})
    assert not list(tmp_path.iterdir())
