"""`DictionaryConfig`: what a dictionary is, independent of its weights.

One frozen dataclass describes every kind (docs/formats.md, docs/recipe.md):

| kind              | reads           | predicts           | parameters (F = width)             |
|-------------------|-----------------|--------------------|------------------------------------|
| `sae`             | site s [.., D]  | the same site      | w_enc [D, F], w_dec [F, D]         |
| `transcoder`      | mlp_in.l        | mlp_out.l          | w_enc [D_in, F], w_dec [F, D_out]  |
| `skip_transcoder` | mlp_in.l        | mlp_out.l          | + w_skip [D_in, D_out], x @ w_skip |
| `clt`             | mlp_in.l, all l | mlp_out.l', l'>=l  | w_enc [L, D, F], w_dec[l] [F, L-l, D] |
| `crosscoder`      | s.l, l in set   | s.l', l'>=l in set | as `clt`; input site = output site |

`width` counts latents per source layer (a 1B CLT "262k" has width 10080 and 26 layers).
`layers` are model layer indices (one for single-layer kinds, strictly increasing for
multi-layer kinds); `input_sites[i]` / `output_sites[i]` are our site names at `layers[i]`
(defaults per kind: SAE and crosscoder `resid_post.l`, the transcoders and CLT
`mlp_in.l -> mlp_out.l`). Site names may be given in any form `resolve_site` accepts (a GS2
hook string, a TransformerLens hook); they are stored as our names. `hf_hook_points_in/out`
give the Gemma Scope 2 strings. Negative layer indices in site names need
`model_num_layers`.

Invalid configs raise one `ValueError` that lists every problem. `to_dict` / `from_dict`
round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

import jax.numpy as jnp

from gemmascope_jax.dictionaries.activations import ACTIVATIONS, canonical_architecture
from gemmascope_jax.gemma3.sites import Site, hf_hook_point, resolve_site

SINGLE_LAYER_KINDS = ("sae", "transcoder", "skip_transcoder")
MULTI_LAYER_KINDS = ("clt", "crosscoder")
KIND_NAMES = SINGLE_LAYER_KINDS + MULTI_LAYER_KINDS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_DEFAULT_SITES = {
    "sae": ("resid_post", "resid_post"),
    "transcoder": ("mlp_in", "mlp_out"),
    "skip_transcoder": ("mlp_in", "mlp_out"),
    "clt": ("mlp_in", "mlp_out"),
    "crosscoder": ("resid_post", "resid_post"),
}
# Matryoshka group sizes as fractions of the width; the last group takes the rest (17/32),
# so the prefixes are 1/32, 3/32, 7/32, 15/32 and all of the width (dictionary_learning).
DEFAULT_MATRYOSHKA_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
_UNKNOWN_DEPTH = 1 << 30  # stands in for the model depth when `model_num_layers` is None


def matryoshka_widths(
    width: int, fractions: tuple[float, ...] = DEFAULT_MATRYOSHKA_FRACTIONS
) -> tuple[int, ...]:
    """Cumulative prefix widths ending at `width` for groups of `fractions · width` latents
    (rounded): a last group takes the rest, unless the fractions sum to 1, when the last
    group absorbs the rounding. `matryoshka_widths(4096)` -> (128, 384, 896, 1920, 4096), the
    value of `DictionaryConfig.matryoshka_widths`, from which the loss reads the prefixes."""
    sizes = [int(round(f * width)) for f in fractions]
    if not sizes or sum(fractions) > 1 + 1e-9 or min(sizes) < 1 or sum(sizes) > width:
        raise ValueError(f"fractions {list(fractions)} do not split width {width}")
    if sum(sizes) < width and abs(sum(fractions) - 1) > 1e-9:
        sizes.append(width - sum(sizes))
    sizes[-1] += width - sum(sizes)
    return tuple(sum(sizes[: i + 1]) for i in range(len(sizes)))


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from e
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
    """Architecture and provenance of a dictionary (see the module docstring for the kinds).

    Fields:
        kind: one of `KIND_NAMES`.
        architecture: `jumprelu` | `relu` | `topk` | `batchtopk` (`jump_relu` is accepted).
        d_in, d_out: input and output width per layer (equal for `sae` and `crosscoder`).
        width: latents per source layer.
        layers: model layer index of each source layer.
        input_sites, output_sites: one site per layer; None picks the kind's default.
        model_name: e.g. `google/gemma-3-1b-pt`.
        model_num_layers: depth of the model (resolves negative site layers, bounds checks).
        l0_target: target active latents per token (summed over source layers for
            multi-layer kinds), as GS2's `l0`.
        k: active latents per token and source layer for `topk` / `batchtopk` only.
        skip: affine skip connection `x @ w_skip`; None means True exactly for
            `skip_transcoder`. Allowed for `skip_transcoder` (required) and `clt`.
        matryoshka_widths: nested prefix widths, strictly increasing, ending at `width`
            (appended when missing); None for a plain dictionary.
        dtype: parameter dtype name (`float32`, `bfloat16`, `float16`).
        extra: free-form JSON-safe metadata (e.g. GS2 `affine_connection`, training run ids).
    """

    kind: str
    architecture: str
    d_in: int
    d_out: int
    width: int
    layers: tuple[int, ...]
    input_sites: tuple[str, ...] | None = None
    output_sites: tuple[str, ...] | None = None
    model_name: str | None = None
    model_num_layers: int | None = None
    l0_target: float | None = None
    k: int | None = None
    skip: bool | None = None
    matryoshka_widths: tuple[int, ...] | None = None
    dtype: str = "float32"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        problems: list[str] = []
        put = lambda name, value: object.__setattr__(self, name, value)
        if self.kind not in KIND_NAMES:
            problems.append(f"unknown kind {self.kind!r}; expected one of {list(KIND_NAMES)}")
        try:
            put("architecture", canonical_architecture(self.architecture))
        except ValueError as e:
            problems.append(str(e))
        try:
            put("dtype", _dtype_name(self.dtype))
        except ValueError as e:
            problems.append(str(e))
        for name in ("d_in", "d_out", "width", "k", "model_num_layers"):
            if _is_int(getattr(self, name)):
                put(name, int(getattr(self, name)))
        for name in ("d_in", "d_out", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if self.model_num_layers is not None and (
            not _is_int(self.model_num_layers) or self.model_num_layers <= 0
        ):
            problems.append(f"model_num_layers must be a positive int, got {self.model_num_layers}")
            put("model_num_layers", None)
        self._check_layers(problems)
        self._check_kind_rules(problems)
        self._check_sites(problems)
        self._check_sparsity(problems)
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as e:
            problems.append(f"extra must be JSON-serialisable: {e}")
        if not isinstance(self.extra, dict):
            problems.append(f"extra must be a dict, got {type(self.extra).__name__}")
        if problems:
            raise ValueError(f"invalid DictionaryConfig ({self.kind}): " + "; ".join(problems))

    # ---- validation pieces -------------------------------------------------------------------

    def _check_layers(self, problems: list[str]) -> None:
        layers = (self.layers,) if _is_int(self.layers) else tuple(self.layers)
        layers = tuple(int(x) if _is_int(x) else x for x in layers)
        object.__setattr__(self, "layers", layers)
        if not layers or not all(_is_int(x) and x >= 0 for x in layers):
            problems.append(f"layers must be non-negative ints (at least one), got {layers}")
            return
        if self.kind in SINGLE_LAYER_KINDS and len(layers) != 1:
            problems.append(f"kind {self.kind!r} reads one layer, got layers={layers}")
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            problems.append(f"layers must be strictly increasing, got {layers}")
        if self.model_num_layers is not None and max(layers) >= self.model_num_layers:
            problems.append(
                f"layer {max(layers)} out of range for a {self.model_num_layers}-layer model"
            )

    def _check_kind_rules(self, problems: list[str]) -> None:
        if self.kind not in KIND_NAMES:
            return
        if self.kind in ("sae", "crosscoder") and self.d_in != self.d_out:
            problems.append(
                f"kind {self.kind!r} reconstructs its input: d_in={self.d_in} must equal "
                f"d_out={self.d_out}"
            )
        skip = self.kind == "skip_transcoder" if self.skip is None else self.skip
        object.__setattr__(self, "skip", bool(skip))
        if self.kind == "skip_transcoder" and not skip:
            problems.append("kind 'skip_transcoder' needs skip=True (use kind 'transcoder')")
        if skip and self.kind not in ("skip_transcoder", "clt"):
            hint = " (use kind 'skip_transcoder')" if self.kind == "transcoder" else ""
            problems.append(f"kind {self.kind!r} has no skip connection{hint}")

    def _check_sites(self, problems: list[str]) -> None:
        if self.kind not in KIND_NAMES or not all(_is_int(x) for x in self.layers):
            return
        default_in, default_out = _DEFAULT_SITES[self.kind]
        n = len(self.layers)
        given_in, given_out = self.input_sites, self.output_sites
        if given_in is None:
            given_in = tuple(f"{default_in}.{layer}" for layer in self.layers)
        if given_out is None:
            given_out = (
                given_in
                if default_in == default_out
                else tuple(f"{default_out}.{layer}" for layer in self.layers)
            )
        given_in, given_out = _as_tuple(given_in), _as_tuple(given_out)
        resolved = {}
        for field, names in (("input_sites", given_in), ("output_sites", given_out)):
            if len(names) != n:
                problems.append(f"{field} has {len(names)} entries but layers={self.layers}")
                object.__setattr__(self, field, names)
                continue
            sites = []
            for name, layer in zip(names, self.layers, strict=True):
                try:
                    site = self._resolve(name)
                except (ValueError, TypeError) as e:
                    problems.append(f"{field}: {e}")
                    continue
                bad_in = field == "input_sites" and site.layer not in (None, layer)
                bad_out = field == "output_sites" and site.layer is not None and site.layer < layer
                if bad_in or bad_out:
                    rel = "at" if bad_in else "at or after"
                    problems.append(f"{field}: {name!r} is not {rel} source layer {layer}")
                sites.append(site)
            resolved[field] = sites
            canonical = tuple(s.name for s in sites) if len(sites) == n else names
            object.__setattr__(self, field, canonical)
        if (
            self.kind in ("sae", "crosscoder")
            and len(resolved.get("input_sites", ())) == n
            and resolved.get("input_sites") != resolved.get("output_sites")
        ):
            problems.append(
                f"kind {self.kind!r} predicts its input site: input_sites={self.input_sites} "
                f"!= output_sites={self.output_sites}"
            )

    def _resolve(self, name: str) -> Site:
        site = resolve_site(name, self.model_num_layers or _UNKNOWN_DEPTH)
        if self.model_num_layers is None and site.layer is not None and site.layer >= 1 << 29:
            raise ValueError(f"site {name!r} has a negative layer; set model_num_layers")
        return site

    def _check_sparsity(self, problems: list[str]) -> None:
        if self.architecture not in ACTIVATIONS:
            return
        act = ACTIVATIONS[self.architecture]
        width_ok = _is_int(self.width) and self.width > 0
        if act.needs_k:
            if not _is_int(self.k) or (width_ok and not 1 <= self.k <= self.width):
                problems.append(
                    f"architecture {self.architecture!r} needs k, an int in 1..width "
                    f"({self.width}), got k={self.k!r}"
                )
        elif self.k is not None:
            problems.append(f"k is only used by topk/batchtopk, not {self.architecture!r}")
        if self.l0_target is not None and not (
            isinstance(self.l0_target, int | float) and self.l0_target > 0
        ):
            problems.append(f"l0_target must be a positive number, got {self.l0_target!r}")
        if self.matryoshka_widths is not None:
            widths = _as_tuple(self.matryoshka_widths)
            if width_ok and widths and widths[-1] != self.width:
                widths = (*widths, self.width)
            ok = all(_is_int(w) and w >= 1 for w in widths) and width_ok and widths
            ok = ok and all(b > a for a, b in zip(widths, widths[1:], strict=False))
            if not ok or widths[-1] != self.width:
                problems.append(
                    "matryoshka_widths must be strictly increasing ints in 1..width "
                    f"({self.width}), got {self.matryoshka_widths}"
                )
            object.__setattr__(self, "matryoshka_widths", widths)

    # ---- derived ----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Number of source layers L (1 for single-layer kinds)."""
        return len(self.layers)

    @property
    def multilayer(self) -> bool:
        return self.kind in MULTI_LAYER_KINDS

    @property
    def total_width(self) -> int:
        """Latents over all source layers (the GS2 width label of a CLT / crosscoder)."""
        return self.width * self.num_layers

    @property
    def param_dtype(self):
        return DTYPES[self.dtype]

    @property
    def input_site_objects(self) -> tuple[Site, ...]:
        return tuple(self._resolve(name) for name in self.input_sites)

    @property
    def output_site_objects(self) -> tuple[Site, ...]:
        return tuple(self._resolve(name) for name in self.output_sites)

    @property
    def hf_hook_points_in(self) -> tuple[str | None, ...]:
        """GS2 `hf_hook_point_in` strings, one per source layer (None for a site without a
        transformers hook point, e.g. `attn_pattern`)."""
        return tuple(_hook_or_none(s) for s in self.input_site_objects)

    @property
    def hf_hook_points_out(self) -> tuple[str | None, ...]:
        """GS2 `hf_hook_point_out` strings, one per (output) layer."""
        return tuple(_hook_or_none(s) for s in self.output_site_objects)

    def replace(self, **changes) -> DictionaryConfig:
        """A copy with `changes` applied and validated again. Sites are stored resolved, so
        changing `layers` needs `input_sites=None, output_sites=None` (or new sites)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); `from_dict` inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["extra"] = json.loads(json.dumps(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        """Inverse of `to_dict`; unknown or missing keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if unknown := sorted(set(data) - names):
            raise ValueError(f"unknown DictionaryConfig keys {unknown}; known: {sorted(names)}")
        if missing := sorted(required - set(data)):
            raise ValueError(f"DictionaryConfig is missing required keys {missing}")
        kwargs = dict(data)
        for key in ("layers", "input_sites", "output_sites", "matryoshka_widths"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        kwargs["extra"] = dict(kwargs.get("extra") or {})
        return cls(**kwargs)


def _hook_or_none(site: Site) -> str | None:
    try:
        return hf_hook_point(site)
    except ValueError:
        return None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_tuple(x) -> tuple:
    return (x,) if isinstance(x, str) else tuple(x)
