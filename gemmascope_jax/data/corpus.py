"""The embedded default corpus: the documentation topics that ship with CPython.

`pydoc_data.topics.topics` (the text `help("if")` prints) is part of the standard library of
every CPython install, so the default corpus needs no download. Each topic is one document,
in sorted topic-name order (deterministic). On CPython 3.11.7 it has 79 documents, 464,970
characters and **112,706 Gemma 3 tokens** (112,785 with one <bos> per document), measured by
`tests/test_data_sources.py::test_embedded_corpus_token_count`; other Python versions ship
slightly different topics.
"""

from __future__ import annotations

import sys
from typing import Any

from gemmascope_jax.data.sources import ListSource, encode_document

EMBEDDED_CORPUS_NAME = "pydoc_data.topics"


def embedded_corpus() -> ListSource:
    """The CPython documentation topics as a source of text documents (sorted by name)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    version = ".".join(map(str, sys.version_info[:3]))
    source = ListSource([topics[k] for k in names], name=f"{EMBEDDED_CORPUS_NAME} ({version})")
    source.titles = names
    return source


def count_tokens(source: Any, tokenizer: Any, include_bos: bool = False) -> int:
    """Number of tokens in all documents of `source` (without the one <bos> each by default)."""
    total = 0
    for i in range(len(source)):
        total += len(encode_document(tokenizer, source[i])) - (0 if include_bos else 1)
    return total
