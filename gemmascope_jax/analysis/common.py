"""Checks and conversions shared by the analysis tools (inspection, steering, chat, attribution).

Every tool takes a model, a dictionary and prompts; these helpers turn bad combinations into one
clear `ValueError` before any compute:

    check_dictionary(model.cfg, d)        # site layers in range, d_in/d_out equal the model's
    check_latents(d, [123, 7])            # ids in [0, width)
    d = checked_dictionary(model, d)      # one Dictionary (not a set) that fits the model

and the conversions every tool makes on the way to a dictionary's latents: the captured
forward (`site_forward`), the dictionary's input (`dictionary_inputs`), codes with one flat
latent index (`flat_codes`, `split_flat`), the codes of whole token sequences in one batch
(`token_codes`), token display strings and their character spans (`token_strings`,
`token_char_spans`).

Chats and prompt token ids (`check_chat`, `prompt_ids`) live with the tokenizer, in
`gemmascope_jax.gemma3.tokenizer`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.config import Gemma3Config
from gemmascope_jax.gemma3.sites import resolve_site, site_width


def dictionary_label(d: Dictionary) -> str:
    """A short human name: `sae resid_post.9 (width 4096)`."""
    cfg = d.cfg
    sites = ",".join(dict.fromkeys(cfg.input_sites))
    return f"{cfg.kind} {sites} (width {cfg.width})"


def check_dictionary(model_cfg: Gemma3Config, d: Dictionary) -> None:
    """Raise ValueError when `d` cannot read or write `model_cfg`'s activations.

    Checks every input/output site resolves for the model's depth and that the dictionary's
    d_in / d_out equal the site widths (e.g. a 1B SAE on the 270M model)."""
    cfg = d.cfg
    problems = []
    for role, sites, width in (
        ("input", cfg.input_sites, cfg.d_in),
        ("output", cfg.output_sites, cfg.d_out),
    ):
        for name in sites:
            try:
                site = resolve_site(name, model_cfg.num_layers)
            except ValueError as e:
                problems.append(f"{role} site {name!r}: {e}")
                continue
            expected = site_width(site, model_cfg)
            if expected != width:
                problems.append(
                    f"{role} site {site.name} has width {expected} in this model "
                    f"but the dictionary's {'d_in' if role == 'input' else 'd_out'} is {width}"
                )
    if cfg.model_num_layers is not None and cfg.model_num_layers != model_cfg.num_layers:
        problems.append(
            f"dictionary was made for a {cfg.model_num_layers}-layer model, this model has "
            f"{model_cfg.num_layers} layers"
        )
    if problems:
        raise ValueError(
            f"dictionary {dictionary_label(d)} does not match the model: " + "; ".join(problems)
        )


def check_latents(d: Dictionary, latents: Iterable[int]) -> list[int]:
    """Latent ids as ints, each in [0, width); raises ValueError naming the bad ones."""
    ids = [int(i) for i in latents]
    bad = [i for i in ids if not 0 <= i < d.cfg.width]
    if bad:
        raise ValueError(
            f"latent id(s) {bad} out of range for {dictionary_label(d)}: valid ids are "
            f"0..{d.cfg.width - 1}"
        )
    return ids


_FORWARDS: collections.OrderedDict = collections.OrderedDict()  # (id(model), sites) -> fn
_MAX_FORWARDS = 8


def site_forward(model, capture: Sequence[str]):
    """`model.jitted(capture=..., logits=False)`, kept for the last few (model, sites) pairs so
    repeated inspections compile once per prompt length instead of once per call."""
    key = (id(model), tuple(dict.fromkeys(capture)))
    if key in _FORWARDS and _FORWARDS[key][0] is model:
        _FORWARDS.move_to_end(key)
    else:
        _FORWARDS[key] = (model, model.jitted(capture=key[1], logits=False))
        while len(_FORWARDS) > _MAX_FORWARDS:
            _FORWARDS.popitem(last=False)
    return _FORWARDS[key][1]


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display string of each token id (`<id 123>` without a tokenizer); ids decoded once."""
    if tokenizer is None:
        return [f"<id {int(i)}>" for i in ids]
    cache: dict[int, str] = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        out.append(cache[i])
    return out


def checked_dictionary(model, d: Any) -> Dictionary:
    """`d` if it is a dictionary that reads and writes this model's sites, else ValueError."""
    if not isinstance(d, Dictionary):
        raise ValueError(
            f"expected one dictionary (SAE, transcoder, CLT, crosscoder), got {type(d).__name__}"
            " (for a per-layer transcoder set, pass one member: set[layer])"
        )
    check_dictionary(model.cfg, d)
    return d


def dictionary_inputs(sites: dict[str, jax.Array], d: Dictionary) -> jax.Array:
    """The dictionary's input from captured sites: [..., d_in] or [..., L, d_in] (multi-layer)."""
    xs = [sites[s].astype(jnp.float32) for s in d.cfg.input_sites]
    return jnp.stack(xs, axis=-2) if d.cfg.multilayer else xs[0]


def flat_codes(d: Dictionary, x: jax.Array) -> jax.Array:
    """Codes [..., L * F]: source layer i's latent j at flat index i * F + j (L = 1 single)."""
    codes = d.encode(x)
    return codes.reshape(*codes.shape[: x.ndim - (2 if d.cfg.multilayer else 1)], -1)


def split_flat(d: Dictionary, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat latent indices -> (model layer, latent id), same shapes."""
    flat = np.asarray(flat)
    source, ids = np.divmod(flat, d.cfg.width)
    return np.asarray(d.cfg.layers)[source], ids


def token_codes(model, d: Dictionary, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Dictionary codes of every token of each sequence, float32 [T_i, L * F] (flat latents).

    The sequences run as one left-padded batch (the attention mask keeps them independent):
    one forward, one compiled shape."""
    seq = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), seq), np.int32)
    mask = np.zeros((len(sequences), seq), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, seq - len(s) :], mask[i, seq - len(s) :] = s, 1
    forward = model.jitted(capture=tuple(d.cfg.input_sites), logits=False)
    out = forward(jnp.asarray(tokens), jnp.asarray(mask))
    codes = np.asarray(flat_codes(d, dictionary_inputs(out.sites, d)), np.float32)
    return [codes[i, seq - len(s) :] for i, s in enumerate(sequences)]


def token_char_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span `[start, end)` of each token in `tokenizer.decode(ids)` (special tokens
    kept), from the lengths of the decoded prefixes."""
    spans, prev = [], 0
    for i in range(len(ids)):
        end = max(prev, len(tokenizer.decode(list(ids[: i + 1]))))
        spans.append((prev, end))
        prev = end
    return spans
