"""The logit lens of a dictionary latent: the tokens its write direction promotes and
suppresses.

    lens = logit_lens(model, d, 123, tokenizer=tok)         # promoted / suppressed tokens
    ids, values, _, _ = logit_lens_table(model, d, flat_ids)  # many latents, [n, k] each

Logit lens convention: a latent's write direction d (its decoder row; for a CLT the sum of its
rows over all target layers, the total it adds to the residual stream; for a crosscoder the
row of its deepest output layer) is passed through the model's final RMSNorm as if it were
the whole residual stream, then the unembedding:
`logits = (d / rms(d) * (1 + w_norm)) @ W_E^T`, rms(d) = sqrt(mean(d²) + eps). These are the
logits the model would output if its last residual stream were the direction alone (the
RMSNorm makes them independent of d's norm; a unit-norm d gives the same), so they read on
the model's own logit scale (tens), whatever the dictionary's units. Without the RMS
division the raw-unit decoder rows of the 270M gave logits of about ±34,000 (issue 13).
Rankings are unchanged by the division (one positive factor per latent). Only dictionaries
writing to a residual-stream site (resid_*, attn_out, mlp_out) have a lens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.analysis.common import (
    check_latents,
    checked_dictionary,
    dictionary_label,
    split_flat,
    token_strings,
)
from gemmascope_jax.dictionaries.base import Dictionary

RESIDUAL_WRITE_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Top promoted (largest logits) and suppressed (smallest) tokens of one latent."""

    layer: int
    latent: int
    promoted_ids: np.ndarray
    promoted_tokens: tuple[str, ...]
    promoted_values: np.ndarray
    suppressed_ids: np.ndarray
    suppressed_tokens: tuple[str, ...]
    suppressed_values: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        rows = lambda ids, toks, vals: [
            {"id": int(i), "token": t, "value": float(v)}
            for i, t, v in zip(ids, toks, vals, strict=True)
        ]
        return {
            "layer": self.layer,
            "latent": self.latent,
            "promoted": rows(self.promoted_ids, self.promoted_tokens, self.promoted_values),
            "suppressed": rows(self.suppressed_ids, self.suppressed_tokens, self.suppressed_values),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def write_directions(d: Dictionary, flat: Sequence[int] | np.ndarray) -> jax.Array:
    """What each latent (flat index, see `flat_codes`) adds to the residual stream, [n, d_out].

    Single-layer: its decoder row. CLT: the sum of its rows over every target layer.
    Crosscoder: the row of its deepest output layer (its rows reconstruct one site at several
    depths, so a sum would count the stream several times)."""
    cfg = d.cfg
    kinds = {s.split(".")[0] for s in cfg.output_sites}
    if not kinds <= set(RESIDUAL_WRITE_SITES):
        raise ValueError(
            f"no logit lens for {dictionary_label(d)}: its output site(s) {cfg.output_sites} "
            f"are not written to the residual stream ({', '.join(RESIDUAL_WRITE_SITES)})"
        )
    flat = np.asarray(flat, np.int64)
    if not cfg.multilayer:
        return d.w_dec[...][flat].astype(jnp.float32)
    source, ids = np.divmod(flat, cfg.width)
    rows = []
    for s, i in zip(source.tolist(), ids.tolist(), strict=True):
        block = d.w_dec[s][...][i].astype(jnp.float32)  # [L - s, d_out]
        rows.append(block.sum(0) if cfg.kind == "clt" else block[-1])
    return jnp.stack(rows)


def lens_logits(
    directions: jax.Array, norm_weight: jax.Array, embedding: jax.Array, eps: float = 1e-6
):
    """Logit-lens logits [n, vocab] of write directions [n, d_model]: each direction through
    the final RMSNorm, `(d / rms(d) * (1 + w)) @ E^T` (module doc)."""
    d = directions.astype(jnp.float32)
    d = d * jax.lax.rsqrt(jnp.mean(jnp.square(d), axis=-1, keepdims=True) + eps)
    scaled = d * (1.0 + norm_weight.astype(jnp.float32))
    return jnp.matmul(scaled, embedding.astype(jnp.float32).T, precision="highest")


@functools.partial(jax.jit, static_argnames=("k", "eps"))
def _lens_top(directions, norm_weight, embedding, *, k: int, eps: float = 1e-6):
    """directions [n, D] -> (top values, ids), (bottom values, ids), each [n, k]."""
    logits = lens_logits(directions, norm_weight, embedding, eps)
    top = jax.lax.top_k(logits, k)
    bottom_values, bottom_ids = jax.lax.top_k(-logits, k)
    return top, (-bottom_values, bottom_ids)


def logit_lens_table(
    model, d: Dictionary, flat: Sequence[int] | np.ndarray, k: int = 10, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For flat latent indices [n]: promoted ids/values and suppressed ids/values, [n, k] each.
    Computed `chunk` latents at a time ([chunk, vocab] logits in memory)."""
    flat = np.asarray(flat, np.int64)
    vocab = model.cfg.vocab_size
    k = min(k, vocab)
    parts = []
    for start in range(0, len(flat), chunk):
        piece = flat[start : start + chunk]
        padded = np.pad(piece, (0, chunk - len(piece)))  # one compiled shape
        (tv, ti), (bv, bi) = _lens_top(
            write_directions(d, padded),
            model.norm.weight[...],
            model.embed_tokens[...],
            k=k,
            eps=float(getattr(model.cfg, "rms_norm_eps", 1e-6)),
        )
        parts.append([np.asarray(a)[: len(piece)] for a in (ti, tv, bi, bv)])
    if not parts:
        empty_i, empty_v = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return empty_i, empty_v, empty_i, empty_v
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))


def logit_lens(
    model,
    dictionary: Dictionary,
    latent: int,
    *,
    layer: int | None = None,
    k: int = 10,
    tokenizer=None,
) -> LogitLens:
    """Top-k promoted and suppressed tokens of latent `latent` (of source layer `layer`, a model
    layer; needed for multi-layer dictionaries). See the module doc for the convention."""
    d = checked_dictionary(model, dictionary)
    flat = flat_latent_index(d, latent, layer)
    ti, tv, bi, bv = logit_lens_table(model, d, [flat], k=k, chunk=1)
    model_layer, latent_id = (int(a[0]) for a in split_flat(d, [flat]))
    return LogitLens(
        layer=model_layer,
        latent=latent_id,
        promoted_ids=ti[0],
        promoted_tokens=tuple(token_strings(tokenizer, ti[0])),
        promoted_values=tv[0],
        suppressed_ids=bi[0],
        suppressed_tokens=tuple(token_strings(tokenizer, bi[0])),
        suppressed_values=bv[0],
    )


def flat_latent_index(d: Dictionary, latent: int, layer: int | None = None) -> int:
    """Flat index of latent `latent` of model layer `layer`; ValueError when out of range."""
    (latent,) = check_latents(d, [latent])
    layers = list(d.cfg.layers)
    if layer is None:
        if len(layers) > 1:
            raise ValueError(
                f"{dictionary_label(d)} has source layers {layers}: say which (layer=...)"
            )
        layer = layers[0]
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a source layer of {dictionary_label(d)}: {layers}")
    return layers.index(layer) * d.cfg.width + latent
