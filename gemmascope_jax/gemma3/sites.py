"""Named activation sites of Gemma 3 and the aliases other libraries use for them.

Our names are short: `resid_post.9`, `mlp_in.5`, `final_norm`. Every Gemma Scope 2
`hf_hook_point_in/out` string (a transformers module path plus `.input`/`.output`), the
other transformers module paths of the same tensors, and the SAELens / TransformerLens /
circuit-tracer hook names resolve to the same `Site`. Layer indices may be negative
(`resid_post.-1` is the last layer).

Per-layer sites, in forward order, with shapes (b = batch, t = sequence):

| site           | tensor                                                    | shape            |
|----------------|-----------------------------------------------------------|------------------|
| `resid_pre`    | block input (layer 0: scaled embeddings)                  | [b, t, d_model]  |
| `attn_in`      | `input_layernorm` output                                  | [b, t, d_model]  |
| `attn_pattern` | softmax attention probabilities                           | [b, heads, t, t] |
| `attn_z`       | head outputs concatenated, `o_proj` input (GS2 attn_out)  | [b, t, H*hd]     |
| `attn_proj`    | `o_proj` output, before the post-attention norm           | [b, t, d_model]  |
| `attn_out`     | `post_attention_layernorm` output (added to the residual) | [b, t, d_model]  |
| `resid_mid`    | residual after attention                                  | [b, t, d_model]  |
| `mlp_in`       | `pre_feedforward_layernorm` output (transcoder input)     | [b, t, d_model]  |
| `mlp_hidden`   | `gelu(gate) * up`, `down_proj` input                      | [b, t, d_ff]     |
| `mlp_proj`     | `down_proj` output, before the post-feedforward norm      | [b, t, d_model]  |
| `mlp_out`      | `post_feedforward_layernorm` output (transcoder target)   | [b, t, d_model]  |
| `resid_post`   | block output (GS2 resid_post)                             | [b, t, d_model]  |

Global sites: `embed` (= `resid_pre.0`), `final_norm` ([batch, seq, d_model]) and `logits`
([batch, seq, vocab]).
"""

from __future__ import annotations

import dataclasses
import re

LAYER_SITES = (
    "resid_pre",
    "attn_in",
    "attn_pattern",
    "attn_z",
    "attn_proj",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_hidden",
    "mlp_proj",
    "mlp_out",
    "resid_post",
)
GLOBAL_SITES = ("final_norm", "logits")

# transformers module path (after `model.layers.{L}.`) + .input/.output -> site kind.
_HF_LAYER_PATHS = {
    "input": "resid_pre",
    "input_layernorm.input": "resid_pre",
    "input_layernorm.output": "attn_in",
    "self_attn.input": "attn_in",
    "self_attn.o_proj.input": "attn_z",
    "self_attn.o_proj.output": "attn_proj",
    "post_attention_layernorm.input": "attn_proj",
    "post_attention_layernorm.output": "attn_out",
    "pre_feedforward_layernorm.input": "resid_mid",
    "pre_feedforward_layernorm.output": "mlp_in",
    "mlp.input": "mlp_in",
    "mlp.down_proj.input": "mlp_hidden",
    "mlp.down_proj.output": "mlp_proj",
    "mlp.output": "mlp_proj",
    "post_feedforward_layernorm.input": "mlp_proj",
    "post_feedforward_layernorm.output": "mlp_out",
    "output": "resid_post",
}
# TransformerLens / SAELens / circuit-tracer hook names (after `blocks.{L}.`) -> site kind.
# `hook_mlp_in` follows SAELens' Gemma Scope 2 configs, which use it for the transcoder input
# (the pre-feedforward norm output), not TransformerLens' un-normalised resid_mid. Where two
# names share a kind, the first is the one we write (`tl_hook_name`).
_TL_LAYER_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "attn.hook_pattern": "attn_pattern",
    "attn.hook_z": "attn_z",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_in": "mlp_in",
    "mlp.hook_in": "mlp_in",
    "mlp.hook_post": "mlp_hidden",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
_GLOBAL_ALIASES = {
    "embed": ("resid_pre", 0),
    "hook_embed_scaled": ("resid_pre", 0),
    "model.embed_tokens.output": ("resid_pre", 0),
    "model.norm.output": ("final_norm", None),
    "final_norm": ("final_norm", None),
    "lm_head.output": ("logits", None),
    "logits": ("logits", None),
}
_PREFIXES = ("model.language_model.", "language_model.model.")
# circuit-tracer's feature hooks (its nnsight mapping for Gemma 3), a subset of _TL_LAYER_HOOKS:
# the hooks a transcoder may read ("input") and write ("output").
_CT_HOOKS = {"input": ("mlp.hook_in", "hook_resid_mid"), "output": ("hook_mlp_out",)}
_CT_UNSUPPORTED_HOOKS = {
    "ln2.hook_normalized": "the pre-feedforward norm output before its (1 + w) gain (Gemma "
    "Scope 1 transcoders), which is not a gemmascope-jax site; fold the gain into the encoder "
    "and use mlp.hook_in",
}


def _first_names(table: dict[str, str]) -> dict[str, str]:
    """Invert a name -> site kind table: kind -> the first name listed for it."""
    inverse: dict[str, str] = {}
    for name, kind in table.items():
        inverse.setdefault(kind, name)
    return inverse


# site kind -> the name we write: the transformers path of `hf_hook_point` and the
# TransformerLens hook of `tl_hook_name` (SAELens' `hook_name`; no attn_pattern, which no
# dictionary reads).
_HF_NAMES = _first_names(_HF_LAYER_PATHS)
_TL_NAMES = {k: h for k, h in _first_names(_TL_LAYER_HOOKS).items() if k != "attn_pattern"}


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """A resolved site: a kind from LAYER_SITES with a layer, or a global kind (layer None)."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.name


def valid_forms(num_layers: int) -> str:
    """Human-readable list of accepted site names, for error messages and `--help`."""
    last = num_layers - 1
    return (
        f"ours: {', '.join(k + '.L' for k in LAYER_SITES)}, embed, final_norm, logits "
        f"(L in 0..{last} or -{num_layers}..-1); transformers paths: "
        + ", ".join(f"model.layers.L.{p}" for p in _HF_LAYER_PATHS)
        + ", model.embed_tokens.output, model.norm.input, model.norm.output, lm_head.output; "
        "TransformerLens/SAELens hooks: " + ", ".join(f"blocks.L.{h}" for h in _TL_LAYER_HOOKS)
    )


def resolve_site(name: str, num_layers: int) -> Site:
    """Resolve any accepted site name to a `Site`; ValueError listing valid forms otherwise."""
    if isinstance(name, Site):
        return _check_layer(name, name.name, num_layers)
    if not isinstance(name, str):
        raise TypeError(f"site names are strings, got {type(name).__name__}: {name!r}")
    key = name.strip()
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = "model." + key[len(prefix) :]
    if key in _GLOBAL_ALIASES:
        kind, layer = _GLOBAL_ALIASES[key]
        return Site(kind, layer)
    if key == "model.norm.input":
        return Site("resid_post", num_layers - 1)
    if (m := re.fullmatch(r"([a-z_]+)\.(-?\d+)", key)) and m[1] in LAYER_SITES:
        return _check_layer(Site(m[1], int(m[2])), name, num_layers)
    if (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)) and m[2] in _HF_LAYER_PATHS:
        return _check_layer(Site(_HF_LAYER_PATHS[m[2]], int(m[1])), name, num_layers)
    if (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key)) and m[2] in _TL_LAYER_HOOKS:
        return _check_layer(Site(_TL_LAYER_HOOKS[m[2]], int(m[1])), name, num_layers)
    raise ValueError(f"unknown site {name!r}. Valid forms: {valid_forms(num_layers)}")


def _check_layer(site: Site, name: str, num_layers: int) -> Site:
    if site.layer is None:
        if site.kind not in GLOBAL_SITES:
            raise ValueError(f"site {name!r} needs a layer index")
        return site
    layer = site.layer + num_layers if site.layer < 0 else site.layer
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"site {name!r}: layer {site.layer} out of range for a {num_layers}-layer model"
        )
    return Site(site.kind, layer)


def site_width(site: Site, cfg) -> int:
    """Last-axis size of a per-layer site for a `Gemma3Config` (attn_pattern has none)."""
    if site.kind == "attn_z":
        return cfg.num_heads * cfg.head_dim
    if site.kind == "mlp_hidden":
        return cfg.intermediate_size
    if site.kind in ("attn_pattern", "logits"):
        raise ValueError(f"site {site.name} is not a vector per token")
    return cfg.hidden_size


def hf_hook_point(site: Site) -> str:
    """The Gemma Scope 2 / transformers hook string for a site (`.input`/`.output` suffix)."""
    if site.kind == "final_norm":
        return "model.norm.output"
    if site.kind == "logits":
        return "lm_head.output"
    if site.kind not in _HF_NAMES:
        raise ValueError(f"site {site.name!r} has no transformers hook point")
    return f"model.layers.{site.layer}.{_HF_NAMES[site.kind]}"


def tl_hook_name(site: Site) -> str:
    """The hook name SAELens metadata uses for `site` (TransformerLens name when one exists,
    else the transformers hook string); `resolve_site` maps it back to `site`."""
    if site.kind in _TL_NAMES and site.layer is not None:
        return f"blocks.{site.layer}.{_TL_NAMES[site.kind]}"
    return hf_hook_point(site)


def circuit_tracer_kind(hook: str, what: str) -> str:
    """The site kind of circuit-tracer's feature `what` ("input" or "output") hook, given with
    or without `blocks.L.`; ValueError (starting with the hook) for any other hook."""
    table = _ct_hooks(what)
    hook = re.sub(r"^blocks\.\d+\.", "", str(hook))
    if hook in table:
        return table[hook]
    if hook in _CT_UNSUPPORTED_HOOKS:
        raise ValueError(f"{hook!r} is unsupported: it is {_CT_UNSUPPORTED_HOOKS[hook]}")
    raise ValueError(f"{hook!r} is not supported; expected one of {list(table)}")


def circuit_tracer_hook(kind: str, what: str) -> str:
    """circuit-tracer's feature `what` ("input" or "output") hook suffix for a site kind;
    ValueError naming the supported ones otherwise."""
    table = _ct_hooks(what)
    for hook, ours in table.items():
        if ours == kind:
            return hook
    raise ValueError(
        f"circuit-tracer has no feature {what} hook for site {kind!r} (supported: "
        + ", ".join(f"{ours} -> {hook}" for hook, ours in table.items())
        + ")"
    )


def _ct_hooks(what: str) -> dict[str, str]:
    """circuit-tracer's feature `what` hooks -> site kind."""
    return {h: _TL_LAYER_HOOKS[h] for h in _CT_HOOKS[what]}
