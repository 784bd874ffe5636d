"""The Gemma 3 tokenizer and chat template.

`Tokenizer` wraps a transformers tokenizer (`.hf`) and always carries the Gemma 3 IT chat
template: tokenizers converted from a GGUF file have none. Converting a GGUF vocabulary takes
tens of seconds, so `load_tokenizer_from_gguf` caches the converted HF files on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
# Instruction-tuned models end a reply with <end_of_turn>; <eos> ends a document.
IT_STOP_IDS = (EOS_ID, END_OF_TURN_ID)

# The template shipped with the Gemma 3 IT checkpoints. A leading system message is not a turn:
# its text is prefixed to the first user turn; `assistant` is rendered as `model`.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

CHAT_ROLES = ("system", "user", "model", "assistant")


def check_chat(messages: Sequence[Any]) -> list[dict]:
    """Validate a chat: a list of {role, content} dicts, optional system first, then user and
    model turns alternating, starting with user. `assistant` is accepted for `model`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("a chat must be a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content': {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"chat message {i} has unknown role {m['role']!r}; use {CHAT_ROLES}")
        out.append(dict(m))
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        role = "model" if m["role"] == "assistant" else m["role"]
        if role != expected:
            offset = len(out) - len(turns)
            raise ValueError(
                f"chat roles out of order: message {i + offset} is {m['role']!r}, expected "
                f"{expected!r} (optional system first, then user/model alternating)"
            )
    return out


def prompt_ids(tokenizer, text_or_chat: str | Sequence[dict], add_generation_prompt=True):
    """Token ids (BOS first) of a plain string or a chat rendered with the Gemma 3 template."""
    if isinstance(text_or_chat, str):
        return tokenizer.encode(text_or_chat)
    chat = check_chat(text_or_chat)
    return tokenizer.chat(chat, add_generation_prompt=add_generation_prompt)


_CACHE_ENV = "GEMMASCOPE_JAX_CACHE"


class Tokenizer:
    """A Gemma 3 tokenizer with the IT chat template guaranteed to be set."""

    def __init__(self, hf: Any):
        if not getattr(hf, "chat_template", None):
            hf.chat_template = GEMMA3_CHAT_TEMPLATE
        if hf.pad_token_id is None:
            hf.pad_token_id = PAD_ID
        hf.padding_side = "left"  # Gemma pads on the left so generation continues at the end.
        self.hf = hf

    # -- ids ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int:
        return int(self.hf.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation for IT models: <eos> and <end_of_turn>."""
        return (self.eos_id, int(self.hf.convert_tokens_to_ids("<end_of_turn>")))

    # -- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with a leading <bos> unless `add_bos=False` (never an <eos>)."""
        ids = self.hf.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, a numpy/jax array or a single id)."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model sees it (a string starting with <bos>)."""
        from jinja2.exceptions import TemplateError

        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            raise ValueError(f"invalid chat: {e}") from e

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat; the template writes the one <bos>, so none is added here."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return list(self.hf.encode(text, add_special_tokens=False))

    def batch(
        self,
        texts_or_id_lists: Sequence[str | Sequence[int]],
        max_length: int | None = None,
        pad_left: bool = True,
        add_bos: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad a batch of strings (encoded with `add_bos`) or id lists to one length.

        Returns int32 `(ids, mask)`, both [batch, seq]; mask is 1 on real tokens. Inputs longer
        than `max_length` keep their first `max_length` tokens. Padding is on the left by
        default (Gemma's padding side), so the last column holds every row's last token.
        """
        if len(texts_or_id_lists) == 0:
            raise ValueError("batch() needs at least one input")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rows = []
        for i, item in enumerate(texts_or_id_lists):
            ids = self.encode(item, add_bos) if isinstance(item, str) else [int(t) for t in item]
            if not ids:
                raise ValueError(f"batch input {i} is empty")
            rows.append(ids[:max_length] if max_length is not None else ids)
        seq = max(len(r) for r in rows)
        tokens = np.full((len(rows), seq), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), seq), dtype=np.int32)
        for i, r in enumerate(rows):
            sl = slice(seq - len(r), seq) if pad_left else slice(0, len(r))
            tokens[i, sl] = r
            mask[i, sl] = 1
        return tokens, mask

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the HF tokenizer files (chat template included); reload with AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        return directory


def load_tokenizer_from_dir(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a local HF model directory (never touches the network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return Tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def default_cache_dir() -> Path:
    """Where converted tokenizers live: `$GEMMASCOPE_JAX_CACHE/tokenizers` or ~/.cache/..."""
    root = os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "gemmascope_jax"
    return Path(root) / "tokenizers"


def _cache_key(gguf_path: Path) -> str:
    """Name + size + mtime of the GGUF file and the transformers version (conversion code)."""
    import transformers

    st = gguf_path.stat()
    raw = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return f"{gguf_path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def _looks_valid(hf: Any) -> bool:
    """A cheap check that a cached tokenizer is whole: ids, specials and template survived."""
    return (
        len(hf) > END_OF_TURN_ID
        and hf.bos_token_id is not None
        and hf.eos_token_id is not None
        and hf.chat_template == GEMMA3_CHAT_TEMPLATE
    )


def load_tokenizer_from_gguf(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """Load the tokenizer embedded in a GGUF file, converting it once and caching the result.

    The conversion (transformers' GGUF vocab reader) takes ~15-20 s for Gemma 3's 262k vocab; the
    cached HF files load in a few seconds. The cache entry is written to a temp dir and renamed
    into place, so a crash never leaves a half-written entry; an unreadable entry is rebuilt.
    """
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / _cache_key(gguf_path)

    if entry.is_dir():
        try:
            cached = load_tokenizer_from_dir(entry)
            if _looks_valid(cached.hf):
                return cached
        except Exception:  # corrupt or from an incompatible version: rebuild it
            pass
        shutil.rmtree(entry, ignore_errors=True)

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok = Tokenizer(hf)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the entry is meant to be shared
            tok.save(tmp)
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to another writer, or no space
    except OSError:
        pass  # an unwritable cache only costs speed
    return tok
