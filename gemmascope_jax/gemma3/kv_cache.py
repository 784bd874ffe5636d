"""KV-cache decoding for `Gemma3`: prefill a left-padded prompt, then one token per step.

    logits, cache = prefill(model, tokens, mask, cache_length)   # [batch, vocab], KVCache
    logits, cache = decode_step(model, next_ids, cache)          # next_ids [batch]

Tokens sit in a buffer of `cache_length` positions (the left-padded prompt, then the new
tokens) and every row advances one buffer index per step. Global layers keep a key/value per
buffer index; sliding layers keep a ring of `min(sliding_window, cache_length)` slots, which
holds exactly the window a query may see. Both functions reuse the forward's modules
(`DecoderLayer.forward_with`, `Attention.project` / `attend`), so site interventions apply
as in the forward: an intervention receives `[batch, chunk, ...]`, with chunk the prompt
length in `prefill` and 1 in `decode_step`, so steering functions must not depend on the
sequence length. `attn_pattern` interventions are refused (the key axis is cache slots).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp

from gemmascope_jax.gemma3.layers import attention_masks, rope_tables
from gemmascope_jax.gemma3.model import Attention, Gemma3, Intervention, SiteHooks
from gemmascope_jax.gemma3.sites import Site


@flax.struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far.

    keys, values: per layer [batch, slots, kv_heads, head_dim]; buffer index i lives in slot
    `i % slots` (global layers: slots = cache length, so slot i). valid [batch, length]:
    buffer positions holding real (non-padding) tokens. next_position [batch]: RoPE position
    of the next token per row. index: buffer index of the next token (shared by all rows).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    next_position: jax.Array
    index: jax.Array


def cache_slots(model: Gemma3, layer: int, cache_length: int) -> int:
    """Slots of a layer's cache: the sliding window (ring) or every buffer position."""
    if model.cfg.is_sliding(layer):
        return min(model.cfg.sliding_window, cache_length)
    return cache_length


def prefill(
    model: Gemma3,
    tokens: jax.Array,
    attention_mask: jax.Array,
    cache_length: int,
    *,
    interventions: Mapping[str, Intervention] | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt and build the cache.

    tokens, attention_mask: [batch, prompt], left-padded; positions are `cumsum(mask) - 1` as
    in the forward, which this is (same numbers). cache_length: buffer positions to hold
    (prompt + new tokens). Returns the last column's logits [batch, vocab] (a `logits`
    intervention sees [batch, 1, vocab]) and the cache.
    """
    cfg = model.cfg
    hook = _decoding_hooks(cfg.num_layers, interventions)
    valid = jnp.asarray(attention_mask).astype(bool)
    b, t = valid.shape
    if cache_length < t:
        raise ValueError(f"cache_length {cache_length} is shorter than the prompt ({t})")
    ropes = _ropes(model, jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0))
    masks = attention_masks(valid, cfg.sliding_window)
    h = model.embed(jnp.asarray(tokens))
    kv_pairs: list[tuple[jax.Array, jax.Array]] = []
    for i, layer in enumerate(model.layers):
        sliding, hook_i = cfg.is_sliding(i), hook.at_layer(i)
        attention = functools.partial(
            _prefill_attention, layer.self_attn, ropes[sliding], masks[sliding], hook_i, kv_pairs
        )
        h = layer.forward_with(h, attention, hook_i)
    slots = [cache_slots(model, i, cache_length) for i in range(cfg.num_layers)]
    cache = KVCache(
        keys=tuple(_fill(k, n) for (k, _), n in zip(kv_pairs, slots, strict=True)),
        values=tuple(_fill(v, n) for (_, v), n in zip(kv_pairs, slots, strict=True)),
        valid=jnp.zeros((b, cache_length), bool).at[:, :t].set(valid),
        next_position=jnp.sum(valid, axis=-1).astype(jnp.int32),
        index=jnp.asarray(t, jnp.int32),
    )
    return _last_logits(model, h, hook), cache


def decode_step(
    model: Gemma3,
    tokens: jax.Array,
    cache: KVCache,
    *,
    interventions: Mapping[str, Intervention] | None = None,
) -> tuple[jax.Array, KVCache]:
    """tokens [batch] at buffer index `cache.index` -> next-token logits [batch, vocab] and the
    updated cache. Stepping past the cache length is undefined (`generate` never does)."""
    cfg = model.cfg
    hook = _decoding_hooks(cfg.num_layers, interventions)
    index = cache.index
    valid = cache.valid.at[:, index].set(True)
    ropes = _ropes(model, cache.next_position[:, None])
    masks: dict[int, jax.Array] = {}
    h = model.embed(jnp.asarray(tokens)[:, None])
    updated: list[tuple[jax.Array, jax.Array]] = []
    for i, layer in enumerate(model.layers):
        n_slots = cache.keys[i].shape[1]
        if n_slots not in masks:
            masks[n_slots] = _slot_mask(valid, index, n_slots)
        hook_i = hook.at_layer(i)
        attention = functools.partial(
            _cached_attention,
            layer.self_attn,
            ropes[cfg.is_sliding(i)],
            masks[n_slots],
            hook_i,
            (cache.keys[i], cache.values[i], index % n_slots),
            updated,
        )
        h = layer.forward_with(h, attention, hook_i)
    cache = KVCache(
        keys=tuple(k for k, _ in updated),
        values=tuple(v for _, v in updated),
        valid=valid,
        next_position=cache.next_position + 1,
        index=index + 1,
    )
    return _last_logits(model, h, hook), cache


def _decoding_hooks(num_layers: int, interventions) -> SiteHooks:
    hook = SiteHooks(num_layers, (), interventions or {})
    if patterns := [s.name for s in hook.interventions if s.kind == "attn_pattern"]:
        raise ValueError(
            f"interventions at {patterns} are not supported with the KV cache (the pattern's key "
            "axis is cache slots); intervene at attn_z, or run the full forward"
        )
    return hook


def _ropes(model: Gemma3, positions: jax.Array) -> dict[bool, tuple[jax.Array, jax.Array]]:
    cfg = model.cfg
    return {
        sliding: rope_tables(positions, cfg.head_dim, *model.rope_params(sliding), cfg.dtype)
        for sliding in (True, False)
    }


def _prefill_attention(attn: Attention, rope, mask, hook, sink: list, x: jax.Array):
    """The forward's self-attention over the prompt; hands (k, v) [batch, t, kv, hd] to sink."""
    q_btkgh, k_bskh, v_bskh = attn.project(x, rope)
    sink.append((k_bskh, v_bskh))
    return attn.attend(q_btkgh, k_bskh, v_bskh, mask, hook)


def _cached_attention(attn: Attention, rope, mask, hook, layer_cache, sink: list, x: jax.Array):
    """x [batch, 1, d_model]: write this token's k/v at its slot, attend over the cache; hands
    the updated (keys, values) to sink."""
    keys, values, slot = layer_cache
    q_btkgh, k_bskh, v_bskh = attn.project(x, rope)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, k_bskh.astype(keys.dtype), slot, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(values, v_bskh.astype(values.dtype), slot, axis=1)
    sink.append((keys, values))
    return attn.attend(q_btkgh, keys, values, mask, hook)


def _fill(x_bskh: jax.Array, n_slots: int) -> jax.Array:
    """Prompt keys or values [batch, t, kv, hd] -> cache [batch, n_slots, kv, hd] holding the
    last min(t, n_slots) of them, buffer index i at slot `i % n_slots`."""
    b, t, kv, hd = x_bskh.shape
    kept = jnp.arange(max(0, t - n_slots), t)
    cache = jnp.zeros((b, n_slots, kv, hd), x_bskh.dtype)
    return cache.at[:, kept % n_slots].set(x_bskh[:, kept])


def _slot_mask(valid: jax.Array, index: jax.Array, n_slots: int) -> jax.Array:
    """bool [batch, 1, 1, 1, n_slots]: the slots a query at buffer `index` sees once its own
    key is written. Slot j holds the latest buffer index `<= index` congruent to j (none when
    j > index); padding is masked through `valid` [batch, length]."""
    slot = jnp.arange(n_slots)
    held = slot + n_slots * ((index - slot) // n_slots)
    seen = (slot <= index) & jnp.take(valid, jnp.clip(held, 0, valid.shape[1] - 1), axis=1)
    return seen[:, None, None, None, :]


def _last_logits(model: Gemma3, h: jax.Array, hook: SiteHooks) -> jax.Array:
    """h [batch, t, d_model] -> logits of the last column [batch, vocab] (final_norm and logits
    interventions apply)."""
    h = hook.apply(Site("final_norm"), model.norm(h))
    return hook.apply(Site("logits"), model.unembed(h[:, -1:]))[:, 0]
