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

Device mode (`on_device=True`). The host still reads the tokens, so it computes the kept
positions and the chunk permutation from them alone; the site arrays never leave the device.
Each chunk's forward outputs are flattened once into `[rows, d]` float32 pools, and every
training batch is one jitted gather of its permuted kept rows (at a chunk boundary, from the
two chunks' pools), placed with `batch_sharding`. Same rows, same order, same bits as the host
mode: gathering and casting are exact.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.gemma3.tokenizer import BOS_ID, PAD_ID

Batch = dict[str, np.ndarray]


class ActivationStream(grain.DatasetIterator):
    """Shuffled site activations `{site: float32 [batch_tokens, d]}` from token batches.

    token_batches: iterator of `tokens` int [B, T], or `(tokens, mask)` / `{"tokens", "mask"}`
        with mask [B, T] 1 on real tokens (passed to the model as `attention_mask`); a dict
        may also hold `"loss_mask"` [B, T]: positions where it is 0 are dropped like <bos>
        but still attended to (`PackedTokens(loss_mask=True)`: e.g. only response tokens).
    forward: optional replacement for `model.jitted(capture=sites, logits=False)`, called as
        `forward(tokens, attention_mask)` and returning a `Gemma3Output` or a dict of sites.
    drop_remainder: at the end of a finite token stream, drop the last partial batch
        (default) or yield it with fewer rows.
    on_device: keep the site arrays on the device and yield `jax.Array` batches (see the
        module docstring); `batch_sharding` places full batches (e.g. tokens over `data`).
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
        on_device: bool = False,
        batch_sharding: jax.sharding.Sharding | None = None,
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
        self.on_device = on_device
        if on_device:
            self._flatten = jax.jit(_flatten_outputs)
            self._gather_full = jax.jit(_gather_rows, out_shardings=batch_sharding)
            self._gather_partial = jax.jit(_gather_rows)

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
        pieces: list[tuple[Any, int, int]] = []  # (chunk buffer, first row, end row)
        need = self.batch_tokens
        while need > 0:
            left = self._rows(self._buf) - self._pos
            if left == 0:
                if not self._next_chunk():
                    break
                continue
            take = min(left, need)
            pieces.append((self._buf, self._pos, self._pos + take))
            self._pos += take
            need -= take
        if need == self.batch_tokens or (need > 0 and self.drop_remainder):
            raise StopIteration
        if self.on_device:
            return self._gather(pieces, full=need == 0)
        if len(pieces) == 1:
            buf, lo, hi = pieces[0]
            return {s: a[lo:hi] for s, a in buf.items()}  # views: every row is handed out once
        return {s: np.concatenate([buf[s][lo:hi] for buf, lo, hi in pieces]) for s in self.sites}

    def _gather(self, pieces: list[tuple[_DeviceChunk, int, int]], *, full: bool) -> Batch:
        """One jitted gather of the pieces' rows from their chunks' device pools."""
        pools, index, offset = [], [], 0
        for chunk, lo, hi in pieces:
            pools.append(chunk.pool)
            index.append(chunk.rows[lo:hi] + offset)
            offset += chunk.pool_rows
        gather = self._gather_full if full else self._gather_partial
        return gather(tuple(pools), np.concatenate(index).astype(np.int32))

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

    def _fill_chunk(self, chunk: int) -> Batch | _DeviceChunk | None:
        """Read whole token batches until >= buffer_tokens kept tokens, run the model, permute."""
        batches, kept = [], 0
        while kept < self.buffer_tokens:
            try:
                item = next(self.tokens)
            except StopIteration:
                break
            tokens, mask = _split_batch(item)
            keep = ~np.isin(tokens, self.drop_ids)
            if mask is not None:
                keep &= mask.astype(bool)
            if isinstance(item, Mapping) and item.get("loss_mask") is not None:
                keep &= np.asarray(item["loss_mask"]).astype(bool)
            batches.append((tokens, mask, keep))
            kept += int(keep.sum())
        if kept == 0:
            return None
        # Dispatch every forward first (JAX runs them asynchronously), then gather.
        outs = [
            self.forward(jnp.asarray(t), None if m is None else jnp.asarray(m))
            for t, m, _ in batches
        ]
        values = [out.sites if hasattr(out, "sites") else out for out in outs]
        perm = np.random.default_rng([self.seed, chunk]).permutation(kept)
        if self.on_device:
            pool = self._flatten(tuple({s: v[s] for s in self.sites} for v in values))
            rows = np.flatnonzero(np.concatenate([keep.reshape(-1) for _, _, keep in batches]))
            return _DeviceChunk(pool, rows[perm])
        acts = {s: [] for s in self.sites}
        for v, (_, _, keep) in zip(values, batches, strict=True):
            for s in self.sites:
                a = np.asarray(v[s], dtype=np.float32)
                acts[s].append(a.reshape(-1, a.shape[-1])[keep.reshape(-1)])
        return {s: np.concatenate(acts[s])[perm] for s in self.sites}

    def _token_state(self) -> Any:
        get = getattr(self.tokens, "get_state", None)
        return copy.deepcopy(get()) if get is not None else None

    @staticmethod
    def _rows(buf: Batch | _DeviceChunk) -> int:
        if isinstance(buf, _DeviceChunk):
            return len(buf.rows)
        return len(next(iter(buf.values()))) if buf else 0

    def __repr__(self) -> str:
        return f"ActivationStream(sites={self.sites}, batch_tokens={self.batch_tokens})"


@dataclasses.dataclass(frozen=True)
class _DeviceChunk:
    """A chunk in device mode: `pool` {site: float32 [pool_rows, d]} holds every position of
    the chunk's token batches; the chunk's rows, in order, are `pool[s][rows]`."""

    pool: dict[str, jax.Array]
    rows: np.ndarray  # int [kept]: kept positions, permuted

    @property
    def pool_rows(self) -> int:
        return next(iter(self.pool.values())).shape[0]


def _flatten_outputs(outs: tuple[dict[str, jax.Array], ...]) -> dict[str, jax.Array]:
    """Per-batch sites [B, T, d] -> {site: float32 [sum B*T, d]}, batches concatenated."""
    return {
        s: jnp.concatenate([o[s].reshape(-1, o[s].shape[-1]).astype(jnp.float32) for o in outs])
        for s in outs[0]
    }


def _gather_rows(pools: tuple[dict[str, jax.Array], ...], index: jax.Array) -> Batch:
    """Rows `index` [n] of the chunks' pools concatenated in order -> {site: [n, d]}."""
    return {
        s: jnp.take(
            jnp.concatenate([p[s] for p in pools]) if len(pools) > 1 else pools[0][s], index, axis=0
        )
        for s in pools[0]
    }


def _split_batch(item: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(item, Mapping):
        return np.asarray(item["tokens"]), _opt(item.get("mask"))
    if isinstance(item, tuple):
        return np.asarray(item[0]), _opt(item[1])
    return np.asarray(item), None


def _opt(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x)


def estimate_norm_scalars(
    batches: Iterable[Batch], n_batches: int, normalization: str = "unit"
) -> dict[str, float]:
    """Per-site scalars `s = sqrt(mean_tokens ||x||^2 / m)` from the first `n_batches` batches.

    Dividing a site by its `s` gives mean squared norm `E ||x / s||^2 = m`: m = 1 for
    `normalization="unit"`, the Gemma Scope 2 convention that its JumpReLU bandwidth (0.001)
    is meaningful in (TR §3.1, docs/recipe.md); m = d (the site's width) for "sqrt_d",
    SAELens' `expected_average_only_in`, where its bandwidth 0.05 and threshold 0.01 live.
    Short runs at a high learning rate train better in "sqrt_d" (docs/quality_h2h.md).
    One scalar per layer for multi-layer dictionaries.
    Consumes `n_batches` batches of `batches` (use a fresh stream or the cache reader).
    """
    if normalization not in ("unit", "sqrt_d"):
        raise ValueError(f"normalization must be 'unit' or 'sqrt_d', got {normalization!r}")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    widths: dict[str, int] = {}
    seen = 0
    for batch in batches:
        for site, x in batch.items():
            x = np.asarray(x, np.float64)
            sums[site] = sums.get(site, 0.0) + float(np.einsum("nd,nd->", x, x))
            counts[site] = counts.get(site, 0) + x.shape[0]
            widths[site] = x.shape[-1]
        seen += 1
        if seen == n_batches:
            break
    if seen == 0:
        raise ValueError("estimate_norm_scalars: the batch iterator is empty")
    mean_sq = {site: sums[site] / counts[site] for site in sums}
    if normalization == "sqrt_d":
        mean_sq = {site: m / widths[site] for site, m in mean_sq.items()}
    return {site: float(np.sqrt(m)) for site, m in mean_sq.items()}


def normalize(batch: Batch, scalars: Mapping[str, float]) -> Batch:
    """`{site: x / scalars[site]}` for every site of the batch."""
    return {site: x / np.float32(scalars[site]) for site, x in batch.items()}
