"""Fuzz corpus: every dictionary kind, saved in every format it fits, with every file damaged
in every way we know of, must either be refused with a FormatError / ValueError / OSError
whose message names the folder (or a file in it), or load numbers identical to the
undamaged folder's. Nothing may crash with another exception, hang, or load wrong numbers.

Kinds: SAE, transcoder, skip-transcoder, CLT, crosscoder (tiny, float32, seeded).
Formats: native (all), Gemma Scope 2 (all), SAELens (single-layer kinds), circuit-tracer
(transcoder and skip-transcoder sets of two layers, CLT).

Mutation classes, applied to every file of every folder (`MUTATION_CLASSES`):

- safetensors files: `truncate` (several offsets: empty, inside the length, inside the
  header, at the data start, inside the data, one byte short), `header_len_long`,
  `header_len_short`, `header_len_huge`, `offsets_past_end`, `shape_lie`, `dtype_lie`,
  `nan_inf` (one NaN / +inf / -inf per tensor);
- every file: `missing_file`, `folder_instead`;
- JSON / YAML files: `junk_text`, `wrong_type` (each key, and each key one level down, set
  to -7, -1.5, "junk", [-1], {}, null and, unless it is a bool, true), `missing_key`.

`case_counts()` gives the number of cases per class (run this file with `-s` to print it).
"""

from __future__ import annotations

import collections
import json
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import load_dictionary, save_dictionary
from gemmascope_jax.formats.io import FormatError

D, F, L = 8, 12, 2
MODEL = "google/gemma-3-270m"
SEED = 1234
ALLOWED = (FormatError, ValueError, OSError)
WRONG_VALUES = (-7, -1.5, "junk", [-1], {}, None, True)
JUNK_TEXTS = ("", "{not json", "[1, 2, 3]", "null", "\xff\x00garbage", "- a\n- b\n", "a: [\n", "7")
MUTATION_CLASSES = (
    "truncate",
    "header_len_long",
    "header_len_short",
    "header_len_huge",
    "offsets_past_end",
    "shape_lie",
    "dtype_lie",
    "nan_inf",
    "missing_file",
    "folder_instead",
    "junk_text",
    "wrong_type",
    "missing_key",
)


# ---- the dictionaries ------------------------------------------------------------------------


def _cfg(kind: str, **kw) -> DictionaryConfig:
    multi = kind in ("clt", "crosscoder")
    return DictionaryConfig(
        kind=kind,
        architecture="jumprelu",
        d_in=D,
        d_out=D,
        width=F,
        layers=kw.pop("layers", (0, 1) if multi else (1,)),
        model_name=MODEL,
        model_num_layers=kw.pop("model_num_layers", 18),
        l0_target=5.0,
        **kw,
    )


def _tset(kind: str):
    members = [
        random_dictionary(
            DictionaryConfig(
                kind=kind,
                architecture="jumprelu",
                d_in=D,
                d_out=D,
                width=F,
                layers=(i,),
                input_sites=(f"mlp_in.{i}",),
                model_name=MODEL,
                model_num_layers=L,
            ),
            seed=SEED + i,
        )
        for i in range(L)
    ]
    return TranscoderSet.from_transcoders(members)


# kind -> the formats it fits
FORMATS_OF = {
    "sae": ("native", "gemma-scope-2", "saelens"),
    "transcoder": ("native", "gemma-scope-2", "saelens"),
    "skip_transcoder": ("native", "gemma-scope-2", "saelens"),
    "transcoder_set": ("circuit-tracer",),
    "skip_transcoder_set": ("circuit-tracer",),
    "clt": ("native", "gemma-scope-2", "circuit-tracer"),
    "crosscoder": ("native", "gemma-scope-2"),
}


def _original(kind: str):
    if kind.endswith("_set"):
        return _tset(kind.removesuffix("_set"))
    kw = {
        "skip_transcoder": {"skip": True},
        "clt": {"layers": (0, 1), "model_num_layers": L},
        "crosscoder": {"layers": (3, 7)},
    }.get(kind, {})
    return random_dictionary(_cfg(kind, **kw), seed=SEED + list(FORMATS_OF).index(kind))


def _numbers(obj) -> dict[str, np.ndarray]:
    if isinstance(obj, TranscoderSet):
        return {f"{i}/{k}": v for i, t in enumerate(obj) for k, v in _numbers(t).items()}
    return {k: np.asarray(v) for k, v in obj.arrays().items()}


# ---- mutations -------------------------------------------------------------------------------

Mutation = Callable[[Path], None]  # damages the file at the given path


def _split(raw: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _set_len(value: int) -> Mutation:
    return lambda p: p.write_bytes(struct.pack("<Q", value) + p.read_bytes()[8:])


def _edit_header(edit: Callable[[dict], None]) -> Mutation:
    def mutate(p: Path) -> None:
        _, header, data = _split(p.read_bytes())
        edit(header)
        p.write_bytes(_join(header, data))

    return mutate


def _poke(name: str, value: float, where: str) -> Mutation:
    """Overwrite the first or last element of float tensor `name` with `value`."""

    def mutate(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        n, header, _ = _split(bytes(raw))
        entry = header[name]
        dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[entry["dtype"]]
        start, end = (8 + n + o for o in entry["data_offsets"])
        size = np.dtype(dtype).itemsize
        at = start if where == "first" else end - size
        raw[at : at + size] = np.array(value, dtype).tobytes()
        p.write_bytes(bytes(raw))

    return mutate


def _safetensors_mutations(
    raw: bytes, rng: np.random.Generator
) -> Iterator[tuple[str, str, Mutation]]:
    n, header, data = _split(raw)
    size = len(raw)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    cuts = {0, 4, 8, 8 + n // 2, 8 + n, 8 + n + len(data) // 2, size - 1}
    cuts.add(int(rng.integers(8 + n, size)))
    for cut in sorted(c for c in cuts if c < size):
        yield "truncate", f"cut@{cut}", lambda p, c=cut: p.write_bytes(p.read_bytes()[:c])
    for delta in (1, 8, 64, int(rng.integers(2, 1000))):
        yield "header_len_long", f"+{delta}", _set_len(n + delta)
    for delta in sorted({1, 3, 8, n // 2, int(rng.integers(1, n))}):
        yield "header_len_short", f"-{delta}", _set_len(n - delta)
    for value in (2**31, 2**40, 2**63, 2**64 - 1):
        yield "header_len_huge", f"={value}", _set_len(value)
    last = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])
    for name in tensors:

        def past(h, name=name):
            h[name]["data_offsets"] = [o + size for o in h[name]["data_offsets"]]

        yield "offsets_past_end", f"{name}+size", _edit_header(past)

    def longer(h):
        h[last]["data_offsets"][1] += 4

    yield "offsets_past_end", f"{last}.end+4", _edit_header(longer)
    for name, entry in tensors.items():
        shape = entry["shape"]
        lies = {
            "doubled": [2 * shape[0], *shape[1:]] if shape else [2],
            "leading1": [1, *shape],
            "dropped": shape[1:] if len(shape) > 1 else [],
        }
        if len(shape) >= 2 and shape != shape[::-1]:
            lies["reversed"] = shape[::-1]
        if len(shape) >= 2:
            lies["flattened"] = [int(np.prod(shape))]
        for label, lie in lies.items():
            yield (
                "shape_lie",
                f"{name}:{label}",
                _edit_header(lambda h, k=name, s=lie: h[k].update(shape=s)),
            )
        for dtype in ("F16", "BF16", "F64", "I32", "X9"):
            if dtype != entry["dtype"]:
                yield (
                    "dtype_lie",
                    f"{name}:{dtype}",
                    _edit_header(lambda h, k=name, t=dtype: h[k].update(dtype=t)),
                )
        if int(np.prod(shape)) > 0:
            for value, where in ((np.nan, "first"), (np.inf, "last"), (-np.inf, "first")):
                yield "nan_inf", f"{name}:{value}@{where}", _poke(name, value, where)


def _text_mutations(path: Path) -> Iterator[tuple[str, str, Mutation]]:
    is_yaml = path.suffix in (".yaml", ".yml")
    for i, junk in enumerate(JUNK_TEXTS):
        yield (
            "junk_text",
            f"junk{i}",
            lambda p, j=junk: p.write_bytes(j.encode("utf-8", "surrogateescape")),
        )
    load = yaml.safe_load if is_yaml else json.loads
    dump = (lambda v: yaml.safe_dump(v, sort_keys=False)) if is_yaml else json.dumps
    original = load(path.read_text())
    if not isinstance(original, dict):
        return
    keys = [(k,) for k in original]
    keys += [(k, k2) for k, v in original.items() if isinstance(v, dict) for k2 in v]

    def setter(keypath, value=None, delete=False):
        def mutate(p: Path) -> None:
            doc = load(p.read_text())
            target = doc
            for k in keypath[:-1]:
                target = target[k]
            if delete:
                del target[keypath[-1]]
            else:
                target[keypath[-1]] = value
            p.write_text(dump(doc))

        return mutate

    for keypath in keys:
        label = ".".join(map(str, keypath))
        current = original
        for k in keypath:
            current = current[k]
        for value in WRONG_VALUES:
            if isinstance(value, bool) and isinstance(current, bool):
                continue  # a valid value, not a wrong type
            yield "wrong_type", f"{label}={value!r}", setter(keypath, value)
        yield "missing_key", label, setter(keypath, delete=True)


def _mutations(folder: Path, rng) -> Iterator[tuple[str, str, str, Mutation]]:
    """(file name, class, label, mutation) for every file of `folder`."""
    for path in sorted(folder.iterdir()):
        name = path.name
        yield name, "missing_file", "", lambda p: p.unlink()

        def folder_instead(p: Path) -> None:
            p.unlink()
            p.mkdir()
            (p / "junk.txt").write_text("x")

        yield name, "folder_instead", "", folder_instead
        if name.endswith(".safetensors"):
            for cls, label, m in _safetensors_mutations(path.read_bytes(), rng):
                yield name, cls, label, m
        elif path.suffix in (".json", ".yaml", ".yml"):
            for cls, label, m in _text_mutations(path):
                yield name, cls, label, m


# ---- the corpus --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (pristine folder, numbers as loaded from it)."""
    root = tmp_path_factory.mktemp("fuzz_originals")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, formats in FORMATS_OF.items():
            obj = _original(kind)
            for fmt in formats:
                folder = save_dictionary(obj, root / f"{kind}__{fmt}", fmt)
                loaded = load_dictionary(folder)
                expected, got = _numbers(obj), _numbers(loaded)
                assert expected.keys() == got.keys(), (kind, fmt)
                out[f"{kind}__{fmt}"] = (folder, got)
    return out


CASE_NAMES = [f"{kind}__{fmt}" for kind, formats in FORMATS_OF.items() for fmt in formats]
COUNTS: collections.Counter = collections.Counter()
OUTCOMES: collections.Counter = collections.Counter()


# Keys whose absence, or another valid value, legitimately changes the numbers: the format
# documents a default (SAELens: `apply_b_dec_to_input` defaults to true for an SAE).
MEANINGFUL = {("saelens", "apply_b_dec_to_input")}


def _check(folder: Path, expected: dict, meaningful: bool = False) -> str:
    """'refused', 'identical' or (for a `MEANINGFUL` key) 'changed'; raises AssertionError
    for a crash or a silent wrong load."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_dictionary(folder)
    except ALLOWED as e:
        if isinstance(e.__cause__, (TypeError, KeyError, AttributeError, IndexError)):
            raise AssertionError(f"caught only by load_dictionary's safety net: {e}") from e
        message = str(e)
        assert str(folder) in message or folder.name in message, (
            f"{type(e).__name__} does not name the folder or file: {message}"
        )
        return "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"crashed with {type(e).__name__}: {e}") from e
    got = _numbers(loaded)
    same = got.keys() == expected.keys() and all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)
        for k, v in expected.items()
    )
    if meaningful and not same:
        return "changed"
    assert got.keys() == expected.keys(), f"loaded other tensors: {sorted(got)}"
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), f"silently loaded different numbers for {name}"
    return "identical"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_fuzz_corpus(corpus, case, tmp_path):
    pristine, expected = corpus[case]
    rng = np.random.default_rng([SEED, CASE_NAMES.index(case)])
    failures, slow = [], []
    for i, (file, cls, label, mutate) in enumerate(_mutations(pristine, rng)):
        folder = tmp_path / f"{i:04d}" / case
        shutil.copytree(pristine, folder)
        mutate(folder / file)
        started = time.perf_counter()
        try:
            fmt = case.split("__")[1]
            meaningful = cls in ("wrong_type", "missing_key") and any(
                label.split("=")[0].split(".")[-1] == key for f, key in MEANINGFUL if f == fmt
            )
            outcome = _check(folder, expected, meaningful)
        except AssertionError as e:
            failures.append(f"{file} {cls} {label}: {str(e).splitlines()[0]}")
            outcome = "failed"
        if (elapsed := time.perf_counter() - started) > 5:
            slow.append(f"{file} {cls} {label}: {elapsed:.1f}s")
        COUNTS[cls] += 1
        OUTCOMES[outcome] += 1
        shutil.rmtree(folder.parent)
    assert not failures, f"{len(failures)} bad outcome(s):\n" + "\n".join(failures[:40])
    assert not slow, f"slow loads (a hang?): {slow}"


def test_every_mutation_class_is_exercised(corpus):
    counts = case_counts(corpus)
    print("\nfuzz cases per mutation class:", dict(counts), "total", sum(counts.values()))
    assert set(counts) == set(MUTATION_CLASSES)


def case_counts(corpus) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for case in CASE_NAMES:
        rng = np.random.default_rng([SEED, CASE_NAMES.index(case)])
        for _, cls, _, _ in _mutations(corpus[case][0], rng):
            counts[cls] += 1
    return counts


def test_native_wrong_typed_field_names_file_and_key(corpus, tmp_path):
    folder = shutil.copytree(corpus["sae__native"][0], tmp_path / "n")
    meta = json.loads((folder / "dictionary.json").read_text())
    for key, value, pattern in [
        ("tensors", -7, r"dictionary\.json: 'tensors' must be a list"),
        ("tensors", [{"name": "w_enc", "shape": [-1], "dtype": "float32"}], r"'tensors'\[0\]"),
        ("format_version", -1, r"dictionary\.json: 'format_version' must be a positive int"),
        ("format_version", True, r"dictionary\.json: 'format_version' must be a positive int"),
        ("config", {**meta["config"], "width": -7}, r"dictionary\.json: invalid config.*width"),
    ]:
        (folder / "dictionary.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(FormatError, match=pattern) as err:
            load_dictionary(folder)
        assert str(folder / "dictionary.json") in str(err.value)
