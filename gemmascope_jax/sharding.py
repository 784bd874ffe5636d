"""Mesh construction and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`('vocab', 'embed')`, `('embed', 'mlp')`, ...);
`LOGICAL_RULES` says which mesh axis (`data` or `model`) each name is split over. A dimension
that the mesh axis does not divide stays replicated, so one rules table serves every model
size and mesh shape.

The frozen language model can also be sharded fully (FSDP) for models whose tensor-parallel
slice is still too big for a chip: `lm_rules(fsdp=True)` is `LOGICAL_RULES` with the LM
weights' `embed` (d_model) axis over `data` as well, for `load_gemma3(..., rules=...)` and
`gemmascope-jax plan`. Dictionaries always use `LOGICAL_RULES` (their `embed` axis stays
replicated; their latents go over `model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

LOGICAL_RULES: Mapping[str, str | None] = {
    # activations
    "batch": "data",
    "seq": None,
    # language-model weights: tensor-parallel over `model` on their wide axis
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": None,
    "mlp": "model",
    "norm": None,
    # dictionary weights
    "latents": "model",
    "layers": None,
}


# What `lm_rules(fsdp=True)` changes: the LM's d_model axis also goes over `data`.
FSDP_LM_OVERRIDES: Mapping[str, str | None] = {"embed": "data"}


def lm_rules(fsdp: bool = False) -> Mapping[str, str | None]:
    """Rules for the language model's weights: `LOGICAL_RULES`, or with `fsdp` its d_model
    axis split over `data` too (each weight [embed, x] -> (data, model) shards, gathered over
    `data` where a layer uses it)."""
    return {**LOGICAL_RULES, **FSDP_LM_OVERRIDES} if fsdp else LOGICAL_RULES


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh with axes (`data`, `model`); -1 on one axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and model == -1:
        raise ValueError("at most one mesh axis may be -1")
    if data == -1:
        data = n // model
    if model == -1:
        model = n // data
    if data * model != n or data <= 0 or model <= 0:
        raise ValueError(f"mesh data={data} x model={model} does not match {n} devices")
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims have `logical_axes` names."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    spec, used = [], set()
    for name, size in zip(logical_axes, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def logical_sharding(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = LOGICAL_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))
