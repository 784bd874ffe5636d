"""Text sources: random-access sequences of documents for the packing pipeline.

A document is either a text (`str`) or a chat: a list of turns `{"role", "content"}` rendered
with the Gemma 3 chat template (for IT dictionaries). Every source has `len(src)` and
`src[i]` (grain's `RandomAccessDataSource` protocol) and reads lazily where it can, so large
corpora are not loaded into memory:

- `TextFileSource`: plain text files (a file, a directory searched recursively for `*.txt`, or
  a glob). One document per file; `split="blank_lines"` instead makes every blank-line
  separated paragraph a document (this reads the files once to index them).
- `JsonlSource`: one JSON object per line; `field` holds a text or a list of turns.
- `ParquetSource`: a `column` of strings (or of turn lists) read with pyarrow.
- `HFDiskSource`: a `datasets.save_to_disk` directory (`datasets` is imported lazily).
- `data.corpus.open_source(spec)` picks one of these (or an embedded corpus) from a path, a
  glob or a list of them.

Loss tokens. `LossTokensSource(source, "response" | "prompt" | "all")` tags each chat of a
source with which of its tokens count for training (`LossTokensChat`, a list of turns);
`encode_document_with_loss_mask` returns the ids and those flags (see `chat_loss_flags`),
which `PackedTokens(loss_mask=True)` carries into the activation stream.

Errors name the file (and line, row or field): a missing file, a missing field or column, a
record that is neither text nor a chat, an empty corpus.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Document = str | list[dict]
_ROLES = ("system", "user", "assistant", "model")
LOSS_TOKENS = ("all", "response", "prompt")


class SourceError(ValueError):
    """A corpus file or record that cannot be used; the message names the file and record."""


class ListSource:
    """Documents held in memory (`name` appears in error messages)."""

    def __init__(self, docs: Sequence[Document], name: str = "<list>"):
        self.docs, self.name = list(docs), name
        if not self.docs:
            raise SourceError(f"empty corpus: {name} has no documents")
        for i, doc in enumerate(self.docs):
            check_document(doc, f"{name}[{i}]")

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Document:
        return self.docs[i]

    def __repr__(self) -> str:
        return f"ListSource({self.name}, {len(self)} documents)"


class TextFileSource:
    """Plain text files; one document per file, or per blank-line paragraph."""

    def __init__(self, files: Sequence[str | os.PathLike], split: str = "file", encoding="utf-8"):
        if split not in ("file", "blank_lines"):
            raise ValueError(f"split must be 'file' or 'blank_lines', got {split!r}")
        self.files = [Path(f) for f in files]
        self.encoding = encoding
        if not self.files:
            raise SourceError("empty corpus: no text files given")
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"text file not found: {f}")
        self.paragraphs: list[str] | None = None
        if split == "blank_lines":
            self.paragraphs = [
                p.strip()
                for f in self.files
                for p in re.split(r"\n[ \t]*\n", self._read(f))
                if p.strip()
            ]
            if not self.paragraphs:
                raise SourceError(f"empty corpus: no text in {_names(self.files)}")

    def _read(self, f: Path) -> str:
        try:
            return f.read_text(encoding=self.encoding)
        except UnicodeDecodeError as e:
            raise SourceError(f"{f}: not {self.encoding} text ({e})") from None

    def __len__(self) -> int:
        return len(self.paragraphs) if self.paragraphs is not None else len(self.files)

    def __getitem__(self, i: int) -> Document:
        if self.paragraphs is not None:
            return self.paragraphs[i]
        return self._read(self.files[i])

    def __repr__(self) -> str:
        return f"TextFileSource({_names(self.files)}, {len(self)} documents)"


class JsonlSource:
    """One JSON object per line; `field` holds a text or a chat (blank lines are skipped)."""

    def __init__(self, path: str | os.PathLike, field: str = "text"):
        self.path, self.field = Path(path), field
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl file not found: {self.path}")
        offsets, lines = [], []
        with open(self.path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(lineno)
                pos += len(line)
        if not offsets:
            raise SourceError(f"empty corpus: {self.path} has no records")
        self.offsets = np.asarray(offsets, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self[0]  # fail now, not mid-training, on a wrong field name

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Document:
        where = f"{self.path}:{self.lines[i]}"
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.field not in record:
            raise SourceError(f"{where}: field {self.field!r} missing (keys: {sorted(record)})")
        return check_document(record[self.field], f"{where} field {self.field!r}")

    def __repr__(self) -> str:
        return f"JsonlSource({self.path}, field={self.field!r}, {len(self)} documents)"


class ParquetSource:
    """A column of texts (or turn lists) in a parquet file, read once with pyarrow."""

    def __init__(self, path: str | os.PathLike, column: str = "text"):
        import pyarrow.parquet as pq

        self.path, self.column = Path(path), column
        if not self.path.is_file():
            raise FileNotFoundError(f"parquet file not found: {self.path}")
        names = pq.read_schema(self.path).names
        if column not in names:
            raise SourceError(f"{self.path}: column {column!r} missing (columns: {names})")
        self.values = pq.read_table(self.path, columns=[column], memory_map=True).column(column)
        if len(self.values) == 0:
            raise SourceError(f"empty corpus: {self.path} has no rows")
        self[0]

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> Document:
        where = f"{self.path} row {i} column {self.column!r}"
        return check_document(self.values[i].as_py(), where)

    def __repr__(self) -> str:
        return f"ParquetSource({self.path}, column={self.column!r}, {len(self)} documents)"


class HFDiskSource:
    """A `datasets` directory written by `save_to_disk` (memory-mapped arrow, lazy rows)."""

    def __init__(self, path: str | os.PathLike, field: str = "text", split: str | None = None):
        import datasets

        self.path, self.field = Path(path), field
        if not self.path.is_dir():
            raise FileNotFoundError(f"datasets directory not found: {self.path}")
        try:
            ds = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as e:
            raise SourceError(f"{self.path}: not a saved datasets directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise SourceError(f"{self.path}: a DatasetDict; pass split= one of {list(ds)}")
            if split not in ds:
                raise SourceError(f"{self.path}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        if field not in ds.column_names:
            raise SourceError(f"{self.path}: field {field!r} missing (columns: {ds.column_names})")
        if len(ds) == 0:
            raise SourceError(f"empty corpus: {self.path} has no rows")
        self.ds = ds.select_columns([field])
        self[0]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Document:
        return check_document(self.ds[int(i)][self.field], f"{self.path} row {i} {self.field!r}")

    def __repr__(self) -> str:
        return f"HFDiskSource({self.path}, field={self.field!r}, {len(self)} documents)"


class ConcatSource:
    """Several sources read one after another."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        if not self.sources:
            raise SourceError("empty corpus: no sources given")
        self.starts = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> Document:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        return self.sources[k][i - self.starts[k]]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources})"


class SubsetSource:
    """The documents of `source` at `indices` (e.g. a held-out split)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        if len(self.indices) == 0:
            raise SourceError(f"empty corpus: an empty subset of {source!r}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Document:
        return self.source[int(self.indices[i])]


class LossTokensChat(list):
    """A chat (list of turns) tagged with which of its tokens count: `loss_tokens` is "all",
    "response" (the assistant turns) or "prompt" (everything else)."""

    loss_tokens: str = "all"


class LossTokensSource:
    """The documents of `source`, chats tagged with `loss_tokens` (texts: every token)."""

    def __init__(self, source: Any, loss_tokens: str):
        if loss_tokens not in LOSS_TOKENS:
            raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
        self.source, self.loss_tokens = source, loss_tokens

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Document:
        doc = self.source[i]
        if isinstance(doc, str):
            return doc
        tagged = LossTokensChat(doc)
        tagged.loss_tokens = self.loss_tokens
        return tagged

    def __repr__(self) -> str:
        return f"LossTokensSource({self.source!r}, {self.loss_tokens!r})"


def source_labels(source: Any) -> list[str | None] | None:
    """Each document's source label, or None where `source` carries none (`labels` on a
    labelled corpus; through `ConcatSource`, `LossTokensSource` and `SubsetSource`)."""
    if isinstance(source, LossTokensSource):
        return source_labels(source.source)
    if isinstance(source, SubsetSource):
        inner = source_labels(source.source)
        return None if inner is None else [inner[int(i)] for i in source.indices]
    if isinstance(source, ConcatSource):
        parts = [source_labels(s) for s in source.sources]
        if all(p is None for p in parts):
            return None
        return [
            x for p, s in zip(parts, source.sources, strict=True) for x in (p or [None] * len(s))
        ]
    labels = getattr(source, "labels", None)
    return None if labels is None else list(labels)


def heldout_sources(source: Any) -> tuple[str, ...]:
    """The source labels a corpus holds out (`heldout_sources`, through the wrappers)."""
    if isinstance(source, LossTokensSource | SubsetSource):
        return heldout_sources(source.source)
    if isinstance(source, ConcatSource):
        return tuple(h for s in source.sources for h in heldout_sources(s))
    return tuple(getattr(source, "heldout_sources", ()) or ())


def split_documents(source: Any, holdout: float = 0.1, seed: int = 0):
    """Split a source into `(train, heldout)`; deterministic given `seed`.

    By source where the corpus names held-out sources (the mixed embedded corpus: every
    document whose label is in `heldout_sources` is held out, all others train; training
    never sees those sources). Otherwise by document: a `holdout` fraction at random.
    """
    held = set(heldout_sources(source))
    labels = source_labels(source) if held else None
    if labels is not None:
        out = [i for i, label in enumerate(labels) if label in held]
        keep = [i for i, label in enumerate(labels) if label not in held]
        if out and keep:
            return SubsetSource(source, keep), SubsetSource(source, out)
    n = len(source)
    k = max(1, round(holdout * n))
    if not 0 < holdout < 1 or k >= n:
        raise ValueError(f"holdout={holdout} leaves no train or no held-out documents of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return SubsetSource(source, np.sort(perm[k:])), SubsetSource(source, np.sort(perm[:k]))


def check_document(doc: Any, where: str) -> Document:
    """Return `doc` if it is a text or a chat (non-empty list of {role, content} turns)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, list) and doc:
        for j, turn in enumerate(doc):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise SourceError(f"{where}: turn {j} is not a {{role, content}} object: {turn!r}")
            if turn["role"] not in _ROLES:
                raise SourceError(f"{where}: turn {j} has role {turn['role']!r}, not in {_ROLES}")
        return doc
    raise SourceError(f"{where}: expected a text or a list of chat turns, got {_short(doc)}")


def encode_document(tokenizer: Any, doc: Document, chat_generation_prompt: bool = False):
    """Token ids int32 [n] of a document, starting with <bos>.

    Texts use `tokenizer.encode(text)` (BOS added, no EOS); chats use `tokenizer.chat(turns,
    add_generation_prompt=...)`, whose template writes the one BOS.
    """
    if isinstance(doc, str):
        ids = tokenizer.encode(doc)
    else:
        ids = tokenizer.chat(doc, add_generation_prompt=chat_generation_prompt)
    return np.asarray(ids, np.int32)


def chat_loss_flags(tokenizer: Any, chat: list[dict], loss_tokens: str) -> np.ndarray:
    """bool [n] over `tokenizer.chat(chat, add_generation_prompt=False)`: which tokens count.

    "response": the tokens of every assistant turn after its `<start_of_turn>model\n`
    header, i.e. the content and the `<end_of_turn>` and newline that close it (found by
    rendering the chat up to the turn with and without it); "prompt": all others but the
    leading <bos> (system and user turns, turn headers); "all": every token but <bos>.
    (<bos> is never trained on either way: the activation stream drops it.)
    """
    ids = list(tokenizer.chat(chat, add_generation_prompt=False))
    flags = np.zeros(len(ids), bool)
    if loss_tokens == "all":
        flags[:] = True
    else:
        for k, turn in enumerate(chat):
            if turn["role"] in ("assistant", "model"):
                start = _common_prefix(ids, tokenizer.chat(chat[:k], add_generation_prompt=True))
                end = _common_prefix(ids, tokenizer.chat(chat[: k + 1]))
                flags[start:end] = True
        if loss_tokens == "prompt":
            flags = ~flags
        elif loss_tokens != "response":
            raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
    flags[:1] = False
    return flags


def encode_document_with_loss_mask(tokenizer: Any, doc: Document):
    """`(ids int32 [n], flags bool [n])`: `encode_document`'s ids and which tokens count for
    training (all but <bos>, unless `doc` is a `LossTokensChat`; see `chat_loss_flags`)."""
    mode = getattr(doc, "loss_tokens", "all")
    if isinstance(doc, str) or mode == "all":
        ids = encode_document(tokenizer, doc)
        flags = np.ones(len(ids), bool)
        flags[:1] = False
        return ids, flags
    flags = chat_loss_flags(tokenizer, list(doc), mode)
    return encode_document(tokenizer, list(doc)), flags


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _names(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0]} and {len(files) - 1} more"


def _short(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
