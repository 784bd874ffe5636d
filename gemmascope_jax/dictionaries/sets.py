"""`TranscoderSet`: one single-layer transcoder per model layer, as one object.

A circuit-tracer per-layer transcoder set (PLT) and a Gemma Scope 2 `transcoder_all`
collection are both sets: transcoder `i` reads `input_site.i` and predicts `output_site.i`
for every layer i = 0..L-1 of the model.

    s = TranscoderSet.from_transcoders([t0, t1, ...], model_name="google/gemma-3-270m")
    f = s.encode(x, layer=3)            # x [..., d_in] -> codes [..., F]
    y = s.decode(f, layer=3, x=x)       # -> prediction of mlp_out.3 (x for the skip term)
    for layer, t in enumerate(s): ...   # the SingleLayerDictionary of each layer

Members are `SingleLayerDictionary` objects of kind `transcoder` or `skip_transcoder`; widths
may differ between layers (formats that need one width check it themselves). The set's
metadata (model name, input/output site kinds) must agree with every member's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from gemmascope_jax.dictionaries.single import SingleLayerDictionary
from gemmascope_jax.gemma3.sites import LAYER_SITES

TRANSCODER_KINDS = ("transcoder", "skip_transcoder")


@dataclasses.dataclass(frozen=True)
class TranscoderSet:
    """Transcoders for layers 0..L-1, in order, with shared metadata.

    Fields:
        transcoders: `transcoders[i]` reads layer i (its `cfg.layers == (i,)`).
        model_name: e.g. `google/gemma-3-270m-it`; None when unknown.
        input_site, output_site: site kinds from `gemma3.sites.LAYER_SITES` (default
            `mlp_in` -> `mlp_out`, the Gemma Scope 2 transcoder sites).
        metadata: free-form JSON-safe extras (e.g. a circuit-tracer `scan` id).
    """

    transcoders: tuple[SingleLayerDictionary, ...]
    model_name: str | None = None
    input_site: str = "mlp_in"
    output_site: str = "mlp_out"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "transcoders", tuple(self.transcoders))
        problems = []
        if not self.transcoders:
            problems.append("a set needs at least one transcoder")
        for name in ("input_site", "output_site"):
            if getattr(self, name) not in LAYER_SITES:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {LAYER_SITES}")
        for i, t in enumerate(self.transcoders):
            if not isinstance(t, SingleLayerDictionary) or t.cfg.kind not in TRANSCODER_KINDS:
                what = getattr(getattr(t, "cfg", None), "kind", type(t).__name__)
                problems.append(f"member {i} is a {what}, not one of {TRANSCODER_KINDS}")
                continue
            cfg = t.cfg
            if cfg.layers != (i,):
                problems.append(f"member {i} reads layer {cfg.layers[0]}, expected {i}")
            sites = (cfg.input_site_objects[0], cfg.output_site_objects[0])
            want = (self.input_site, self.output_site)
            if (sites[0].kind, sites[1].kind) != want or sites[1].layer != i:
                problems.append(
                    f"member {i} maps {sites[0]} -> {sites[1]}, expected "
                    f"{want[0]}.{i} -> {want[1]}.{i}"
                )
            if self.model_name and cfg.model_name and cfg.model_name != self.model_name:
                problems.append(
                    f"member {i} is for model {cfg.model_name!r}, not {self.model_name!r}"
                )
            if cfg.model_num_layers not in (None, len(self.transcoders)):
                problems.append(
                    f"member {i} says the model has {cfg.model_num_layers} layers, but the set "
                    f"has {len(self.transcoders)}"
                )
        if problems:
            raise ValueError("invalid TranscoderSet: " + "; ".join(problems))

    @classmethod
    def from_transcoders(
        cls,
        transcoders: Sequence[SingleLayerDictionary],
        *,
        model_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TranscoderSet:
        """A set whose site kinds (and model name, unless given) come from the first member."""
        if not transcoders:
            raise ValueError("invalid TranscoderSet: a set needs at least one transcoder")
        cfg = transcoders[0].cfg
        return cls(
            tuple(transcoders),
            model_name=model_name if model_name is not None else cfg.model_name,
            input_site=cfg.input_site_objects[0].kind,
            output_site=cfg.output_site_objects[0].kind,
            metadata=dict(metadata or {}),
        )

    # ---- container ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> SingleLayerDictionary:
        return self.transcoders[layer]

    def __iter__(self) -> Iterator[SingleLayerDictionary]:
        return iter(self.transcoders)

    @property
    def num_layers(self) -> int:
        return len(self.transcoders)

    @property
    def skip(self) -> bool:
        """True when every member has a skip connection (False when none has)."""
        return all(t.cfg.skip for t in self.transcoders)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(t.cfg.width for t in self.transcoders)

    # ---- forward ------------------------------------------------------------------------------

    def encode(self, x: jax.Array, layer: int) -> jax.Array:
        """Codes of layer `layer`'s transcoder: x [..., d_in] -> [..., F]."""
        return self.transcoders[layer].encode(x)

    def decode(self, codes: jax.Array, layer: int, x: jax.Array | None = None) -> jax.Array:
        """Prediction of `output_site.layer` from codes (x is needed for a skip term)."""
        return self.transcoders[layer].decode(codes, x)

    def __call__(self, x: jax.Array, layer: int) -> jax.Array:
        return self.transcoders[layer](x)

    def metadata_dict(self) -> dict[str, Any]:
        """JSON-safe description of the set (not its members' weights)."""
        return {
            "num_layers": self.num_layers,
            "model_name": self.model_name,
            "input_site": self.input_site,
            "output_site": self.output_site,
            "widths": list(self.widths),
            "skip": [bool(t.cfg.skip) for t in self.transcoders],
            "metadata": dict(self.metadata),
        }
