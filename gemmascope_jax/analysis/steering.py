"""Steering, clamping, ablating and splicing with dictionary latents.

Each builder returns interventions `{site name: fn}` for `model(..., interventions=...)` and
`generate(..., interventions=...)` (functions of [batch, chunk, d], independent of chunk):

    steer_interventions(d, [123], alpha=8)            # x_out += 8 * ||x_out|| * d_123
    steer_interventions(d, [123], alpha=8, mode="raw")  # x_out += 8 * d_123
    clamp_interventions(d, [123], value=20.0)         # latent 123 := 20 (its decoder delta)
    ablate_interventions(d, [123, 7])                 # subtract their decoder contribution
    splice_interventions(d, keep_error=False)         # x_out := reconstruction
    result = steer(model, tok, d, "prompt", [123], alpha=8)   # SteeringResult

`d_f` is latent f's unit decoder row at the dictionary's output site (for multi-layer
dictionaries: the row from `source_layer` to `output_layer`, model layer indices). Norm
scaling follows the Gemma Scope tutorial: `||x||` is the activation's norm per token.
Clamping encodes the input-site activation, then adds `(value - f) * w_dec[f]` (the raw
decoder row: exactly the change of the reconstruction) at every output site of the latent;
ablation is clamping to 0. Works for SAEs, (skip-)transcoders, CLTs and crosscoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gemmascope_jax.analysis.common import check_dictionary, check_latents, dictionary_label
from gemmascope_jax.dictionaries import Dictionary, apply_activation
from gemmascope_jax.gemma3.model import Intervention

MODES = ("norm", "raw", "clamp")


@dataclasses.dataclass(frozen=True)
class SteeringResult:
    """A baseline and a steered completion of one prompt, and how they were made."""

    prompt: str | list[dict]
    baseline_text: str
    baseline_ids: list[int]
    steered_text: str
    steered_ids: list[int]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- intervention builders ------------------------------------------------------------------


def decoder_direction(
    d: Dictionary, latent: int, *, source_layer: int | None = None, output_layer=None
) -> tuple[str, jax.Array]:
    """(output site, unit decoder row d_f [d_out]) of a latent, for multi-layer dictionaries
    from `source_layer` to `output_layer` (default: the source layer itself)."""
    (latent,) = check_latents(d, [latent])
    src = _layer_position(d, source_layer, "source_layer")
    out = src if output_layer is None else _layer_position(d, output_layer, "output_layer")
    if out < src:
        raise ValueError(
            f"latents of source layer {d.cfg.layers[src]} write only to layers >= it, "
            f"not {d.cfg.layers[out]}"
        )
    row = _decoder_row(d, latent, src, out)
    return d.cfg.output_sites[out], row / jnp.maximum(jnp.linalg.norm(row), 1e-12)


def steer_interventions(
    d: Dictionary,
    latents: Sequence[int],
    alpha: float,
    *,
    mode: str = "norm",
    source_layer: int | None = None,
    output_layer: int | None = None,
) -> dict[str, Intervention]:
    """Add `alpha * ||x|| * sum_f d_f` (mode `norm`) or `alpha * sum_f d_f` (mode `raw`) to
    the output-site activation x [..., d_out] at every token."""
    if mode not in ("norm", "raw"):
        raise ValueError(f"steering mode must be 'norm' or 'raw', got {mode!r}")
    ids = _nonempty(d, latents)
    site, direction = None, 0.0
    for f in ids:
        site, d_f = decoder_direction(d, f, source_layer=source_layer, output_layer=output_layer)
        direction = direction + d_f
    scale = jnp.float32(alpha)

    def add(x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        size = jnp.linalg.norm(xf, axis=-1, keepdims=True) if mode == "norm" else 1.0
        return (xf + scale * size * direction).astype(x.dtype)

    return {site: add}


def clamp_interventions(
    d: Dictionary, latents: Sequence[int], value: float, *, source_layer: int | None = None
) -> dict[str, Intervention]:
    """Set latents to `value`: encode the input site, then add `(value - f) * w_dec[f]` at each
    output site the latents write to (the same site for SAEs and crosscoders)."""
    ids = jnp.asarray(_nonempty(d, latents))
    src = _layer_position(d, source_layer, "source_layer")
    codes: dict[int, jax.Array] = {}

    def read(x: jax.Array) -> jax.Array:
        codes[src] = _encode_layer(d, x, src)[..., ids]
        return x

    reads = {d.cfg.input_sites[src]: [read]}
    writes: dict[str, list[Callable]] = {}
    for out in range(src, d.cfg.num_layers):
        rows = jnp.stack([_decoder_row(d, int(f), src, out) for f in ids])

        def write(x: jax.Array, rows=rows) -> jax.Array:
            delta = (jnp.float32(value) - codes[src].astype(jnp.float32)) @ rows
            return (x.astype(jnp.float32) + delta).astype(x.dtype)

        writes.setdefault(d.cfg.output_sites[out], []).append(write)
    return _chain(reads, writes)


def ablate_interventions(
    d: Dictionary, latents: Sequence[int], *, source_layer: int | None = None
) -> dict[str, Intervention]:
    """Subtract the latents' decoder contribution `f * w_dec[f]` (clamping them to 0)."""
    return clamp_interventions(d, latents, 0.0, source_layer=source_layer)


def splice_interventions(d: Dictionary, *, keep_error: bool = False) -> dict[str, Intervention]:
    """Replace every output site by the dictionary's reconstruction, plus the error term
    `x - reconstruction` when `keep_error` (then an identity up to rounding; combine it with
    other interventions to study the reconstruction's role)."""
    cfg = d.cfg
    inputs: dict[int, jax.Array] = {}
    reads: dict[str, list[Callable]] = {}
    writes: dict[str, list[Callable]] = {}
    for layer in range(cfg.num_layers):

        def read(x: jax.Array, layer=layer) -> jax.Array:
            inputs[layer] = x
            return x

        def write(x: jax.Array, layer=layer) -> jax.Array:
            recon = _reconstruct_layer(d, inputs, layer).astype(jnp.float32)
            err = x.astype(jnp.float32) - recon if keep_error else 0.0
            return (recon + err).astype(x.dtype)

        reads.setdefault(cfg.input_sites[layer], []).append(read)
        writes.setdefault(cfg.output_sites[layer], []).append(write)
    return _chain(reads, writes)


def combine_interventions(*parts: Mapping[str, Intervention]) -> dict[str, Intervention]:
    """Merge intervention dicts; functions at the same site run in the given order."""
    merged: dict[str, list[Callable]] = {}
    for part in parts:
        for site, fn in part.items():
            merged.setdefault(site, []).append(fn)
    return {site: _compose(fns) for site, fns in merged.items()}


# ---- generation -----------------------------------------------------------------------------


def steer(
    model,
    tokenizer,
    d: Dictionary,
    prompt: str | list[dict],
    latents: Sequence[int],
    alpha: float,
    *,
    mode: str = "norm",
    max_new_tokens: int = 32,
    source_layer: int | None = None,
    output_layer: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> SteeringResult:
    """Greedy (or sampled) completions of `prompt` (a string or a chat) without and with
    steering. Mode `clamp` clamps the latents to `alpha`."""
    from gemmascope_jax.gemma3.generate import generate, prompt_id_lists

    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {MODES}")
    check_dictionary(model.cfg, d)
    ids = _nonempty(d, latents)
    if mode == "clamp":
        interventions = clamp_interventions(d, ids, alpha, source_layer=source_layer)
    else:
        interventions = steer_interventions(
            d, ids, alpha, mode=mode, source_layer=source_layer, output_layer=output_layer
        )
    (prompt_ids,) = prompt_id_lists(tokenizer, prompt)
    kw = dict(
        max_new_tokens=max_new_tokens,
        stop_ids=tokenizer.stop_ids,
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        seed=seed,
    )
    # One batch, one compile: row 0 is the baseline, row 1 the steered completion.
    steered_row = {site: _only_rows(fn, (False, True)) for site, fn in interventions.items()}
    baseline, steered = generate(model, [prompt_ids] * 2, interventions=steered_row, **kw)
    text = lambda row: tokenizer.decode(row, skip_special_tokens=True)
    settings = {
        "dictionary": dictionary_label(d),
        "sites": sorted(interventions),
        "latents": ids,
        "alpha": float(alpha),
        "mode": mode,
        "source_layer": source_layer,
        "output_layer": output_layer,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    return SteeringResult(prompt, text(baseline), baseline, text(steered), steered, settings)


# ---- helpers --------------------------------------------------------------------------------


def _nonempty(d: Dictionary, latents: Sequence[int]) -> list[int]:
    ids = check_latents(d, latents)
    if not ids:
        raise ValueError("name at least one latent")
    return ids


def _layer_position(d: Dictionary, layer: int | None, what: str) -> int:
    """Index into `d.cfg.layers` of a model layer (None: the first source layer)."""
    if layer is None:
        return 0
    if layer not in d.cfg.layers:
        raise ValueError(
            f"{what} {layer} is not a layer of {dictionary_label(d)}; its layers are "
            f"{list(d.cfg.layers)}"
        )
    return d.cfg.layers.index(layer)


def _decoder_row(d: Dictionary, latent: int, src: int, out: int) -> jax.Array:
    """Raw decoder row [d_out] of a latent of source position src at output position out."""
    if d.cfg.multilayer:
        return d.w_dec[src][latent, out - src].astype(jnp.float32)
    return d.w_dec[latent].astype(jnp.float32)


def _encode_layer(d: Dictionary, x: jax.Array, src: int) -> jax.Array:
    """Codes [..., F] of source position src from its input-site activation x [..., d_in]."""
    if not d.cfg.multilayer:
        return d.encode(x)
    cfg, xf = d.cfg, x.astype(jnp.float32)
    pre = (xf - d.b_pre[src]) @ d.w_enc[src] + d.b_enc[src]
    threshold = None if d.threshold is None else d.threshold[src]
    return apply_activation(cfg.architecture, pre, threshold=threshold, k=cfg.k)


def _reconstruct_layer(d: Dictionary, inputs: Mapping[int, jax.Array], out: int) -> jax.Array:
    """The dictionary's prediction [..., d_out] of output position `out` from the recorded
    input-site activations of source positions <= out."""
    if not d.cfg.multilayer:
        return d(inputs[out])
    y = d.b_dec[out].astype(jnp.float32)
    for src in range(out + 1):
        y = y + _encode_layer(d, inputs[src], src) @ d.w_dec[src][:, out - src]
    if d.w_skip is not None:
        y = y + inputs[out].astype(jnp.float32) @ d.w_skip[out]
    return y


def _only_rows(fn: Intervention, rows: Sequence[bool]) -> Intervention:
    """`fn` applied to the batch rows flagged in `rows`, identity on the others."""
    flags = jnp.asarray(rows)

    def run(x: jax.Array) -> jax.Array:
        return jnp.where(flags.reshape(-1, *[1] * (x.ndim - 1)), fn(x), x)

    return run


def _chain(reads: Mapping[str, list], writes: Mapping[str, list]) -> dict[str, Intervention]:
    """One function per site: its reads (which record the unmodified activation) first."""
    sites = dict.fromkeys([*reads, *writes])
    return {s: _compose([*reads.get(s, []), *writes.get(s, [])]) for s in sites}


def _compose(fns: Sequence[Callable]) -> Intervention:
    if len(fns) == 1:
        return fns[0]

    def run(x: jax.Array) -> jax.Array:
        for fn in fns:
            x = fn(x)
        return x

    return run
