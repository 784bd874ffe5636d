"""KV-cache generation: equal to recomputing the full forward at every step, equal to
transformers' greedy generation, interventions, top-p sampling and one compile per shape."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemmascope_jax.gemma3.generate import generate, generate_with_logits

NEW = 14  # with prompts up to 11 tokens the buffer (25) is 3x the sliding window (8)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(4, 512, size=n).tolist() for n in (5, 11, 3)]


@pytest.fixture(scope="module")
def greedy(tiny_model, prompts):
    return generate_with_logits(tiny_model, prompts, max_new_tokens=NEW, stop_ids=())


def _full_recompute(model, prompts, steps, interventions=None):
    """Greedy decoding by the plain forward over the whole left-padded buffer at every step.
    Returns tokens [batch, steps] and logits [batch, steps, vocab]."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width + steps), np.int32)
    mask = np.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) : width] = p
        mask[i, width - len(p) : width] = 1
    forward = model.jitted(interventions=interventions)
    logits = []
    for s in range(steps):
        out = forward(jnp.asarray(tokens), jnp.asarray(mask)).logits
        logits.append(np.asarray(out[:, width + s - 1]))
        tokens[:, width + s] = logits[-1].argmax(-1)
        mask[:, width + s] = 1
    return tokens[:, width:], np.stack(logits, axis=1)


def test_cache_equals_full_recompute(tiny_model, prompts, greedy):
    assert tiny_model.cfg.sliding_window < max(map(len, prompts)) + NEW
    ref_tokens, ref_logits = _full_recompute(tiny_model, prompts, NEW)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), ref_tokens)
    np.testing.assert_allclose(greedy.logits, ref_logits, atol=1e-5, rtol=0)


def test_greedy_matches_transformers(hf_tiny, prompts, greedy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    try:
        for prompt, ours in zip(prompts, greedy.tokens, strict=True):
            with torch.no_grad():
                ref = hf_tiny.generate(
                    torch.as_tensor([prompt]),
                    max_new_tokens=NEW,
                    do_sample=False,
                    eos_token_id=None,
                    use_cache=True,
                )
            assert ours == ref[0, len(prompt) :].tolist()
    finally:
        torch.set_num_threads(threads)


def test_stop_ids_end_rows(tiny_model, prompts, greedy):
    stop = greedy.tokens[0][3]
    out = generate_with_logits(tiny_model, prompts, max_new_tokens=NEW, stop_ids=(stop,))
    assert out.logits.shape[1] == max(map(len, out.tokens))  # the loop ends when all stopped
    for row, full in zip(out.tokens, greedy.tokens, strict=True):
        cut = full.index(stop) + 1 if stop in full else NEW
        assert row == full[:cut]


def test_interventions_during_generation_and_one_compile(tiny_model, prompts, greedy):
    delta = jnp.asarray(np.random.RandomState(1).normal(size=64) * 30, jnp.float32)
    traces = []

    def steer(x):  # runs only when traced: once in the prefill, once in the decode loop
        traces.append(x.shape)
        return x + delta

    others = {  # a global layer's attention (2) and a sliding layer's MLP input (4)
        "attn_z.2": lambda z: 1.5 * z,
        "model.layers.4.pre_feedforward_layernorm.output": lambda x: x - 0.5,
    }
    kw = dict(max_new_tokens=NEW, stop_ids=())
    res = generate_with_logits(
        tiny_model, prompts, interventions={"resid_post.3": steer, **others}, **kw
    )
    assert [s[1] for s in traces] == [16, 1]  # [batch, chunk, d]: padded prompt, 1 token
    ref_tokens, ref_logits = _full_recompute(
        tiny_model, prompts, NEW, {"resid_post.3": lambda x: x + delta, **others}
    )
    np.testing.assert_array_equal(np.asarray(res.tokens), ref_tokens)
    np.testing.assert_allclose(res.logits, ref_logits, atol=1e-5, rtol=0)
    assert res.tokens != greedy.tokens
    other = [p[1:] for p in prompts]  # other tokens and lengths, same bucket: no retrace
    generate_with_logits(tiny_model, other, interventions={"resid_post.3": steer, **others}, **kw)
    assert len(traces) == 2


def test_top_p_sampling(tiny_model, prompts, greedy):
    kw = dict(max_new_tokens=NEW, stop_ids=(), temperature=1.0)
    a = generate(tiny_model, prompts, seed=3, top_p=0.9, **kw)
    assert a == generate(tiny_model, prompts, seed=3, top_p=0.9, **kw)
    assert a != generate(tiny_model, prompts, seed=4, top_p=0.9, **kw)
    assert generate(tiny_model, prompts, seed=3, top_p=0.0, **kw) == greedy.tokens


def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="non-empty"):
        generate(tiny_model, [[]])
    with pytest.raises(ValueError, match=r"ids in \[0, 512\)"):
        generate(tiny_model, [[2, 900]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_model, [[2, 5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="not supported with the KV cache"):
        generate(tiny_model, [[2, 5]], interventions={"attn_pattern.0": lambda p: p})
