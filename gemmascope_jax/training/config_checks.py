"""The meaning checks of a run config (`RunConfig.validate`): sites against the model depth,
L0 < width, mesh vs device count, width divisible by the `model` axis, ...; every problem at
once in a `ConfigError` naming its dotted key. Also the model architecture a `model` section
names (`model_architecture`), which the depth checks need.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from gemmascope_jax.dictionaries.activations import ACTIVATIONS, canonical_architecture
from gemmascope_jax.dictionaries.config import SINGLE_LAYER_KINDS
from gemmascope_jax.formats import canonical_format
from gemmascope_jax.gemma3.config import Gemma3Config, preset
from gemmascope_jax.gemma3.sites import resolve_site
from gemmascope_jax.training.config_sections import DictionarySpec, DistributedConfig, ModelConfig
from gemmascope_jax.training.yaml_schema import ConfigError

_DEPTH_UNKNOWN = 1 << 30


def model_architecture(model: ModelConfig) -> Gemma3Config | None:
    """The Gemma 3 architecture named by `model.preset` or readable cheaply from the source
    (embedded, a transformers dir's config.json, a GGUF header, a gemma-3-SIZE name)."""
    if model.preset:
        return preset(model.preset)
    source = str(model.source)
    if source == "embedded":
        return preset("270m")
    path = Path(source).expanduser()
    try:
        if (path / "config.json").is_file():
            return Gemma3Config.from_hf(json.loads((path / "config.json").read_text()))
        if path.is_file() and path.suffix.lower() == ".gguf":
            from gemmascope_jax.gemma3.gguf import GGUFCheckpoint

            return Gemma3Config.from_hf(GGUFCheckpoint(path).hf_config)
    except (OSError, ValueError):
        return None
    if m := re.search(r"gemma-?3-(270m|1b|4b|12b|27b)", source.lower()):
        return preset(m[1])
    return None


def validate_run(cfg, device_count: int | None):
    """The resolved `RunConfig` (see `RunConfig.validate`); ConfigError lists every problem."""
    problems: list[tuple[str, str]] = []
    add = problems.append
    try:
        arch = cfg.model_arch()
    except ValueError as e:
        arch = add(("model.preset", str(e)))
    depth = arch.num_layers if arch else None
    mesh, m, d, t = cfg.mesh, cfg.mesh.model, cfg.data, cfg.train
    data_axis, model_axis = (mesh.data if mesh.data > 0 else None), (m if m > 0 else None)
    if device_count is not None and min(mesh.data, m) >= -1 and 0 not in (mesh.data, m) != (-1, -1):
        try:
            data_axis, model_axis = mesh.shape(device_count)
        except ValueError as e:
            add(("mesh", str(e)))
    dist = mesh.distributed if isinstance(mesh.distributed, DistributedConfig) else None
    shards = d.shards or (dist.num_processes if dist else 1)
    # fmt: off
    for bad, key, msg in (
        (mesh.data == 0 or mesh.data < -1, "mesh.data", f"must be -1 or >= 1, got {mesh.data}"),
        (m == 0 or m < -1, "mesh.model", f"must be -1 or >= 1, got {m}"),
        (mesh.data == m == -1, "mesh", "at most one of data, model may be -1"),
        (dist and dist.process_id >= dist.num_processes, "mesh.distributed.process_id",
         "must be < mesh.distributed.num_processes"),
        (dist and not re.fullmatch(r".+:\d+", dist.coordinator_address),
         "mesh.distributed.coordinator_address", "expected host:port"),
        (dist and d.shards and d.shards % dist.num_processes, "data.shards",
         "must be a multiple of mesh.distributed.num_processes (each reads whole shards)"),
        (d.batch_size % shards, "data.batch_size",
         f"must split evenly over the {shards} data shards (one per process by default)"),
        (t.batch_tokens % shards, "train.batch_tokens",
         f"must split evenly over the {shards} data shards (one per process by default)"),
        (not d.sources, "data.sources", "at least one source"),
        (d.epochs > 1 and d.cache_dir is None, "data.epochs",
         "more than one epoch needs data.cache_dir (the activation cache)"),
        (d.shuffle_buffer_tokens < t.batch_tokens, "data.shuffle_buffer_tokens",
         f"must be >= train.batch_tokens ({t.batch_tokens})"),
        (data_axis and t.batch_tokens % data_axis, "train.batch_tokens",
         f"{t.batch_tokens} not divisible by the mesh data axis ({data_axis})"),
        (any(not 0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
         f"each beta must be in [0, 1), got {list(t.adam_betas)}"),
        (not cfg.dictionaries, "dictionaries", "at least one dictionary"),
    ):  # fmt: on
        if bad:
            add((key, msg))
    for i, src in enumerate(d.sources):
        if src.type not in ("embedded", "rollouts") and not src.path:
            add((f"data.sources.{i}.path", f"required for type {src.type!r}"))
    formats = []
    for i, fmt in enumerate(cfg.export.formats):
        try:
            formats.append(canonical_format(fmt))
        except ValueError as e:
            add((f"export.formats.{i}", str(e)))
    specs = [
        _validate_dict(spec, key, depth, model_axis, add)
        for key, spec in _per_layer_specs(cfg.dictionaries, depth)
    ]
    names = [s.name for s in specs if s is not None]
    for name in sorted({n for n in names if names.count(n) > 1}):
        add(("dictionaries", f"duplicate name {name!r}; set dictionaries.N.name"))
    if problems:
        raise ConfigError(problems)
    export = dataclasses.replace(cfg.export, formats=tuple(dict.fromkeys(formats)))
    run = dataclasses.replace(cfg.run, dir=cfg.run.dir or f"runs/{cfg.run.name}")
    return dataclasses.replace(cfg, run=run, dictionaries=tuple(specs), export=export)


def _per_layer_specs(specs, depth):
    """(config key, spec) pairs with every single-layer spec that lists several layers (or
    `all`) split into one spec per layer, named `<name>_<layer>`: `{kind: transcoder, layers:
    all}` is a whole-model transcoder set (exported as one circuit-tracer set)."""
    out = []
    for i, spec in enumerate(specs):
        key, layers = f"dictionaries.{i}", spec.layers
        if layers == "all" and depth is not None:
            layers = tuple(range(depth))
        single = spec.kind in SINGLE_LAYER_KINDS and spec.input_sites is None
        if not single or not isinstance(layers, tuple) or len(layers) < 2:
            out.append((key, spec))
            continue
        for layer in layers:
            name = f"{spec.name}_{layer}" if spec.name else None
            one = dataclasses.replace(spec, layers=(layer,), name=name)
            out.append((f"{key}[layer {layer}]", one))
    return out


def _validate_dict(d: DictionarySpec, key: str, depth, model_axis, add) -> DictionarySpec | None:
    bad = []

    def err(k, msg):
        bad.append(k)
        add((f"{key}.{k}" if k else key, msg))

    try:
        arch = canonical_architecture(d.architecture)
    except ValueError as e:
        err("architecture", str(e))
        arch = None
    layers = d.layers
    if layers == "all":
        if depth is None:
            err("layers", "'all' needs the model depth; set model.preset")
        layers = tuple(range(depth or 0))
    sites = {}
    for field in ("input_sites", "output_sites"):
        for j, name in enumerate(getattr(d, field) or ()):
            try:
                site = resolve_site(name, depth or _DEPTH_UNKNOWN)
                if depth is None and site.layer is not None and site.layer >= _DEPTH_UNKNOWN // 2:
                    raise ValueError("negative layer needs the model depth; set model.preset")
                sites.setdefault(field, []).append(site)
            except (ValueError, TypeError) as e:
                err(f"{field}.{j}", str(e))
    if layers is None:
        if d.input_sites is None:
            err("layers", "required (or give input_sites)")
        elif "input_sites" in sites and all(s.layer is not None for s in sites["input_sites"]):
            layers = tuple(s.layer for s in sites["input_sites"])
        elif "input_sites" in sites:
            err("layers", "required: an input site has no layer")
    if depth is not None and layers:
        for j, layer in enumerate(layers):
            if not 0 <= layer < depth:
                err(f"layers.{j}", f"layer {layer} out of range for a {depth}-layer model")
    n_src = len(layers or ()) or 1
    if d.l0_target is not None and d.l0_target <= 0:
        err("l0_target", f"must be > 0, got {d.l0_target:g}")
    elif d.l0_target is not None and d.l0_target >= d.width * n_src:
        err("l0_target", f"{d.l0_target:g} must be < width ({d.width * n_src} latents)")
    if arch == "jumprelu" and d.l0_target is None:
        err("l0_target", "required for jumprelu (the quadratic L0 penalty's target)")
    if arch in ACTIVATIONS and ACTIVATIONS[arch].needs_k and d.k is None:
        err("k", f"required for {arch}")
    if arch in ACTIVATIONS and not ACTIVATIONS[arch].needs_k and d.k is not None:
        err("k", f"only topk / batchtopk use k, not {arch}")
    if d.skip is not None and d.skip != (d.kind == "skip_transcoder") and d.kind != "clt":
        err("skip", f"kind {d.kind!r} cannot have skip={d.skip}")
    if d.k is not None and d.k > d.width:
        err("k", f"{d.k} must be <= width ({d.width})")
    if d.sparse_k is not None and arch not in (None, "jumprelu", "batchtopk"):
        err("sparse_k", f"bounds JumpReLU / BatchTopK codes; {arch} decodes sparsely with k")
    elif d.sparse_k is not None and d.sparse_k > d.width:
        err("sparse_k", f"{d.sparse_k} must be <= width ({d.width})")
    if d.sparse_groups > 1 and d.sparse_k is None:
        err("sparse_groups", "groups the slots of sparse_k, which is not set")
    elif d.sparse_k is not None and (d.sparse_k % d.sparse_groups or d.width % d.sparse_groups):
        err("sparse_groups", f"{d.sparse_groups} must divide sparse_k and width ({d.width})")
    if model_axis and d.width % model_axis:
        err("width", f"{d.width} not divisible by the mesh model axis ({model_axis})")
    try:
        _ = d.matryoshka_widths
    except ValueError as e:
        err("matryoshka", str(e))
    if d.init_from_layers is not None:
        if d.kind not in ("clt", "crosscoder"):
            err("init_from_layers", f"starts a CLT or crosscoder, not a {d.kind} (use init_from)")
        elif "{layer}" not in d.init_from_layers:
            err("init_from_layers", "needs '{layer}' in the path (one export per source layer)")
        if d.init_from is not None:
            err("init_from_layers", "give init_from or init_from_layers, not both")
    if d.name is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", str(d.name)):
        err(
            "name",
            f"{d.name!r}: use letters, digits, '_', '-', '.', not starting with '.' (it names "
            "folders inside the run folder, so '.', '..' and paths are refused)",
        )
    if bad:
        return None
    try:
        dc = dataclasses.replace(d, layers=layers).dictionary_config(1, 1, model_num_layers=depth)
    except ValueError as e:
        err("", str(e))
        return None
    where = dc.input_sites[0] if dc.num_layers == 1 else f"layers_{layers[0]}-{layers[-1]}"
    name = d.name or f"{d.kind}_{where.replace('.', '_')}"
    return dataclasses.replace(
        d,
        name=name,
        architecture=dc.architecture,
        layers=dc.layers,
        input_sites=dc.input_sites,
        output_sites=dc.output_sites,
        skip=dc.skip,
    )
