"""Activation stream: token batches -> Gemma 3 sites -> shuffled training batches.

`ActivationStream(model, sites, token_batches, batch_tokens=...)` yields dicts
`site -> float32 [batch_tokens, d_site]`, all sites aligned on the same tokens. Per token batch
it runs one jitted forward (`model.jitted(capture=sites, logits=False)`, which stops after the
deepest layer a site needs), drops the positions whose token is in `drop_ids` (<bos> and <pad>
by default: GS2 dictionaries are not trained on <bos>) and those where a given mask is 0.

Shuffle buffer. Kept tokens are gathered into chunks of at least `buffer_tokens` tokens (whole
token batches, default 8 x `batch_tokens`); chunk `c` is permuted with a generator seeded by
`(seed, c)`. Training batches are consecutive slices of the concatenation of the permuted
chunks, so a batch mixes tokens from every sequence of its chunk, and a batch that crosses a
chunk boundary takes the rest of one chunk and the start of the next.

Resume. Every training batch is a deterministic function of (token stream, seed, chunk sizes),
so the state is small and JSON-able: the current chunk index, the token iterator's state at
the start of that chunk, and the read position in the chunk. `set_state` restores the token
iterator to the chunk start, recomputes that one chunk (the forward passes are repeated, the
buffer's RNG is derived from the chunk index) and continues at the exact next batch. The token
iterator must have `get_state`/`set_state` (`PackedTokens` or any grain iterator).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.gemma3.tokenizer import BOS_ID, PAD_ID

Batch = dict[str, np.ndarray]


class ActivationStream(grain.DatasetIterator):
    """Shuffled site activations `{site: float32 [batch_tokens, d]}` from token batches.

    token_batches: iterator of `tokens` int [B, T], or `(tokens, mask)` / `{"tokens", "mask"}`
        with mask [B, T] 1 on real tokens (passed to the model as `attention_mask`).
    forward: optional replacement for `model.jitted(capture=sites, logits=False)`, called as
        `forward(tokens, attention_mask)` and returning a `Gemma3Output` or a dict of sites.
    drop_remainder: at the end of a finite token stream, drop the last partial batch
        (default) or yield it with fewer rows.
    """

    def __init__(
        self,
        model: Any,
        sites: Sequence[str],
        token_batches: Iterator,
        *,
        batch_tokens: int,
        buffer_tokens: int | None = None,
        seed: int = 0,
        drop_ids: Iterable[int] = (BOS_ID, PAD_ID),
        forward: Callable | None = None,
        drop_remainder: bool = True,
    ):
        super().__init__()
        self.sites = tuple(sites)
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites must be non-empty and distinct, got {self.sites}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self.buffer_tokens = buffer_tokens if buffer_tokens is not None else 8 * batch_tokens
        self.seed, self.drop_remainder = seed, drop_remainder
        self.drop_ids = np.asarray(sorted(set(drop_ids)), np.int64)
        self.tokens = token_batches
        self.forward = forward or model.jitted(capture=self.sites, logits=False)
        self._chunk = -1  # index of the chunk in `_buf`
        self._chunk_start = self._token_state()  # token state where chunk `_chunk` began
        self._buf: Batch = {}
        self._pos = 0
        self._exhausted = False

    # -- grain / orbax checkpoint API ----------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return dict(
            chunk=self._chunk,
            chunk_start=copy.deepcopy(self._chunk_start),
            pos=self._pos,
            seed=self.seed,
            sites=list(self.sites),
        )

    def set_state(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or tuple(state["sites"]) != self.sites:
            raise ValueError(
                f"activation-stream state is for seed {state['seed']} and sites "
                f"{state['sites']}, this stream has seed {self.seed} and sites {self.sites}"
            )
        self.tokens.set_state(copy.deepcopy(state["chunk_start"]))
        self._chunk, self._buf, self._exhausted = int(state["chunk"]), {}, False
        self._chunk_start = copy.deepcopy(state["chunk_start"])
        if self._chunk >= 0:
            buf = self._fill_chunk(self._chunk)
            if buf is None:
                raise ValueError(f"token stream ended before chunk {self._chunk} of the state")
            self._buf = buf
        self._pos = int(state["pos"])

    # -- iteration -----------------------------------------------------------------------------

    def __next__(self) -> Batch:
        pieces: list[Batch] = []
        need = self.batch_tokens
        while need > 0:
            left = self._rows(self._buf) - self._pos
            if left == 0:
                if not self._next_chunk():
                    break
                continue
            take = min(left, need)
            pieces.append({s: a[self._pos : self._pos + take] for s, a in self._buf.items()})
            self._pos += take
            need -= take
        if need == self.batch_tokens or (need > 0 and self.drop_remainder):
            raise StopIteration
        if len(pieces) == 1:
            return pieces[0]  # views into the buffer: every row is handed out once
        return {s: np.concatenate([p[s] for p in pieces]) for s in self.sites}

    def _next_chunk(self) -> bool:
        if self._exhausted:
            return False
        start = self._token_state()
        buf = self._fill_chunk(self._chunk + 1)
        if buf is None:
            self._exhausted = True
            return False
        self._chunk, self._chunk_start, self._buf, self._pos = self._chunk + 1, start, buf, 0
        return True

    def _fill_chunk(self, chunk: int) -> Batch | None:
        """Read whole token batches until >= buffer_tokens kept tokens, run the model, permute."""
        batches, kept = [], 0
        while kept < self.buffer_tokens:
            try:
                tokens, mask = _split_batch(next(self.tokens))
            except StopIteration:
                break
            keep = ~np.isin(tokens, self.drop_ids)
            if mask is not None:
                keep &= mask.astype(bool)
            batches.append((tokens, mask, keep))
            kept += int(keep.sum())
        if kept == 0:
            return None
        # Dispatch every forward first (JAX runs them asynchronously), then gather on the host.
        outs = [
            self.forward(jnp.asarray(t), None if m is None else jnp.asarray(m))
            for t, m, _ in batches
        ]
        acts = {s: [] for s in self.sites}
        for out, (_, _, keep) in zip(outs, batches, strict=True):
            values = out.sites if hasattr(out, "sites") else out
            for s in self.sites:
                a = np.asarray(values[s], dtype=np.float32)
                acts[s].append(a.reshape(-1, a.shape[-1])[keep.reshape(-1)])
        perm = np.random.default_rng([self.seed, chunk]).permutation(kept)
        return {s: np.concatenate(acts[s])[perm] for s in self.sites}

    def _token_state(self) -> Any:
        get = getattr(self.tokens, "get_state", None)
        return copy.deepcopy(get()) if get is not None else None

    @staticmethod
    def _rows(buf: Batch) -> int:
        return len(next(iter(buf.values()))) if buf else 0

    def __repr__(self) -> str:
        return f"ActivationStream(sites={self.sites}, batch_tokens={self.batch_tokens})"


def _split_batch(item: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(item, Mapping):
        return np.asarray(item["tokens"]), _opt(item.get("mask"))
    if isinstance(item, tuple):
        return np.asarray(item[0]), _opt(item[1])
    return np.asarray(item), None


def _opt(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x)


def estimate_norm_scalars(batches: Iterable[Batch], n_batches: int) -> dict[str, float]:
    """Per-site scalars `s = sqrt(mean_tokens ||x||^2)` from the first `n_batches` batches.

    Dividing a site by its `s` gives unit mean squared norm, `E ||x / s||^2 = 1`, the Gemma
    Scope 2 convention that its JumpReLU bandwidth (0.001) is meaningful in (REFERENCE §5.1,
    §5.3; SAELens' `sqrt(d)` convention would make that bandwidth sqrt(d) times too small).
    One scalar per layer for multi-layer dictionaries.
    Consumes `n_batches` batches of `batches` (use a fresh stream or the cache reader).
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    seen = 0
    for batch in batches:
        for site, x in batch.items():
            x = np.asarray(x, np.float64)
            sums[site] = sums.get(site, 0.0) + float(np.einsum("nd,nd->", x, x))
            counts[site] = counts.get(site, 0) + x.shape[0]
        seen += 1
        if seen == n_batches:
            break
    if seen == 0:
        raise ValueError("estimate_norm_scalars: the batch iterator is empty")
    return {site: float(np.sqrt(sums[site] / counts[site])) for site in sums}


def normalize(batch: Batch, scalars: Mapping[str, float]) -> Batch:
    """`{site: x / scalars[site]}` for every site of the batch."""
    return {site: x / np.float32(scalars[site]) for site, x in batch.items()}
