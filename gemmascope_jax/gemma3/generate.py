"""Autoregressive decoding with site interventions applied at every step.

This decoder recomputes the whole (fixed-size, left-padded) buffer at each step instead of
keeping a KV cache: one compile per (batch, prompt length, max_new_tokens), exact by
construction (every step is the ordinary forward), and fast enough for short completions on
the small models. Interventions run in every step, so steering affects the whole completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemmascope_jax.gemma3.model import Gemma3, Intervention

IT_STOP_IDS = (1, 106)  # <eos>, <end_of_turn>


def generate(
    model: Gemma3,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = IT_STOP_IDS,
    temperature: float = 0.0,
    seed: int = 0,
    interventions: Mapping[str, Intervention] | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt (token ids, BOS included) and return only the new ids.

    Greedy when `temperature == 0`, else samples from softmax(logits / temperature). A row
    stops at its first stop id (which is kept); the loop ends when every row has stopped.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = np.full((batch, total), pad_id, np.int32)
    mask = np.zeros((batch, total), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p) : prompt_len] = p
        mask[i, prompt_len - len(p) : prompt_len] = 1
    step = _step_fn(model, interventions, float(temperature))
    state = nnx.state(model)
    key = jax.random.key(seed)
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        pos = prompt_len + i
        # Slots not yet generated are masked (and causally invisible to position pos - 1).
        next_ids = np.asarray(step(state, tokens, mask, pos - 1, sub))
        for row in np.flatnonzero(~done):
            out[row].append(int(next_ids[row]))
            done[row] = next_ids[row] in stop_ids
        tokens[:, pos] = next_ids
        mask[:, pos] = 1
        if done.all():
            break
    return out


def _step_fn(model: Gemma3, interventions, temperature: float):
    graphdef = nnx.graphdef(model)

    @jax.jit
    def step(state, tokens, mask, index, key):
        m = nnx.merge(graphdef, state)
        out = m(
            tokens,
            attention_mask=mask,
            capture=("final_norm",),
            interventions=interventions,
            logits=False,
        )
        last = jax.lax.dynamic_index_in_dim(out.sites["final_norm"], index, 1, keepdims=False)
        logits = m.unembed(last).astype(jnp.float32)
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits / temperature, axis=-1)

    return step
