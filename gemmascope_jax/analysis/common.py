"""Checks and conversions shared by the analysis tools (inspection, steering, chat, attribution).

Every tool takes a model, a dictionary and prompts; these helpers turn bad combinations into one
clear `ValueError` before any compute:

    check_dictionary(model.cfg, d)        # site layers in range, d_in/d_out equal the model's
    check_latents(d, [123, 7])            # ids in [0, width)
    prompt_ids(tok, "text" | [{"role": "user", "content": "..."}])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.gemma3.config import Gemma3Config
from gemmascope_jax.gemma3.sites import resolve_site, site_width

CHAT_ROLES = ("system", "user", "model", "assistant")


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


def check_chat(messages: Sequence[Any]) -> list[dict]:
    """Validate a chat: a list of {role, content} dicts, optional system first, then user and
    model turns alternating, starting with user. `assistant` is accepted for `model`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("a chat must be a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content': {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"chat message {i} has unknown role {m['role']!r}; use {CHAT_ROLES}")
        out.append(dict(m))
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        role = "model" if m["role"] == "assistant" else m["role"]
        if role != expected:
            offset = len(out) - len(turns)
            raise ValueError(
                f"chat roles out of order: message {i + offset} is {m['role']!r}, expected "
                f"{expected!r} (optional system first, then user/model alternating)"
            )
    return out


def prompt_ids(tokenizer, text_or_chat: str | Sequence[dict], add_generation_prompt=True):
    """Token ids (BOS first) of a plain string or a chat rendered with the Gemma 3 template."""
    if isinstance(text_or_chat, str):
        return tokenizer.encode(text_or_chat)
    chat = check_chat(text_or_chat)
    return tokenizer.chat(chat, add_generation_prompt=add_generation_prompt)
