"""`dictionaries.N.init_from`: start a dictionary from an export instead of the GS2 init.

Gemma Scope 2's IT dictionaries start from the PT ones (TR §2.5): point `init_from` at the PT
run's export (`export/<name>/native`, or any folder `formats.load_dictionary` reads). An
export works on raw activations (the PT run's normalisation scalars are folded in); the run
trains on activations divided by its own scalars (estimated on its own data, e.g. IT
rollouts), so the loaded dictionary is unfolded with those: `d_norm(x / s_in) = d(x) /
s_out` exactly, the same function of the raw activations. Its encoder bias absorbs the
pre-encoder bias of the export (`TrainStep.init`). Only a fresh run is initialised this way;
a resumed run continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from gemmascope_jax.dictionaries.registry import dictionary_class


def init_from_exports(cfg, step, state, scalars):
    """`state` with every dictionary whose spec has `init_from` replaced by that export,
    unfolded with this run's normalisation `scalars` ({site: s}); unchanged if none has."""
    paths = {s.name: s.init_from for s in cfg.dictionaries if s.init_from}
    if not paths:
        return state
    from gemmascope_jax.formats import load_dictionary

    current = list(step.dictionaries(state))
    for i, (name, t) in enumerate(zip(step.names, step.trainings, strict=True)):
        if name in paths:
            current[i] = normalised_copy(load_dictionary(paths[name]), t.cfg, scalars, paths[name])
    return step.init(current)


def normalised_copy(d, cfg, scalars, where: str = "init_from"):
    """Dictionary `d` (raw units) as a dictionary of config `cfg` on inputs divided by
    `scalars[input site]` and outputs by `scalars[output site]`."""
    same = ("kind", "architecture", "width", "num_layers", "d_in", "d_out", "skip")
    diff = {
        k: (getattr(d.cfg, k), getattr(cfg, k))
        for k in same
        if getattr(d.cfg, k) != getattr(cfg, k)
    }
    if diff:
        raise ValueError(
            f"{where}: the export differs from the dictionary to train (export, run): {diff}"
        )
    s_in = jnp.asarray([scalars[s] for s in cfg.input_sites], jnp.float32)
    s_out = jnp.asarray([scalars[s] for s in cfg.output_sites], jnp.float32)
    if not cfg.multilayer:
        s_in, s_out = s_in[0], s_out[0]
    unfolded = d.fold_input_scale(1.0 / s_in, 1.0 / s_out)
    arrays = {k: v.astype(cfg.param_dtype) for k, v in unfolded.arrays().items()}
    return dictionary_class(cfg.kind).from_arrays(dataclasses.replace(cfg), arrays)
