"""The refusal direction (Arditi et al. 2024): the difference of the mean activations of harmful
and harmless prompts at one site, read at the last prompt token, with its projection at every
layer and the per-layer sweep (the conventions are in `analysis.refusal`'s module doc).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemmascope_jax.gemma3.sites import resolve_site

PER_LAYER = (
    "harmful_projection",
    "harmless_projection",
    "sweep_norms",
    "sweep_cosines",
    "sweep_separation",
)


def default_site(num_layers: int) -> str:
    """`resid_post` of the middle layer."""
    return f"resid_post.{num_layers // 2}"


def last_token_activations(
    model, prompts: Sequence[Sequence[int]], sites: Sequence[str], batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Each site's activation at each prompt's last token: `{site: float32 [n_prompts, d]}`.

    Prompts (token ids, BOS first) are left-padded to the longest one, so the last column is
    every row's last token, and run `batch_size` rows at a time (the last batch filled with
    masked rows): one jitted forward shape for the whole set."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, each with at least one token")
    seq, n = max(len(p) for p in prompts), len(prompts)
    batch_size = min(batch_size, n)
    rows = -(-n // batch_size) * batch_size
    tokens = np.zeros((rows, seq), np.int32)
    mask = np.zeros((rows, seq), np.int32)
    mask[:, -1] = 1  # filler rows see one pad token, never read back
    for i, p in enumerate(prompts):
        tokens[i, seq - len(p) :] = p
        mask[i, seq - len(p) :] = 1
    forward = model.jitted(capture=tuple(sites), logits=False)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    for start in range(0, rows, batch_size):
        sl = slice(start, start + batch_size)
        out = forward(jnp.asarray(tokens[sl]), jnp.asarray(mask[sl]))
        for s in sites:
            parts[s].append(np.asarray(out.sites[s][:, -1], np.float32))
    return {s: np.concatenate(v)[:n] for s, v in parts.items()}


@dataclasses.dataclass(frozen=True)
class RefusalDirection:
    """Difference of means at `site` (last prompt token) and its per-layer projections.

    direction [d]: unit vector of mean(harmful) - mean(harmless); norm: the raw length.
    harmful_mean / harmless_mean [d]: the two means at `site`.
    harmful_projection / harmless_projection [n_layers]: mean of `resid_post.l · direction`.
    sweep_norms [n_layers]: ||mean difference|| at each `resid_post.l`;
    sweep_cosines [n_layers]: cosine of that layer's difference with `direction`;
    sweep_separation [n_layers]: the gap of the two sets' mean projections onto their own
    layer's unit difference, over the pooled standard deviation of those projections.
    """

    site: str
    direction: np.ndarray
    norm: float
    harmful_mean: np.ndarray
    harmless_mean: np.ndarray
    n_harmful: int
    n_harmless: int
    harmful_projection: np.ndarray
    harmless_projection: np.ndarray
    sweep_norms: np.ndarray
    sweep_cosines: np.ndarray
    sweep_separation: np.ndarray

    def to_dict(self, include_vectors: bool = False) -> dict[str, Any]:
        out = {
            "site": self.site,
            "position": "last prompt token (post-instruction, after '<start_of_turn>model\\n')",
            "norm": self.norm,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "per_layer": [
                {"layer": layer, **{name: float(getattr(self, name)[layer]) for name in PER_LAYER}}
                for layer in range(len(self.sweep_norms))
            ],
        }
        if include_vectors:
            out["direction"] = self.direction.tolist()
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(include_vectors=True), indent=indent)


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), np.finfo(np.float32).tiny)


def refusal_direction(
    model,
    harmful: Sequence[Sequence[int]],
    harmless: Sequence[Sequence[int]],
    site: str | None = None,
    batch_size: int = 16,
) -> RefusalDirection:
    """Difference-of-means direction at `site` (default `default_site`) between the harmful
    and harmless prompts (token ids, chat-formatted; see the module doc), with per-layer
    projections and the per-layer sweep."""
    if not harmful or not harmless:
        raise ValueError(
            f"need prompts in both sets, got {len(harmful)} harmful and {len(harmless)} harmless"
        )
    n_layers = model.cfg.num_layers
    site_name = resolve_site(site or default_site(n_layers), n_layers).name
    layer_sites = [f"resid_post.{layer}" for layer in range(n_layers)]
    sites = list(dict.fromkeys([site_name, *layer_sites]))
    both = last_token_activations(model, [*harmful, *harmless], sites, batch_size)
    acts = {
        "harmful": {s: a[: len(harmful)] for s, a in both.items()},
        "harmless": {s: a[len(harmful) :] for s, a in both.items()},
    }
    mean = {name: {s: a[s].mean(0) for s in sites} for name, a in acts.items()}
    diff = mean["harmful"][site_name] - mean["harmless"][site_name]
    r_hat = unit(diff)
    proj = {
        name: np.array([float(np.mean(acts[name][s] @ r_hat)) for s in layer_sites])
        if model.cfg.hidden_size == r_hat.shape[0]
        else np.full(n_layers, np.nan)
        for name in acts
    }
    norms, cosines, separation = [], [], []
    for s in layer_sites:
        layer_diff = mean["harmful"][s] - mean["harmless"][s]
        layer_hat = unit(layer_diff)
        norms.append(float(np.linalg.norm(layer_diff)))
        cosines.append(float(layer_hat @ r_hat) if layer_hat.shape == r_hat.shape else np.nan)
        a, b = acts["harmful"][s] @ layer_hat, acts["harmless"][s] @ layer_hat
        pooled = np.sqrt(0.5 * (a.var() + b.var()))
        separation.append(float((a.mean() - b.mean()) / max(pooled, 1e-12)))
    return RefusalDirection(
        site=site_name,
        direction=r_hat.astype(np.float32),
        norm=float(np.linalg.norm(diff)),
        harmful_mean=mean["harmful"][site_name],
        harmless_mean=mean["harmless"][site_name],
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        harmful_projection=proj["harmful"],
        harmless_projection=proj["harmless"],
        sweep_norms=np.asarray(norms),
        sweep_cosines=np.asarray(cosines),
        sweep_separation=np.asarray(separation),
    )
