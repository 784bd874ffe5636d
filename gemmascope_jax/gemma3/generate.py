"""Autoregressive decoding with a KV cache, sampling and site interventions.

    new_ids = generate(model, [ids_a, ids_b], max_new_tokens=32)        # greedy
    new_ids = generate(model, prompts, temperature=0.8, top_p=0.95, seed=1)
    texts = generate_text(model, tok, ["Hi", [{"role": "user", "content": "Hi"}]])
    result = generate_with_logits(model, prompts, max_new_tokens=8)     # + logits per step

Prompts are left-padded into one buffer (RoPE positions `cumsum(mask) - 1`, as the forward
computes them); `kv_cache.prefill` runs the prompt, then `kv_cache.decode_step` adds one token
per step inside a `jax.lax.while_loop` that ends when every row has emitted a stop id. The
whole loop is one jitted program, compiled once per (batch, prompt length rounded up to
`pad_multiple`, max_new_tokens, greedy or sampling, logits kept or not), model structure and
set of intervention functions: reuse the same function objects to avoid recompiling.

Interventions (site -> function) run in the prefill and in every decode step. A function
receives `[batch, chunk, ...]` with chunk the (padded) prompt length in the prefill and 1 in
the decode steps, so it must not depend on the sequence length; `attn_pattern`
interventions are refused with the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemmascope_jax.gemma3.kv_cache import decode_step, prefill
from gemmascope_jax.gemma3.model import Gemma3, Intervention
from gemmascope_jax.gemma3.tokenizer import prompt_ids

IT_STOP_IDS = (1, 106)  # <eos>, <end_of_turn>


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """tokens: the new ids per row, each ending at (and keeping) its first stop id.
    logits: float32 [batch, steps, vocab], the distribution each new token was picked from
    (rows keep stepping after they stop; their later columns are unused)."""

    tokens: list[list[int]]
    logits: np.ndarray


def generate(
    model: Gemma3,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = IT_STOP_IDS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    interventions: Mapping[str, Intervention] | None = None,
    pad_id: int = 0,
    pad_multiple: int = 16,
) -> list[list[int]]:
    """Continue each prompt (token ids, BOS included) and return only the new ids per row.

    Greedy when `temperature == 0`; else samples from softmax(logits / temperature) restricted
    to the nucleus: the most likely tokens whose probabilities sum to `top_p` (the top token is
    always kept, so `top_p -> 0` is greedy). A row stops at its first stop id (kept).
    Prompts are left-padded to a multiple of `pad_multiple` tokens (padding is masked: it
    changes results only by float rounding), so prompts of similar lengths share one compile.
    """
    return _run(
        model,
        prompts,
        keep_logits=False,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        interventions=interventions,
        pad_id=pad_id,
        pad_multiple=pad_multiple,
    ).tokens


def generate_with_logits(model: Gemma3, prompts: Sequence[Sequence[int]], **kwargs):
    """`generate` (same keyword arguments) that also returns the logits of every step, as a
    `GenerationResult`."""
    return _run(model, prompts, keep_logits=True, **kwargs)


def generate_text(
    model: Gemma3,
    tokenizer,
    prompts,
    *,
    skip_special_tokens: bool = True,
    **kwargs,
) -> list[str]:
    """Completions (text) of strings or chats (lists of {role, content}, rendered with the
    chat template and a generation prompt); one prompt or a list. `kwargs` go to `generate`
    (stop ids and pad id default to the tokenizer's)."""
    ids = prompt_id_lists(tokenizer, prompts)
    kwargs.setdefault("stop_ids", tokenizer.stop_ids)
    kwargs.setdefault("pad_id", tokenizer.pad_id)
    new = generate(model, ids, **kwargs)
    return [tokenizer.decode(row, skip_special_tokens=skip_special_tokens) for row in new]


def prompt_id_lists(tokenizer, prompts) -> list[list[int]]:
    """Token ids of one prompt or a list of prompts, each a string or a chat."""
    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], dict)
    )
    return [prompt_ids(tokenizer, p) for p in ([prompts] if single else prompts)]


def _run(
    model: Gemma3,
    prompts,
    *,
    keep_logits: bool,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = IT_STOP_IDS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    interventions: Mapping[str, Intervention] | None = None,
    pad_id: int = 0,
    pad_multiple: int = 16,
) -> GenerationResult:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0 or not 0 <= top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 <= top_p <= 1, got {temperature}, {top_p}")
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}")
    tokens, mask = _left_pad(prompts, pad_id, model.cfg.vocab_size, pad_multiple)
    interventions = tuple(sorted((interventions or {}).items(), key=lambda item: str(item[0])))
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    new, steps, logits = _decode_loop(
        nnx.state(model),
        jnp.asarray(tokens),
        jnp.asarray(mask),
        stops,
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        graphdef=nnx.graphdef(model),
        interventions=interventions,
        max_new_tokens=max_new_tokens,
        sample=temperature > 0,
        keep_logits=keep_logits,
    )
    new, steps, stop_set = np.asarray(new), int(steps), set(stop_ids)
    rows = []
    for row in new[:, :steps].tolist():
        ends = [i for i, t in enumerate(row) if t in stop_set]
        rows.append(row[: ends[0] + 1] if ends else row)
    kept = np.asarray(logits[:, :steps], np.float32) if keep_logits else np.zeros((0,), np.float32)
    return GenerationResult(tokens=rows, logits=kept)


def _left_pad(prompts, pad_id: int, vocab_size: int, multiple: int):
    """Left-padded int32 tokens and mask [batch, longest prompt rounded up to `multiple`]."""
    if isinstance(prompts, str) or not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a list of non-empty token-id lists")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple
    tokens = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        ids = np.asarray(p, np.int64)
        if ids.ndim != 1 or ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i} must be a flat list of ids in [0, {vocab_size})")
        tokens[i, width - len(ids) :] = ids
        mask[i, width - len(ids) :] = 1
    return tokens, mask


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "interventions", "max_new_tokens", "sample", "keep_logits"),
)
def _decode_loop(
    state,
    tokens,
    mask,
    stop_ids,
    key,
    temperature,
    top_p,
    *,
    graphdef,
    interventions,
    max_new_tokens,
    sample,
    keep_logits,
):
    """Prefill, then decode until every row stopped or max_new_tokens ids were picked.
    Returns (new ids [batch, max_new_tokens], steps taken, logits [batch, steps or 1, vocab])."""
    model = nnx.merge(graphdef, state)
    fns = dict(interventions)
    b, t = tokens.shape
    logits, cache = prefill(model, tokens, mask, t + max_new_tokens, interventions=fns)

    def pick(logits, key):
        logits = logits.astype(jnp.float32)
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _sample_top_p(key, logits / temperature, top_p)

    def record(carry, logits, step):
        out, done, all_logits, key = carry
        key, sub = jax.random.split(key)
        new = pick(logits, sub)
        out = out.at[:, step].set(new)
        if keep_logits:
            all_logits = all_logits.at[:, step].set(logits.astype(jnp.float32))
        return (out, done | jnp.isin(new, stop_ids), all_logits, key), new

    vocab = logits.shape[-1]
    all_logits = jnp.zeros((b, max_new_tokens if keep_logits else 1, vocab), jnp.float32)
    init = (jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), bool), all_logits, key)
    carry, last = record(init, logits, 0)

    def cond(loop):
        step, _, _, carry = loop
        return (step < max_new_tokens) & ~jnp.all(carry[1])

    def body(loop):
        step, last, cache, carry = loop
        logits, cache = decode_step(model, last, cache, interventions=fns)
        carry, new = record(carry, logits, step)
        return step + 1, new, cache, carry

    steps, _, _, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), last, cache, carry))
    return carry[0], steps, carry[2]


def _sample_top_p(key: jax.Array, logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sample from the nucleus of logits [batch, vocab]: tokens in descending probability
    order while the mass before them is below top_p (the first always kept)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
