"""Feature inspection: which latents fire on a prompt (`top_features`). The `inspect` verb
(`cli.analysis`) prints it, and a latent's logit lens (`analysis.logit_lens`).

    rep = top_features(model, tok, d, "The Eiffel Tower is in Paris", k=10, splice=True)
    rep.tokens, rep.top_ids [T, k], rep.top_values [T, k]   # per token, strongest first
    rep.ranked_ids, rep.ranked_totals                       # per prompt, by summed activation
    rep.error_norm [T, L_out]                               # splice=True: ||y - y_hat||
    lens = logit_lens(model, d, 123, tokenizer=tok)         # promoted / suppressed tokens

Latents are named `(layer, id)`: `layer` is the model layer of the latent's source layer
(`d.cfg.layers[i]`), `id` its index in [0, width). Single-layer dictionaries have one layer.
The dictionary reads its input site(s) from a clean forward: an SAE encodes the site it
reconstructs, a (skip-)transcoder encodes `mlp_in.l` and predicts `mlp_out.l`, a CLT or
crosscoder encodes every source layer at once. Dictionaries are used as loaded (exported
dictionaries have their normalisation folded in, so raw activations go in).
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
from flax import nnx

from gemmascope_jax.analysis.common import (
    checked_dictionary,
    dictionary_inputs,
    dictionary_label,
    flat_codes,
    site_forward,
    split_flat,
    token_strings,
)
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.tokenizer import BOS_ID, prompt_ids


@dataclasses.dataclass(frozen=True)
class FeatureReport:
    """`top_features` result for one prompt of T tokens (BOS dropped unless asked for).

    top_layers/top_ids/top_values [T, k]: each token's strongest active latents, descending;
    slots beyond the token's active count have id -1 and value 0.
    ranked_layers/ranked_ids/ranked_totals/ranked_counts [n]: every latent active somewhere,
    by activation summed over the tokens (descending), with the number of tokens it fired on.
    error_norm/relative_error [T, L_out] (splice=True): ||y - y_hat|| and ||y - y_hat|| / ||y||
    per output site, y the site's clean value and y_hat the dictionary's prediction.
    """

    dictionary: str
    token_ids: np.ndarray
    tokens: tuple[str, ...]
    top_layers: np.ndarray
    top_ids: np.ndarray
    top_values: np.ndarray
    ranked_layers: np.ndarray
    ranked_ids: np.ndarray
    ranked_totals: np.ndarray
    ranked_counts: np.ndarray
    output_sites: tuple[str, ...] = ()
    error_norm: np.ndarray | None = None
    relative_error: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        per_token = []
        for t, tok in enumerate(self.tokens):
            active = self.top_ids[t] >= 0
            entry = {
                "position": t,
                "token": tok,
                "token_id": int(self.token_ids[t]),
                "latents": [
                    {"layer": int(layer), "id": int(i), "value": float(v)}
                    for layer, i, v in zip(
                        self.top_layers[t][active],
                        self.top_ids[t][active],
                        self.top_values[t][active],
                        strict=True,
                    )
                ],
            }
            if self.error_norm is not None:
                entry["error_norm"] = self.error_norm[t].tolist()
                entry["relative_error"] = self.relative_error[t].tolist()
            per_token.append(entry)
        ranked = [
            {"layer": int(layer), "id": int(i), "total": float(s), "tokens": int(c)}
            for layer, i, s, c in zip(
                self.ranked_layers,
                self.ranked_ids,
                self.ranked_totals,
                self.ranked_counts,
                strict=True,
            )
        ]
        return {
            "dictionary": self.dictionary,
            "output_sites": list(self.output_sites),
            "tokens": per_token,
            "ranked": ranked,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "splice"))
def _inspect(graphdef, state, x, y, *, k: int, splice: bool):
    """x [T, (L,) d_in] -> top-k (values, flat ids) [T, k], totals/counts [L*F], errors."""
    d = nnx.merge(graphdef, state)
    codes = flat_codes(d, x)
    values, flat = jax.lax.top_k(codes, k)
    active = codes > 0
    totals = jnp.sum(jnp.where(active, codes, 0.0), axis=0)
    counts = jnp.sum(active, axis=0)
    if not splice:
        return values, flat, totals, counts, None, None
    y_hat = d.decode(d.encode(x), x).astype(jnp.float32)
    y_hat = y_hat if d.cfg.multilayer else y_hat[:, None, :]
    err = jnp.linalg.norm(y - y_hat, axis=-1)
    return values, flat, totals, counts, err, err / jnp.linalg.norm(y, axis=-1)


def top_features(
    model,
    tokenizer,
    dictionary: Dictionary,
    text_or_chat: str | Sequence[dict] | Sequence[int],
    k: int = 10,
    splice: bool = False,
    include_bos: bool = False,
) -> FeatureReport:
    """The latents active on each token of a prompt and over the whole prompt.

    text_or_chat: a string, a chat (list of {role, content}, rendered with the template) or
        token ids (then `tokenizer` may be None; token strings become `<id N>`).
    k: latents reported per token. splice: also report reconstruction errors per token.
    include_bos: keep the <bos> position (GS2 dictionaries are not trained on it).
    """
    d = checked_dictionary(model, dictionary)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    ids = _prompt_token_ids(tokenizer, text_or_chat, model.cfg.vocab_size)
    cfg = d.cfg
    capture = (*cfg.input_sites, *(cfg.output_sites if splice else ()))
    out = site_forward(model, capture)(jnp.asarray([ids]))
    sites = {s: v[0] for s, v in out.sites.items()}
    x = dictionary_inputs(sites, d)
    y = (
        jnp.stack([sites[s].astype(jnp.float32) for s in cfg.output_sites], axis=-2)
        if splice
        else None
    )
    graphdef, state = nnx.split(d)
    k_eff = min(k, cfg.total_width)
    keep = np.ones(len(ids), bool) if include_bos else np.asarray(ids) != BOS_ID
    if not keep.any():
        raise ValueError("the prompt has no tokens besides <bos>")
    rows = np.flatnonzero(keep)
    x = x[rows]
    y = None if y is None else y[rows]
    values, flat, totals, counts, err, rel = jax.device_get(
        _inspect(graphdef, state, x, y, k=k_eff, splice=splice)
    )
    active = values > 0
    top_layers, top_ids = split_flat(d, flat)
    ranked = np.flatnonzero(counts)
    ranked = ranked[np.argsort(-totals[ranked], kind="stable")]
    ranked_layers, ranked_ids = split_flat(d, ranked)
    kept_ids = np.asarray(ids)[rows]
    return FeatureReport(
        dictionary=dictionary_label(d),
        token_ids=kept_ids,
        tokens=tuple(token_strings(tokenizer, kept_ids)),
        top_layers=np.where(active, top_layers, -1),
        top_ids=np.where(active, top_ids, -1),
        top_values=np.where(active, values, 0.0).astype(np.float32),
        ranked_layers=ranked_layers,
        ranked_ids=ranked_ids,
        ranked_totals=totals[ranked].astype(np.float32),
        ranked_counts=counts[ranked].astype(np.int64),
        output_sites=tuple(cfg.output_sites) if splice else (),
        error_norm=None if err is None else np.asarray(err, np.float32),
        relative_error=None if rel is None else np.asarray(rel, np.float32),
    )


def _prompt_token_ids(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, np.ndarray | jax.Array) or (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and prompt
        and all(isinstance(i, int | np.integer) for i in prompt)
    ):
        ids = [int(i) for i in np.asarray(prompt).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocab size {vocab_size}")
    elif tokenizer is None:
        raise ValueError("a tokenizer is needed for a text or chat prompt (or pass token ids)")
    else:
        ids = list(prompt_ids(tokenizer, prompt))
    if not ids:
        raise ValueError("empty prompt: no tokens")
    return ids
