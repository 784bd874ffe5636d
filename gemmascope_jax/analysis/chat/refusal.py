"""Refusal direction: where harmful and harmless requests separate, and what removing it does.

    harmful, harmless = load_prompt_set("harmful"), load_prompt_set("harmless")
    rd = refusal_direction(model, chat_ids(tok, harmful), chat_ids(tok, harmless))
    rd.direction [d] (unit), rd.norm, rd.harmful_projection [n_layers]
    al = aligned_latents(d, rd.direction, k=10)         # decoder rows / encoder columns
    rates = ablation_refusal_rates(model, ids, rd.direction, decode=tok.decode)

Direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
direction"): the difference of the mean activations at one site (default `resid_post` of the
middle layer) between the harmful and the harmless prompts, read at the last prompt token. The
prompts are chat-formatted with the generation prompt, so the last token is the `\\n` after
`<start_of_turn>model`, the post-instruction position where the model decides how to answer.
`direction` is that difference normalised to unit length; `norm` is its raw length.

Per-layer projection: the mean over each set of `resid_post.l · r̂` at the same position, for
every layer l, so one sees at which depth the two sets separate along r̂. The layer sweep
repeats the difference of means at every `resid_post.l`.

Directional ablation: at every layer's `resid_pre`, `resid_mid` and `resid_post` the
component along r̂ is removed, `x - (x · r̂) r̂`, at every token (prompt and generated).
Refusal is measured with `is_refusal`, a substring classifier over `REFUSAL_PHRASES`.

Prompt sets: `analysis/chat/data/{harmful,harmless}.jsonl`, 24 `{"prompt": ...}` lines each, paired
in form (line i of harmless is a benign request shaped like line i of harmful); the harmful
ones name classic refused requests without operational detail.

Modules: `refusal_direction` (the difference of means and its sweep), `refusal_ablation`
(directional ablation and the refusal classifier); this one holds the prompt sets, the
dictionary latents aligned with the direction and `refusal_analysis`, which runs them all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from gemmascope_jax.analysis.chat.refusal_ablation import RefusalRates, ablation_refusal_rates
from gemmascope_jax.analysis.chat.refusal_direction import RefusalDirection, refusal_direction, unit
from gemmascope_jax.analysis.common import check_dictionary, dictionary_label
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.tokenizer import prompt_ids

PROMPT_SETS = ("harmful", "harmless")


def load_prompt_set(name: str) -> list[str]:
    """The packaged prompts of `name` (`harmful` or `harmless`), in file order."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")
    text = (
        resources.files("gemmascope_jax.analysis.chat")
        .joinpath("data", f"{name}.jsonl")
        .read_text()
    )
    return read_prompts(text.splitlines(), source=f"{name}.jsonl")


def read_prompts(lines: Sequence[str], source: str = "prompts") -> list[str]:
    """Prompts from JSONL lines `{"prompt": str}` (blank lines skipped); ValueError naming the
    first malformed line."""
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {i}: not JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{source} line {i}: expected {{'prompt': str}}, got {line[:80]!r}")
        out.append(row["prompt"])
    return out


def chat_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as a one-turn user chat with the generation prompt, as token ids."""
    return [list(prompt_ids(tokenizer, [{"role": "user", "content": p}])) for p in prompts]


# ---- dictionary latents aligned with the direction -------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlignedLatents:
    """Cosines of every latent's decoder vector and encoder column with a direction.

    decoder_cosine / encoder_cosine [L * F] (flat index `i * F + j` = source layer i, latent j;
    NaN where the widths differ from the direction's). top_decoder / top_encoder: the k rows
    `{layer, id, cosine}` with the largest cosine, descending.
    """

    dictionary: str
    decoder_cosine: np.ndarray
    encoder_cosine: np.ndarray
    top_decoder: list[dict]
    top_encoder: list[dict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dictionary": self.dictionary,
            "top_decoder": self.top_decoder,
            "top_encoder": self.top_encoder,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def decoder_vectors(d: Dictionary) -> np.ndarray:
    """Each latent's write direction [L * F, d_out]: single-layer, its decoder row; CLT, the
    sum of its rows over its target layers; crosscoder, the row of its deepest output layer
    (the convention of `logit_lens.write_directions`)."""
    cfg = d.cfg
    if not cfg.multilayer:
        return np.asarray(d.w_dec[...], np.float32)
    blocks = [np.asarray(w[...], np.float32) for w in d.w_dec]  # [F, L - s, D]
    return np.concatenate([b.sum(1) if cfg.kind == "clt" else b[:, -1] for b in blocks])


def encoder_vectors(d: Dictionary) -> np.ndarray:
    """Each latent's encoder column as a row, [L * F, d_in]."""
    w = np.asarray(d.w_enc[...], np.float32)  # [d_in, F] or [L, d_in, F]
    return w.T if w.ndim == 2 else np.concatenate(list(np.swapaxes(w, 1, 2)))


def _cosines(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    if vectors.shape[-1] != direction.shape[0]:
        return np.full(vectors.shape[0], np.nan, np.float32)
    norms = np.maximum(np.linalg.norm(vectors, axis=-1), np.finfo(np.float32).tiny)
    return (vectors @ unit(direction) / norms).astype(np.float32)


def _top_rows(d: Dictionary, cosine: np.ndarray, k: int) -> list[dict]:
    if np.isnan(cosine).all():
        return []
    order = np.argsort(-np.nan_to_num(cosine, nan=-np.inf), kind="stable")[:k]
    source, ids = np.divmod(order, d.cfg.width)
    layers = np.asarray(d.cfg.layers)[source]
    return [
        {"layer": int(layer), "id": int(i), "cosine": float(cosine[f])}
        for layer, i, f in zip(layers, ids, order, strict=True)
    ]


def aligned_latents(d: Dictionary, direction: np.ndarray, k: int = 10) -> AlignedLatents:
    """The k latents whose decoder vectors (and, separately, encoder columns) point most along
    `direction` [d] (cosine, signed: the most negative are anti-aligned and rank last).

    A transcoder's encoder reads `mlp_in` (the normalised residual) and its decoder writes
    `mlp_out`; both are d_model-wide, so both cosines are defined against a residual direction.
    ValueError when neither the dictionary's d_in nor d_out equals the direction's width."""
    direction = np.asarray(direction, np.float32).reshape(-1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if direction.shape[0] not in (d.cfg.d_in, d.cfg.d_out):
        raise ValueError(
            f"direction has width {direction.shape[0]} but {dictionary_label(d)} has "
            f"d_in={d.cfg.d_in}, d_out={d.cfg.d_out}"
        )
    dec = _cosines(decoder_vectors(d), direction)
    enc = _cosines(encoder_vectors(d), direction)
    return AlignedLatents(
        dictionary=dictionary_label(d),
        decoder_cosine=dec,
        encoder_cosine=enc,
        top_decoder=_top_rows(d, dec, k),
        top_encoder=_top_rows(d, enc, k),
    )


# ---- everything for one dictionary -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefusalReport:
    """`refusal_analysis` result: the direction, aligned latents and refusal rates."""

    direction: RefusalDirection
    aligned: AlignedLatents | None
    rates: RefusalRates | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction.to_dict(include_vectors=True),
            "aligned_latents": None if self.aligned is None else self.aligned.to_dict(),
            "refusal_rates": None if self.rates is None else self.rates.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def refusal_analysis(
    model,
    tokenizer,
    dictionary: Dictionary | None = None,
    *,
    site: str | None = None,
    n_prompts: int | None = None,
    n_eval: int = 8,
    max_new_tokens: int = 32,
    k: int = 10,
) -> RefusalReport:
    """The packaged prompt sets (first `n_prompts` of each) -> direction at `site`, the `k`
    latents of `dictionary` most aligned with it, and refusal rates on the first `n_eval`
    harmful prompts with and without ablation (`n_eval=0` skips generation)."""
    if dictionary is not None:
        check_dictionary(model.cfg, dictionary)
    harmful, harmless = (load_prompt_set(name)[:n_prompts] for name in PROMPT_SETS)
    harmful_ids, harmless_ids = chat_ids(tokenizer, harmful), chat_ids(tokenizer, harmless)
    rd = refusal_direction(model, harmful_ids, harmless_ids, site=site)
    aligned = None if dictionary is None else aligned_latents(dictionary, rd.direction, k=k)
    rates = None
    if n_eval > 0:
        rates = ablation_refusal_rates(
            model,
            harmful_ids[:n_eval],
            rd.direction,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            max_new_tokens=max_new_tokens,
            stop_ids=tokenizer.stop_ids,
        )
    return RefusalReport(direction=rd, aligned=aligned, rates=rates)
