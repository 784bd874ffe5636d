"""Max-activating examples and density statistics of every latent, in one pass over a corpus.

    batches = corpus_batches("embedded", tok, seq_len=128, batch_size=8, max_tokens=16384)
    ex = scan_corpus(model, d, batches, top_n=20, left=12, right=4)
    ex.values [F, n], ex.context_ids [F, n, 12 + 1 + 4], ex.context_values [F, n, 17]
    ex.density [F], ex.mean_active [F], ex.histograms [F, bins]
    ex.save("out/max_examples"); MaxExamples.load("out/max_examples")

Latents are flat (`features.flat_codes`): for a multi-layer dictionary, source layer i's
latent j is row i * width + j. <bos> and <pad> positions are neither examples nor counted.

Streaming. Per token batch [B, T] the model runs once (capturing the input sites), the
dictionary encodes all B*T tokens, and a jitted step merges them into running buffers: the
top-n per latent is `lax.top_k` over the concatenation [buffer, this batch's top-n] (buffer
first, so among equal values the earlier token wins), with the context window (token ids and
this latent's activation on each of them, `left` tokens before and `right` after, <pad> past
the window's edges) gathered for the batch's candidates only. Nothing of size
[tokens, F] outlives a batch. Only firing tokens (activation > 0) are candidates; a latent that
fired on fewer than n tokens has value -inf in its empty slots.

Statistics in the same step: the number of tokens each latent fires on, the sum of its
activations there, and a histogram of those activations over fixed log-spaced bins
(`HIST_EDGES`, 1e-4 .. 1e4; values outside go to the first / last bin).

Devices. Buffers are sharded with latents over the `model` mesh axis and the token batch over
`data` (`gemmascope_jax.sharding`); on one device this changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gemmascope_jax.analysis.common import (
    checked_dictionary,
    dictionary_inputs,
    dictionary_label,
    flat_codes,
    site_forward,
    token_strings,
)
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.tokenizer import BOS_ID, PAD_ID
from gemmascope_jax.io.files import atomic_output_dir, read_json
from gemmascope_jax.sharding import logical_sharding, make_mesh

HIST_EDGES = np.geomspace(1e-4, 1e4, 65).astype(np.float32)
ARRAY_FILE, META_FILE = "max_examples.npz", "max_examples.json"
_ARRAYS = (
    "values",
    "rows",
    "positions",
    "context_ids",
    "context_values",
    "fire_counts",
    "activation_sums",
    "histograms",
    "hist_edges",
)


@dataclasses.dataclass(frozen=True)
class MaxExamples:
    """Top-n examples and statistics per flat latent (F = layers x width rows).

    values [F, n] descending (-inf: empty); rows/positions [F, n] the corpus row (batch index
    x batch size + row in batch) and position of each example; context_ids [F, n, W] and
    context_values [F, n, W] the window around it (example at index `left`, W = left + 1 +
    right); fire_counts [F], activation_sums [F], histograms [F, bins] over hist_edges
    [bins + 1]; n_tokens counted tokens; token_text maps every id in context_ids to its string.
    """

    values: np.ndarray
    rows: np.ndarray
    positions: np.ndarray
    context_ids: np.ndarray
    context_values: np.ndarray
    fire_counts: np.ndarray
    activation_sums: np.ndarray
    histograms: np.ndarray
    hist_edges: np.ndarray
    n_tokens: int
    left: int
    right: int
    width: int
    layers: tuple[int, ...]
    dictionary: str = ""
    token_text: dict[int, str] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def num_latents(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> np.ndarray:
        """Fraction of counted tokens each latent fires on, [F]."""
        return self.fire_counts / max(self.n_tokens, 1)

    @property
    def mean_active(self) -> np.ndarray:
        """Mean activation when active, [F] (0 for latents that never fired)."""
        return np.where(
            self.fire_counts > 0, self.activation_sums / np.maximum(self.fire_counts, 1), 0.0
        )

    def latent_name(self, flat: int) -> str:
        """`123` for single-layer dictionaries, `L9/123` for multi-layer ones."""
        source, latent = divmod(int(flat), self.width)
        return str(latent) if len(self.layers) == 1 else f"L{self.layers[source]}/{latent}"

    def save(self, out: str | os.PathLike, *, force: bool = False) -> Path:
        """Write `max_examples.npz` + `max_examples.json` into the folder `out` atomically;
        an earlier `save` there is replaced, any other non-empty folder only with `force`."""
        meta = {
            "n_tokens": int(self.n_tokens),
            "left": self.left,
            "right": self.right,
            "width": self.width,
            "layers": list(self.layers),
            "dictionary": self.dictionary,
            "token_text": {str(k): v for k, v in sorted(self.token_text.items())},
        }
        with atomic_output_dir(out, force=force, replace_ours=True) as tmp:
            np.savez(tmp / ARRAY_FILE, **{name: getattr(self, name) for name in _ARRAYS})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaxExamples:
        """Read a folder written by `save`; ValueError naming a missing or malformed part."""
        path = Path(path)
        for name in (ARRAY_FILE, META_FILE):
            if not (path / name).is_file():
                raise ValueError(f"{path}: not a max-examples folder (no {name})")
        try:
            meta = read_json(path / META_FILE, error=ValueError)
            with np.load(path / ARRAY_FILE) as npz:
                arrays = {name: npz[name] for name in _ARRAYS}
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: malformed max-examples files ({e})") from None
        f, n = arrays["values"].shape
        w = meta["left"] + 1 + meta["right"]
        for name, shape in (("context_ids", (f, n, w)), ("fire_counts", (f,))):
            if arrays[name].shape != shape:
                raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, not {shape}")
        return cls(
            **arrays,
            n_tokens=int(meta["n_tokens"]),
            left=int(meta["left"]),
            right=int(meta["right"]),
            width=int(meta["width"]),
            layers=tuple(meta["layers"]),
            dictionary=meta.get("dictionary", ""),
            token_text={int(k): v for k, v in meta.get("token_text", {}).items()},
        )


def corpus_batches(
    corpus: Any,
    tokenizer: Any,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Token windows int32 [batch_size, seq_len] of a corpus (`"embedded"`, a path or list of
    paths `data.open_source` accepts, or a source), packed by `PackedTokens` (one epoch,
    documents shuffled with `seed`), stopping after `max_tokens` tokens (whole batches)."""
    from gemmascope_jax.data import PackedTokens, open_source

    source = open_source(corpus) if isinstance(corpus, str | os.PathLike | list) else corpus
    packed = PackedTokens(
        source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=1
    )
    seen = 0
    for tokens in packed:
        if max_tokens is not None and seen >= max_tokens:
            return
        seen += tokens.size
        yield tokens


def _empty_state(num_latents: int, n: int, window: int, bins: int) -> dict[str, jax.Array]:
    return {
        "values": jnp.full((num_latents, n), -jnp.inf, jnp.float32),
        "rows": jnp.full((num_latents, n), -1, jnp.int32),
        "positions": jnp.full((num_latents, n), -1, jnp.int32),
        "context_ids": jnp.full((num_latents, n, window), PAD_ID, jnp.int32),
        "context_values": jnp.zeros((num_latents, n, window), jnp.float32),
        "fire_counts": jnp.zeros((num_latents,), jnp.int32),
        "activation_sums": jnp.zeros((num_latents,), jnp.float32),
        "histograms": jnp.zeros((num_latents, bins), jnp.int32),
        "n_tokens": jnp.zeros((), jnp.int32),
    }


def scan_step(state, codes, tokens, keep, row_offset, *, left: int, right: int):
    """Merge one batch into the running state.

    codes [B, T, F] float32; tokens [B, T] int32; keep [B, T] bool (counted tokens);
    row_offset: corpus row of tokens[0]. Returns the new state (see `_empty_state`)."""
    b, t, f = codes.shape
    n = state["values"].shape[1]
    window = left + 1 + right
    fire = keep[..., None] & (codes > 0)
    shown = jnp.where(keep[..., None], codes, 0.0)
    candidates = jnp.where(fire, codes, -jnp.inf).reshape(b * t, f).T  # [F, B*T]
    cand_values, cand_flat = jax.lax.top_k(candidates, min(n, b * t))
    cand_rows, cand_pos = jnp.divmod(cand_flat, t)
    offsets = cand_pos[..., None] + jnp.arange(window)  # index into the padded time axis
    tokens_p = jnp.pad(tokens, ((0, 0), (left, right)), constant_values=PAD_ID)
    shown_p = jnp.pad(shown, ((0, 0), (left, right), (0, 0)))
    cand_ctx_ids = tokens_p[cand_rows[..., None], offsets]
    cand_ctx_values = shown_p[cand_rows[..., None], offsets, jnp.arange(f)[:, None, None]]

    merged_values = jnp.concatenate([state["values"], cand_values], axis=1)
    new_values, pick = jax.lax.top_k(merged_values, n)
    take = lambda old, new: jnp.take_along_axis(
        jnp.concatenate([old, new], axis=1),
        pick.reshape(pick.shape + (1,) * (old.ndim - 2)),
        axis=1,
    )
    bins = state["histograms"].shape[1]
    edges = jnp.asarray(HIST_EDGES[1:-1])
    bin_index = jnp.searchsorted(edges, codes.reshape(b * t, f), side="right")  # [B*T, F]
    flat_bins = (jnp.arange(f)[None, :] * bins + bin_index).reshape(-1)
    hist = (
        state["histograms"]
        .reshape(-1)
        .at[flat_bins]
        .add(fire.reshape(-1).astype(jnp.int32))
        .reshape(f, bins)
    )
    return {
        "values": new_values,
        "rows": take(state["rows"], (cand_rows + row_offset).astype(jnp.int32)),
        "positions": take(state["positions"], cand_pos.astype(jnp.int32)),
        "context_ids": take(state["context_ids"], cand_ctx_ids.astype(jnp.int32)),
        "context_values": take(state["context_values"], cand_ctx_values),
        "fire_counts": state["fire_counts"] + jnp.sum(fire, axis=(0, 1), dtype=jnp.int32),
        "activation_sums": state["activation_sums"] + jnp.sum(jnp.where(fire, codes, 0.0), (0, 1)),
        "histograms": hist,
        "n_tokens": state["n_tokens"] + jnp.sum(keep, dtype=jnp.int32),
    }


def scan_corpus(
    model,
    dictionary: Dictionary,
    token_batches: Iterable[Any],
    *,
    top_n: int = 20,
    left: int = 12,
    right: int = 4,
    tokenizer: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    total_batches: int | None = None,
    progress: bool = True,
) -> MaxExamples:
    """Stream `token_batches` (int [B, T] windows, BOS first, e.g. `corpus_batches`) through
    the model and `dictionary`; return the top `top_n` examples and statistics of every latent.
    `tokenizer` (optional) fills `token_text` for the ids in the context windows."""
    d = checked_dictionary(model, dictionary)
    if top_n < 1 or left < 0 or right < 0:
        raise ValueError(f"need top_n >= 1 and left, right >= 0; got {top_n}, {left}, {right}")
    mesh = mesh if mesh is not None else make_mesh()
    num_latents = d.cfg.total_width
    window = left + 1 + right
    state = _empty_state(num_latents, top_n, window, len(HIST_EDGES) - 1)
    state = {k: jax.device_put(v, _state_sharding(k, v, mesh)) for k, v in state.items()}
    forward = site_forward(model, d.cfg.input_sites)
    graphdef, params = nnx.split(d)
    step = _compiled_step(graphdef, left, right)
    rows = 0
    batches = _progress(token_batches, total_batches, progress)
    for tokens in batches:
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token batches must be int [batch, seq], got shape {tokens.shape}")
        keep = ~np.isin(tokens, (BOS_ID, PAD_ID))
        batch_sharding = logical_sharding(("batch", "seq"), tokens.shape, mesh)
        tokens_dev, keep_dev = (jax.device_put(a, batch_sharding) for a in (tokens, keep))
        sites = forward(tokens_dev).sites  # packed windows, as in training: no mask
        state = step(params, state, dictionary_inputs(sites, d), tokens_dev, keep_dev, rows)
        rows += tokens.shape[0]
    host = jax.device_get(state)
    ids = np.unique(host["context_ids"])
    return MaxExamples(
        values=host["values"],
        rows=host["rows"],
        positions=host["positions"],
        context_ids=host["context_ids"],
        context_values=host["context_values"],
        fire_counts=host["fire_counts"].astype(np.int64),
        activation_sums=host["activation_sums"].astype(np.float64),
        histograms=host["histograms"].astype(np.int64),
        hist_edges=HIST_EDGES.copy(),
        n_tokens=int(host["n_tokens"]),
        left=left,
        right=right,
        width=d.cfg.width,
        layers=tuple(d.cfg.layers),
        dictionary=dictionary_label(d),
        token_text=dict(zip(ids.tolist(), token_strings(tokenizer, ids), strict=True))
        if tokenizer is not None
        else {},
    )


@functools.lru_cache(maxsize=8)
def _compiled_step(graphdef, left: int, right: int):
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, state, x, tokens, keep, row_offset):
        d = nnx.merge(graphdef, params)
        return scan_step(state, flat_codes(d, x), tokens, keep, row_offset, left=left, right=right)

    return step


def _state_sharding(name: str, value: jax.Array, mesh) -> NamedSharding:
    """Latents (axis 0) over `model` when it divides them; scalars replicated."""
    if value.ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    axes = ("latents",) + (None,) * (value.ndim - 1)
    return logical_sharding(axes, value.shape, mesh)


def _progress(batches: Iterable, total: int | None, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="max examples", unit="batch")
