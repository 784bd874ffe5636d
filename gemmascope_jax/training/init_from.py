"""`dictionaries.N.init_from`: start a dictionary from an export instead of the GS2 init.

Gemma Scope 2's IT dictionaries start from the PT ones (TR §2.5): point `init_from` at the PT
run's export (`export/<name>/native`, or any folder `formats.load_dictionary` reads). An
export works on raw activations (the PT run's normalisation scalars are folded in); the run
trains on activations divided by its own scalars (estimated on its own data, e.g. IT
rollouts), so the loaded dictionary is unfolded with those: `d_norm(x / s_in) = d(x) /
s_out` exactly, the same function of the raw activations. Its encoder bias absorbs the
pre-encoder bias of the export (`TrainStep.init`). Only a fresh run is initialised this way;
a resumed run continues from its checkpoint.

`dictionaries.N.init_from_layers` starts a CLT or crosscoder from single-layer exports, one
per source layer, by Gemma Scope 2's prefix init (TR §3.3, `prefix_init`).
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from gemmascope_jax.dictionaries.registry import dictionary_class

log = logging.getLogger(__name__)
_MARK_CHUNK = 1024  # chosen latents per similarity block in `prefix_init`


def init_from_exports(cfg, step, state, scalars):
    """`state` with every dictionary whose spec has `init_from` replaced by that export,
    unfolded with this run's normalisation `scalars` ({site: s}); unchanged if none has."""
    paths = {s.name: s.init_from for s in cfg.dictionaries if s.init_from}
    layered = {s.name: s.init_from_layers for s in cfg.dictionaries if s.init_from_layers}
    if not paths and not layered:
        return state
    from gemmascope_jax.formats import load_dictionary

    current = list(step.dictionaries(state))
    for i, (name, t) in enumerate(zip(step.names, step.trainings, strict=True)):
        if name in paths:
            current[i] = normalised_copy(load_dictionary(paths[name]), t.cfg, scalars, paths[name])
        elif name in layered:
            files = [layered[name].format(layer=layer) for layer in t.cfg.layers]
            singles = [load_dictionary(f) for f in files]
            current[i], info = prefix_init(current[i], singles, scalars, files)
            log.info("%s: prefix init from %s: %s", name, layered[name], info)
    return step.init(current)


def prefix_init(fresh, singles, scalars, where=None):
    """Gemma Scope 2's CLT / crosscoder init (TR §3.3) from single-layer dictionaries.

    fresh: the freshly initialised multi-layer dictionary (normalised units; its config is
    kept); singles: one single-layer dictionary per source layer (raw units, e.g. exports of
    Matryoshka transcoders `mlp_in.l -> mlp_out.l` for a CLT), each reading and writing that
    layer's sites; scalars: `{site: s}` of this run. Iterating from the earliest layer, layer
    l takes the first `width` latents of its single-layer dictionary that are not marked off
    (its Matryoshka prefix, in latent order): their encoder columns, biases and thresholds,
    and their decoder rows as the same-layer block (blocks to later layers start at zero, so
    the initial CLT is the concatenation of the chosen single-layer latents). Each chosen
    latent then marks off, in every later layer, the latent whose encoder column has the
    largest cosine with its decoder row (early decoder · later encoder: a later feature that
    reads what an earlier one writes duplicates it once the earlier one decodes across
    layers). `b_dec`, `b_pre` and a skip-transcoder's `w_skip` come from the single-layer
    dictionaries. Slots a prefix cannot fill keep the fresh init (logged).

    Returns (dictionary, info): info `{layer: {"chosen": n, "marked": m, "width": W}}`."""
    cfg = fresh.cfg
    where = where or [f"layer {layer}" for layer in cfg.layers]
    if len(singles) != cfg.num_layers:
        raise ValueError(f"{cfg.kind} has {cfg.num_layers} source layers, got {len(singles)}")
    norm = []
    for j, (d, w) in enumerate(zip(singles, where, strict=True)):
        sites = (d.cfg.input_sites[0], d.cfg.output_sites[0])
        want = (cfg.input_sites[j], cfg.output_sites[j])
        if d.cfg.multilayer or sites != want or (d.cfg.d_in, d.cfg.d_out) != (cfg.d_in, cfg.d_out):
            raise ValueError(
                f"{w}: a single-layer dictionary {want[0]} -> {want[1]} with d_in {cfg.d_in}, "
                f"d_out {cfg.d_out} is needed, got {d.cfg.kind} {sites[0]} -> {sites[1]} "
                f"({d.cfg.d_in} -> {d.cfg.d_out})"
            )
        norm.append(
            {
                k: np.asarray(v, np.float32)
                for k, v in normalised_copy(d, d.cfg, scalars, w).arrays().items()
            }
        )
    arrays = {k: np.array(v, np.float32) for k, v in fresh.arrays().items()}
    enc_unit = [a["w_enc"] / np.maximum(np.linalg.norm(a["w_enc"], axis=0), 1e-12) for a in norm]
    marked = [np.zeros(a["w_enc"].shape[1], bool) for a in norm]
    info = {}
    for j, a in enumerate(norm):
        pick = np.flatnonzero(~marked[j])[: cfg.width]
        n = len(pick)
        arrays["w_enc"][j][:, :n] = a["w_enc"][:, pick]
        arrays["b_enc"][j][:n] = a["b_enc"][pick]
        if "threshold" in arrays and "threshold" in a:
            arrays["threshold"][j][:n] = a["threshold"][pick]
        arrays[f"w_dec.{j}"][:n] = 0.0
        arrays[f"w_dec.{j}"][:n, 0, :] = a["w_dec"][pick]
        for name in ("b_dec", "b_pre", "w_skip"):
            if name in arrays and name in a:
                arrays[name][j] = a[name]
        info[int(cfg.layers[j])] = {
            "chosen": n,
            "marked": int(marked[j].sum()),
            "width": len(marked[j]),
        }
        if n < cfg.width:
            log.warning(
                "%s: only %d of %d latents unmarked; the rest keep the fresh init",
                where[j],
                n,
                cfg.width,
            )
        rows = a["w_dec"][pick]
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        for later in range(j + 1, cfg.num_layers):
            for lo in range(0, n, _MARK_CHUNK):  # [chunk, W] similarities at a time
                sims = rows[lo : lo + _MARK_CHUNK] @ enc_unit[later]
                marked[later][np.argmax(sims, axis=1)] = True
    params = {k: jnp.asarray(v, cfg.param_dtype) for k, v in arrays.items()}
    return dictionary_class(cfg.kind).from_arrays(cfg, params), info


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
