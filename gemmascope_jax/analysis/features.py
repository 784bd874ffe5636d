"""Feature inspection: which latents fire on a prompt, and what a latent writes to the logits.

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

import collections
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
    check_dictionary,
    check_latents,
    dictionary_label,
)
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.tokenizer import BOS_ID, prompt_ids

RESIDUAL_WRITE_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
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


# ---- logit lens ------------------------------------------------------------------------------


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


# ---- CLI -------------------------------------------------------------------------------------


def _print_report(rep: FeatureReport, top_ranked: int = 20) -> None:
    print(f"== {rep.dictionary}: top latents per token ==")
    multi = bool(len(rep.top_layers)) and len(set(rep.top_layers[rep.top_ids >= 0].tolist())) > 1
    name = lambda layer, i: f"L{layer}/{i}" if multi else str(i)
    for t, token in enumerate(rep.tokens):
        active = rep.top_ids[t] >= 0
        cells = "  ".join(
            f"{name(layer, i)}:{v:.3g}"
            for layer, i, v in zip(
                rep.top_layers[t][active],
                rep.top_ids[t][active],
                rep.top_values[t][active],
                strict=True,
            )
        )
        err = ""
        if rep.error_norm is not None:
            err = f"  |err| {rep.error_norm[t].mean():.3g} (rel {rep.relative_error[t].mean():.3f})"
        print(f"{t:4d} {token!r:>16}{err}  {cells}")
    print(f"\n== latents ranked by total activation (top {top_ranked}) ==")
    for layer, i, total, count in list(
        zip(rep.ranked_layers, rep.ranked_ids, rep.ranked_totals, rep.ranked_counts, strict=True)
    )[:top_ranked]:
        print(f"  latent {name(layer, i):>10}  total {total:10.4g}  on {count} tokens")


def _inspect_cli(args) -> int:
    from pathlib import Path

    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.gemma3.loading import load_gemma3

    model, tok = load_gemma3(args.model, progress=False)
    d = checked_dictionary(model, load_dictionary(args.dictionary))
    if args.latent is not None:
        lens = logit_lens(model, d, args.latent, layer=args.layer, k=args.k, tokenizer=tok)
        print(f"logit lens of latent {args.latent} (layer {lens.layer}), {dictionary_label(d)}")
        for title, toks, vals in (
            ("promoted", lens.promoted_tokens, lens.promoted_values),
            ("suppressed", lens.suppressed_tokens, lens.suppressed_values),
        ):
            print(
                f"  {title}: "
                + "  ".join(f"{t!r} {v:+.3f}" for t, v in zip(toks, vals, strict=True))
            )
        result: Any = lens
    if args.text is not None:
        prompt = json.loads(args.text) if args.chat else args.text
        result = top_features(model, tok, d, prompt, k=args.k, splice=args.splice)
        _print_report(result)
    if args.latent is None and args.text is None:
        raise ValueError("give a prompt text and/or --latent ID")
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="top dictionary latents per token of a prompt; a latent's logit lens"
    )
    p.add_argument("text", nargs="?", default=None, help="prompt (a JSON chat with --chat)")
    p.add_argument("--dictionary", required=True, help="dictionary folder (any format)")
    p.add_argument("--model", default=None, help="HF dir, hub id or .gguf (default: embedded)")
    p.add_argument("--k", type=int, default=10, help="latents per token / lens tokens")
    p.add_argument("--splice", action="store_true", help="also print reconstruction errors")
    p.add_argument("--chat", action="store_true", help="the text is a JSON list of turns")
    p.add_argument("--latent", type=int, default=None, help="print this latent's logit lens")
    p.add_argument("--layer", type=int, default=None, help="source layer of --latent (CLTs)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=_inspect_cli)
