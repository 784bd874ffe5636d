"""Chain-of-thought view: latents of the reasoning span vs the answer span of a model turn.

    view = cot_generate(model, tok, d, "What is 17 + 25?", max_new_tokens=64)
    view = cot_from_response(model, tok, d, "What is 17 + 25?", "17 + 25 = 42.\\nAnswer: 42")
    view.rows("answer", k=10), view.only_after_reasoning

The prompt (a question as a one-turn user chat, or a chat) and the response are encoded
together with the dictionary. The response splits at the last occurrence of a marker (default
`Answer:`): the reasoning span is the text before it, the answer span the text after it (the
marker's own tokens are in neither), or explicit character spans of the response are given. A
token belongs to a span when its characters lie inside it.

Per latent and span: mean activation and fraction of tokens where it is active (> 0).
Answer-relevant latents are the k with the largest mean activation over the answer span; those
never active on any prompt token (BOS excluded) nor any reasoning token appear "only after the
reasoning": the answer uses something the visible reasoning did not show.

`cot_generate` asks the model to think step by step and then write the marker and the answer.
When the completion has no marker (small or pretrained models often do not follow the
instruction) the marker is appended and the answer is generated after it ("answer forcing"),
and the view records `forced_answer=True`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemmascope_jax.analysis.common import (
    checked_dictionary,
    dictionary_label,
    token_char_spans,
    token_codes,
    token_strings,
)
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.generate import generate
from gemmascope_jax.gemma3.tokenizer import BOS_ID, prompt_ids

DEFAULT_MARKER = "Answer:"
COT_INSTRUCTION = (
    "{question}\n\nThink step by step and write out your reasoning. Then write '{marker}' "
    "followed by the final answer."
)
Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class CoTView:
    """Reasoning vs answer latents of one prompt + response (T tokens in all).

    prompt_span / reasoning_span / answer_span: token ranges `[start, end)` in the full
    sequence. Arrays over flat latents [L * F] (source layer i, latent j at `i * F + j`):
    reasoning_mean / reasoning_frac / answer_mean / answer_frac, and before_answer_active
    (bool: active on some prompt or reasoning token). answer_top: flat ids of the k latents
    with the largest answer mean (active ones only), descending; only_after_reasoning: those
    of answer_top with before_answer_active False, in the same order. codes [T, L * F].
    """

    dictionary: str
    layers: tuple[int, ...]
    width: int
    token_ids: np.ndarray
    tokens: tuple[str, ...]
    response_text: str
    prompt_span: Span
    reasoning_span: Span
    answer_span: Span
    reasoning_mean: np.ndarray
    reasoning_frac: np.ndarray
    answer_mean: np.ndarray
    answer_frac: np.ndarray
    before_answer_active: np.ndarray
    answer_top: np.ndarray
    only_after_reasoning: np.ndarray
    codes: np.ndarray
    forced_answer: bool = False

    def latent(self, flat: int) -> tuple[int, int]:
        """(model layer, latent id) of a flat index."""
        return int(self.layers[flat // self.width]), int(flat % self.width)

    def rows(self, span: str = "answer", k: int = 20) -> list[dict[str, Any]]:
        """Top-k latents of `span` (answer | reasoning) by mean activation, with both spans'
        statistics and whether the latent appears only after the reasoning."""
        if span not in ("answer", "reasoning"):
            raise ValueError(f"span must be 'answer' or 'reasoning', got {span!r}")
        mean = self.answer_mean if span == "answer" else self.reasoning_mean
        order = [int(f) for f in np.argsort(-mean, kind="stable")[:k] if mean[f] > 0]
        only = set(self.only_after_reasoning.tolist())
        return [
            {
                "layer": self.latent(f)[0],
                "id": self.latent(f)[1],
                "reasoning_mean": float(self.reasoning_mean[f]),
                "reasoning_frac": float(self.reasoning_frac[f]),
                "answer_mean": float(self.answer_mean[f]),
                "answer_frac": float(self.answer_frac[f]),
                "only_after_reasoning": f in only,
            }
            for f in order
        ]

    def to_dict(self, k: int = 20) -> dict[str, Any]:
        text = lambda span: "".join(self.tokens[span[0] : span[1]])
        return {
            "dictionary": self.dictionary,
            "response": self.response_text,
            "forced_answer": self.forced_answer,
            "spans": {
                name: {"tokens": list(span), "text": text(span)}
                for name, span in (
                    ("prompt", self.prompt_span),
                    ("reasoning", self.reasoning_span),
                    ("answer", self.answer_span),
                )
            },
            "answer_latents": self.rows("answer", k),
            "reasoning_latents": self.rows("reasoning", k),
            "only_after_reasoning": [
                dict(zip(("layer", "id"), self.latent(int(f)), strict=True))
                for f in self.only_after_reasoning
            ],
        }

    def to_json(self, k: int = 20, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(k), indent=indent)


def _check_span(name: str, span: Span, n: int) -> Span:
    a, b = (int(x) for x in span)
    if not 0 <= a <= b <= n:
        raise ValueError(f"{name} span {span} is not a range inside [0, {n}]")
    return a, b


def _span_stats(codes: np.ndarray, span: Span) -> tuple[np.ndarray, np.ndarray]:
    part = codes[span[0] : span[1]]
    if len(part) == 0:
        zeros = np.zeros(codes.shape[1], np.float32)
        return zeros, zeros
    return part.mean(0), (part > 0).mean(0)


def cot_view(
    model,
    dictionary: Dictionary,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    reasoning: Span,
    answer: Span,
    k: int = 20,
    tokenizer=None,
    response_text: str | None = None,
    forced_answer: bool = False,
) -> CoTView:
    """The view of `prompt_ids + response_ids` (token ids, BOS first) with the reasoning and
    answer spans given as token ranges `[start, end)` of the response (reasoning first)."""
    d = checked_dictionary(model, dictionary)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if not prompt_ids or not response_ids:
        raise ValueError("need a non-empty prompt and a non-empty response")
    n = len(response_ids)
    reasoning, answer = _check_span("reasoning", reasoning, n), _check_span("answer", answer, n)
    if reasoning[1] > answer[0]:
        raise ValueError(f"the reasoning span {reasoning} must end before the answer {answer}")
    if answer[0] == answer[1]:
        raise ValueError("the answer span is empty")
    ids = prompt_ids + response_ids
    (codes,) = token_codes(model, d, [ids])
    p = len(prompt_ids)
    reasoning_abs, answer_abs = (reasoning[0] + p, reasoning[1] + p), (answer[0] + p, answer[1] + p)
    before = np.zeros(len(ids), bool)
    before[:p] = np.asarray(prompt_ids) != BOS_ID
    before[reasoning_abs[0] : reasoning_abs[1]] = True
    before_active = (codes[before] > 0).any(0)
    r_mean, r_frac = _span_stats(codes, reasoning_abs)
    a_mean, a_frac = _span_stats(codes, answer_abs)
    top = np.array([f for f in np.argsort(-a_mean, kind="stable")[:k] if a_mean[f] > 0], np.int64)
    only = top[~before_active[top]] if len(top) else top
    return CoTView(
        dictionary=dictionary_label(d),
        layers=tuple(d.cfg.layers),
        width=d.cfg.width,
        token_ids=np.asarray(ids, np.int64),
        tokens=tuple(token_strings(tokenizer, ids)),
        response_text=response_text if response_text is not None else "",
        prompt_span=(0, p),
        reasoning_span=reasoning_abs,
        answer_span=answer_abs,
        reasoning_mean=r_mean,
        reasoning_frac=r_frac,
        answer_mean=a_mean,
        answer_frac=a_frac,
        before_answer_active=before_active,
        answer_top=top,
        only_after_reasoning=only,
        codes=codes,
        forced_answer=forced_answer,
    )


def marker_spans(text: str, marker: str = DEFAULT_MARKER) -> tuple[Span, Span]:
    """Character spans (reasoning, answer) of `text` split at the last `marker`."""
    if not marker:
        raise ValueError("the marker must be a non-empty string")
    at = text.rfind(marker)
    if at < 0:
        raise ValueError(f"marker {marker!r} not found in the response; pass explicit spans")
    return (0, at), (at + len(marker), len(text))


def char_to_token_span(char_spans: Sequence[Span], start: int, end: int) -> Span:
    """The token range `[first, last + 1)` of tokens lying inside characters `[start, end)`
    (an empty range at the first token after `start` when none does)."""
    inside = [i for i, (a, b) in enumerate(char_spans) if a >= start and b <= end and b > a]
    if not inside:
        after = [i for i, (a, _) in enumerate(char_spans) if a >= start]
        first = after[0] if after else len(char_spans)
        return first, first
    return inside[0], inside[-1] + 1


def _question_chat(question: str | Sequence[dict]) -> Sequence[dict]:
    return [{"role": "user", "content": question}] if isinstance(question, str) else question


def cot_from_response_ids(
    model,
    tokenizer,
    dictionary: Dictionary,
    question: str | Sequence[dict],
    response_ids: Sequence[int],
    marker: str = DEFAULT_MARKER,
    spans: tuple[Span, Span] | None = None,
    k: int = 20,
    forced_answer: bool = False,
) -> CoTView:
    """`cot_view` of a response given as token ids after the chat prompt of `question` (a
    string: one user turn; or a chat), split by `marker` or by character `spans` of the
    response text (`tokenizer.decode(response_ids)`)."""
    p_ids = list(prompt_ids(tokenizer, _question_chat(question)))
    response_ids = list(response_ids)
    text = tokenizer.decode(response_ids)
    reasoning_chars, answer_chars = spans if spans is not None else marker_spans(text, marker)
    char_spans = token_char_spans(tokenizer, response_ids)
    reasoning = char_to_token_span(char_spans, *reasoning_chars)
    answer = char_to_token_span(char_spans, *answer_chars)
    return cot_view(
        model,
        dictionary,
        p_ids,
        response_ids,
        reasoning,
        answer,
        k=k,
        tokenizer=tokenizer,
        response_text=text,
        forced_answer=forced_answer,
    )


def cot_from_response(
    model,
    tokenizer,
    dictionary: Dictionary,
    question: str | Sequence[dict],
    response: str,
    marker: str = DEFAULT_MARKER,
    spans: tuple[Span, Span] | None = None,
    k: int = 20,
) -> CoTView:
    """The view of an existing response text to `question` (the response is tokenized)."""
    if not isinstance(response, str) or not response.strip():
        raise ValueError("the response must be a non-empty string")
    ids = tokenizer.encode(response, add_bos=False)
    return cot_from_response_ids(
        model, tokenizer, dictionary, question, ids, marker=marker, spans=spans, k=k
    )


def cot_generate(
    model,
    tokenizer,
    dictionary: Dictionary,
    question: str,
    max_new_tokens: int = 96,
    max_answer_tokens: int = 16,
    marker: str = DEFAULT_MARKER,
    k: int = 20,
) -> CoTView:
    """Ask `question` with `COT_INSTRUCTION`, generate greedily, and view the turn; when the
    completion lacks `marker`, append it and generate the answer (see the module doc)."""
    checked_dictionary(model, dictionary)
    chat = [{"role": "user", "content": COT_INSTRUCTION.format(question=question, marker=marker)}]
    p_ids = list(prompt_ids(tokenizer, chat))
    stop = tuple(tokenizer.stop_ids)
    (new,) = generate(model, [p_ids], max_new_tokens=max_new_tokens, stop_ids=stop)
    response = [i for i in new if i not in stop]
    forced = marker not in tokenizer.decode(response)
    if forced:
        response += tokenizer.encode(f"\n{marker}", add_bos=False)
        (answer,) = generate(
            model, [p_ids + response], max_new_tokens=max_answer_tokens, stop_ids=stop
        )
        response += [i for i in answer if i not in stop]
    return cot_from_response_ids(
        model, tokenizer, dictionary, chat, response, marker=marker, k=k, forced_answer=forced
    )
