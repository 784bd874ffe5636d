"""Tokenize and pack documents into fixed windows `tokens` int32 [batch, seq_len].

Packing rule. Every document is tokenized as `[<bos>, *tokens]` (a chat's template writes the
same leading <bos>) and the documents are concatenated in order, so a <bos> separates them.
The stream is cut into windows of `seq_len`; every window starts with <bos>: a window that
begins inside a document (the document was longer than the space left in the previous
window) gets an extra <bos> and then continues the document where the previous window
stopped. No token is dropped or repeated; documents without tokens are skipped. With a finite
`num_epochs` the last window is right-padded with <pad> and the last batch is filled with
all-<pad> rows, so shapes never change (`tokens != pad_id` is the mask).

Loss mask. With `loss_mask=True` each batch is `{"tokens", "loss_mask"}`, the mask bool
[batch, seq_len] true where a token counts for training: every token but <bos> and <pad>,
except in chats tagged by `sources.LossTokensSource` ("response": only the assistant turns,
"prompt": only the rest; `sources.chat_loss_flags`). The flags travel with their tokens
through the windows (an inserted continuation <bos> is false); `ActivationStream` drops the
positions where it is false, without changing attention.

Order and sharding. Documents are read through a `grain.MapDataset`: host `shard_index` of
`shard_count` takes documents `shard_index::shard_count` (disjoint, covering), shuffles them
with `seed` (grain reshuffles every epoch) and repeats them `num_epochs` times (None: forever).

Checkpointing. `PackedTokens` is a plain Python iterator, subclassing `grain.DatasetIterator`
so that orbax saves it with `grain.checkpoint.CheckpointSave` like any grain iterator. Its
state is three integers (next document index in the repeated per-host order, token offset in
that document, batches emitted) plus the config it belongs to; restoring it re-tokenizes one
document and continues at the exact next batch. grain's own packers (`FirstFitPack...`,
`ConcatThenSplit...`) emit segment ids instead of inserting a <bos> at continuations, so the
packing itself is done here.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from gemmascope_jax.data.sources import encode_document, encode_document_with_loss_mask


class PackedTokens(grain.DatasetIterator):
    """Yields `tokens` int32 [batch_size, seq_len] packed from `source`, or with `loss_mask`
    `{"tokens", "loss_mask"}` (see module doc)."""

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int = 0,
        shard_count: int = 1,
        loss_mask: bool = False,
    ):
        super().__init__()
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.bos_id = int(getattr(tokenizer, "bos_id", 2))
        self.pad_id = int(getattr(tokenizer, "pad_id", 0))
        docs = grain.MapDataset.source(source)
        if shard_count > 1:
            docs = docs[shard_index::shard_count]
        self.num_documents = len(docs)
        if self.num_documents == 0:
            raise ValueError(f"shard {shard_index} of {shard_count} of {source!r} is empty")
        if shuffle:
            docs = docs.shuffle(seed=seed)
        self._docs = docs.repeat(num_epochs)
        self._end = None if num_epochs is None else self.num_documents * num_epochs
        self.config = dict(
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            num_documents=self.num_documents,
        )
        self.loss_mask = bool(loss_mask)
        if self.loss_mask:  # only then: states saved before the option existed still match
            self.config["loss_mask"] = True
        self._doc, self._offset, self._batches = 0, 0, 0
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- grain / orbax checkpoint API ----------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return dict(doc=self._doc, offset=self._offset, batches=self._batches, config=self.config)

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config:
            diff = {
                k: (v, self.config.get(k))
                for k, v in (state.get("config") or {}).items()
                if self.config.get(k) != v
            }
            raise ValueError(f"packed-token state is for another config (saved, now): {diff}")
        self._doc, self._offset = int(state["doc"]), int(state["offset"])
        self._batches = int(state["batches"])

    # -- iteration -----------------------------------------------------------------------------

    def __next__(self) -> np.ndarray | dict[str, np.ndarray]:
        rows, flags = [], []
        while len(rows) < self.batch_size:
            window = self._next_window()
            if window is None:
                break
            rows.append(window[0])
            flags.append(window[1])
        if not rows:
            raise StopIteration
        tokens = np.full((self.batch_size, self.seq_len), self.pad_id, np.int32)
        tokens[: len(rows)] = rows
        self._batches += 1
        if not self.loss_mask:
            return tokens
        mask = np.zeros((self.batch_size, self.seq_len), bool)
        mask[: len(flags)] = flags
        return {"tokens": tokens, "loss_mask": mask}

    @property
    def epoch(self) -> int:
        """The epoch of the next document to be read."""
        return self._doc // self.num_documents

    def _next_window(self) -> tuple[np.ndarray, np.ndarray] | None:
        window = np.full(self.seq_len, self.pad_id, np.int32)
        counts = np.zeros(self.seq_len, bool)
        filled = 0
        while filled < self.seq_len:
            current = self._current_tokens()
            if current is None:
                break
            toks, flags = current
            if filled == 0 and self._offset > 0:  # continuing a document: a fresh <bos>
                window[0] = self.bos_id
                filled = 1
            take = min(self.seq_len - filled, len(toks) - self._offset)
            window[filled : filled + take] = toks[self._offset : self._offset + take]
            counts[filled : filled + take] = flags[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(toks):
                self._doc, self._offset = self._doc + 1, 0
        return (window, counts) if filled else None

    def _current_tokens(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens, loss flags) of the document at `self._doc`, skipping empty ones; None at
        the end."""
        skipped = 0
        while True:
            if self._end is not None and self._doc >= self._end:
                return None
            if self._cached is None or self._cached[0] != self._doc:
                doc = self._docs[self._doc]
                if self.loss_mask:
                    toks, flags = encode_document_with_loss_mask(self.tokenizer, doc)
                else:
                    toks = encode_document(self.tokenizer, doc)
                    flags = toks  # unused
                self._cached = (self._doc, toks, flags)
            toks = self._cached[1]
            if len(toks) == 0 or toks[0] != self.bos_id:
                raise ValueError(f"document {self._doc} does not start with <bos>: {toks[:8]}")
            if len(toks) > 1:
                return toks, self._cached[2]
            skipped += 1
            if skipped >= self.num_documents:
                raise ValueError("no tokens: every document of this shard is empty")
            self._doc, self._offset = self._doc + 1, 0

    def __repr__(self) -> str:
        return f"PackedTokens({self.config}, state={self.get_state()})"
