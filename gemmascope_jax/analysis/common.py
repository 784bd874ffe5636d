"""Checks and conversions shared by the analysis tools (inspection, steering, chat, attribution).

Every tool takes a model, a dictionary and prompts; these helpers turn bad combinations into one
clear `ValueError` before any compute:

    check_dictionary(model.cfg, d)        # site layers in range, d_in/d_out equal the model's
    check_latents(d, [123, 7])            # ids in [0, width)

Chats and prompt token ids (`check_chat`, `prompt_ids`) live with the tokenizer, in
`gemmascope_jax.gemma3.tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable

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
