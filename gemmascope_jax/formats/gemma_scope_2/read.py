"""Reading Gemma Scope 2 folders into dictionaries: single-layer folders (SAE, transcoder,
`_affine` skip-transcoder) and multi-layer ones (CLT, crosscoder), one `params_layer` file at
a time. Every tensor is checked for shape, and config.json against the tensors; what the
released files leave undocumented is decided as the package docstring says.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemmascope_jax.formats.gemma_scope_2.layout import (
    CONFIG_FILE,
    CROSSCODER_DIR_RE,
    EXTRA_KEY,
    FOLDER_SITES,
    GS2_ARCHITECTURE,
    LAYER_FILE,
    LAYER_FILE_RE,
    MULTI_KEYS,
    PARAMS_FILE,
    SINGLE_DIR_RE,
    SINGLE_KEYS,
    model_from_path,
    model_num_layers,
)
from gemmascope_jax.formats.io import FormatError, TensorReader
from gemmascope_jax.io.files import read_json

_DTYPES = ("float32", "bfloat16", "float16")
_UNKNOWN_DEPTH = 1 << 20


class UpstreamDecoderWarning(UserWarning):
    """A GS2 multi-layer file held non-zero decoder blocks to upstream layers (dropped)."""


# ---- checks shared by both layouts ------------------------------------------------------------


def _check_architecture(conf: dict, where: Path) -> None:
    arch = conf.get("architecture", GS2_ARCHITECTURE)
    if str(arch).lower().replace("_", "") != "jumprelu":
        raise FormatError(
            f"{where}: architecture {arch!r} is not supported; Gemma Scope 2 dictionaries are "
            f"{GS2_ARCHITECTURE!r}"
        )


def _affine_flag(conf: dict, where: Path, present: bool, params: Path) -> bool:
    affine = conf.get("affine_connection")
    if affine is None:
        return present
    if not isinstance(affine, bool):
        raise FormatError(f"{where}: affine_connection must be true or false, got {affine!r}")
    if affine and not present:
        raise FormatError(
            f"{params}: missing tensor 'affine_skip_connection' ({where} says "
            "affine_connection=true)"
        )
    if present and not affine:
        raise FormatError(
            f"{params}: unexpected tensor 'affine_skip_connection' ({where} says "
            "affine_connection=false)"
        )
    return affine


def _latents(reader: TensorReader, conf_width: int | None, conf_path: Path, n: int = 1) -> int:
    """F (latents per source layer) from `b_enc`, checked against config.json `width`."""
    shape = reader.shape("b_enc")
    if len(shape) != 1:
        raise FormatError(f"{reader.path}: tensor 'b_enc' has shape {shape}, expected (width,)")
    f = shape[0]
    if conf_width is not None:
        if not isinstance(conf_width, int) or isinstance(conf_width, bool) or conf_width <= 0:
            raise FormatError(f"{conf_path}: width must be a positive int, got {conf_width!r}")
        if conf_width not in (f, f * n):
            per = f" x {n} layers = {f * n}" if n > 1 else ""
            raise FormatError(
                f"{reader.path}: tensor 'b_enc' has {f} latents{per}, but {conf_path} says "
                f"width={conf_width}"
            )
    if reader.shape("threshold") != (f,):
        raise FormatError(
            f"{reader.path}: tensor 'threshold' has shape {reader.shape('threshold')}, "
            f"expected ({f},) like 'b_enc'"
        )
    return f


def _d_in(reader: TensorReader, f: int) -> int:
    """d_in from `w_enc` [d_in, F]; a transposed [F, d_in] is reported by the checked read."""
    shape = reader.shape("w_enc")
    if len(shape) == 2 and shape[1] == f:
        return shape[0]
    if len(shape) == 2 and shape[0] == f:
        return shape[1]
    raise FormatError(f"{reader.path}: tensor 'w_enc' has shape {shape}, expected (d_in, {f})")


def _d_out(reader: TensorReader) -> int:
    shape = reader.shape("b_dec")
    if len(shape) != 1:
        raise FormatError(f"{reader.path}: tensor 'b_dec' has shape {shape}, expected (d_out,)")
    return shape[0]


def _dtype(reader: TensorReader) -> str:
    name = str(reader.file.dtype("w_dec"))
    return name if name in _DTYPES else "float32"


def _resolve(hook: Any, key: str, conf_path: Path, num_layers: int | None):
    from gemmascope_jax.gemma3.sites import resolve_site

    if not isinstance(hook, str):
        raise FormatError(f"{conf_path}: {key} must be a hook string, got {hook!r}")
    try:
        site = resolve_site(hook, num_layers or _UNKNOWN_DEPTH)
    except ValueError as e:
        raise FormatError(f"{conf_path}: {key}: {e}") from None
    if site.layer is None:
        raise FormatError(f"{conf_path}: {key} {hook!r} is not a per-layer site")
    return site


def _extra_keys(conf: dict, known: tuple[str, ...]) -> dict[str, Any]:
    unknown = {k: v for k, v in conf.items() if k not in known}
    return {EXTRA_KEY: unknown} if unknown else {}


def _make_config(conf_path: Path, **kwargs):
    from gemmascope_jax.dictionaries import DictionaryConfig

    try:
        return DictionaryConfig(**kwargs)
    except ValueError as e:
        raise FormatError(f"{conf_path}: {e}") from None


def _build(cfg, arrays: dict, where: Path):
    from gemmascope_jax.dictionaries import dictionary_class

    try:
        return dictionary_class(cfg.kind).from_arrays(cfg, arrays)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None


# ---- single-layer -----------------------------------------------------------------------------


def load_single(path: Path):
    conf_path = path / CONFIG_FILE
    conf = read_json(conf_path) if conf_path.is_file() else {}
    _check_architecture(conf, conf_path)
    reader = TensorReader(path / PARAMS_FILE)
    affine = _affine_flag(conf, conf_path, "affine_skip_connection" in reader, reader.path)
    base = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"]
    reader.require(base + (["affine_skip_connection"] if affine else []))
    f = _latents(reader, conf.get("width"), conf_path)
    d_in, d_out = _d_in(reader, f), _d_out(reader)

    model_name = conf.get("model_name") or model_from_path(path)
    depth = model_num_layers(model_name)
    if "hf_hook_point_in" in conf:
        site_in = _resolve(conf["hf_hook_point_in"], "hf_hook_point_in", conf_path, depth)
        hook_out = conf.get("hf_hook_point_out", conf["hf_hook_point_in"])
        site_out = _resolve(hook_out, "hf_hook_point_out", conf_path, depth)
        layer, kind_in, kind_out = site_in.layer, site_in.kind, site_out.kind
        site_names = (site_in.name,), (site_out.name,)
    else:  # no hooks: layer from `layer_{L}_width_...`, site from the parent `{site}[_all]`
        m = SINGLE_DIR_RE.match(path.name)
        sites = FOLDER_SITES.get(path.parent.name.removesuffix("_all"))
        if m is None or sites is None:
            raise FormatError(
                f"{conf_path}: no hf_hook_point_in, and the path {path} is not "
                f"{{{'|'.join(FOLDER_SITES)}}}[_all]/layer_{{L}}_width_...: cannot tell "
                "which site this dictionary reads"
            )
        layer, (kind_in, kind_out) = int(m[1]), sites
        site_names = (f"{kind_in}.{layer}",), (f"{kind_out}.{layer}",)
        if depth is not None and layer >= depth:
            raise FormatError(f"{path}: layer {layer} out of range for {model_name}")

    kind_name = conf.get("type")
    if kind_name is None:
        kind_name = "sae" if kind_in == kind_out and not affine else "transcoder"
    if kind_name == "sae":
        if affine:
            raise FormatError(f"{conf_path}: type 'sae' cannot have affine_connection=true")
        kind = "sae"
    elif kind_name == "transcoder":
        kind = "skip_transcoder" if affine else "transcoder"
    else:
        raise FormatError(
            f"{conf_path}: type {kind_name!r} is not a single-layer type ('sae' or 'transcoder')"
            f"; a {kind_name} folder holds {LAYER_FILE.format('i')} files"
        )
    cfg = _make_config(
        conf_path,
        kind=kind,
        architecture="jumprelu",
        d_in=d_in,
        d_out=d_out,
        width=f,
        layers=(layer,),
        input_sites=site_names[0],
        output_sites=site_names[1],
        model_name=model_name,
        model_num_layers=depth,
        l0_target=conf.get("l0"),
        skip=affine if kind != "sae" else None,
        dtype=_dtype(reader),
        extra=_extra_keys(conf, SINGLE_KEYS),
    )
    shapes = {
        "w_enc": (d_in, f),
        "b_enc": (f,),
        "threshold": (f,),
        "w_dec": (f, d_out),
        "b_dec": (d_out,),
        "affine_skip_connection": (d_in, d_out),
    }
    arrays = {}
    for name in base + (["affine_skip_connection"] if affine else []):
        ours = "w_skip" if name == "affine_skip_connection" else name
        arrays[ours] = jnp.asarray(reader.read(name, shapes[name], dtype=None))
    return _build(cfg, arrays, reader.path)


# ---- multi-layer ------------------------------------------------------------------------------


def _layer_files(path: Path) -> list[Path]:
    found = {int(m[1]): p for p in path.iterdir() if (m := LAYER_FILE_RE.fullmatch(p.name))}
    n = max(found) + 1
    if missing := [LAYER_FILE.format(i) for i in range(n) if i not in found]:
        raise FormatError(
            f"{path}: missing {missing} (found {len(found)} of {n} params_layer files)"
        )
    return [found[i] for i in range(n)]


def _multi_kind(conf: dict, conf_path: Path, path: Path) -> str:
    kind = conf.get("type")
    if kind is not None:
        if kind not in ("clt", "crosscoder"):
            raise FormatError(
                f"{conf_path}: type {kind!r}, but the folder holds {LAYER_FILE.format('i')} "
                "files (types 'clt' or 'crosscoder')"
            )
        return kind
    if CROSSCODER_DIR_RE.match(path.name) or path.parent.name.startswith("crosscoder"):
        return "crosscoder"
    return "clt"


def _multi_layers(conf: dict, conf_path: Path, path: Path, kind: str, n: int):
    """(layers, given): the model layer of each source layer, and whether they were stated."""
    if "n_layers" in conf and conf["n_layers"] != n:
        raise FormatError(
            f"{conf_path}: n_layers={conf['n_layers']!r}, but {path} has {n} params_layer files"
        )
    if (layers := conf.get("layers")) is not None:
        if not isinstance(layers, list) or len(layers) != n:
            raise FormatError(
                f"{conf_path}: layers={layers!r} must list one model layer per params_layer "
                f"file ({n})"
            )
        return tuple(layers), True
    if m := CROSSCODER_DIR_RE.match(path.name):
        layers = tuple(int(x) for x in m[1].split("_"))
        if len(layers) != n:
            raise FormatError(
                f"{path}: the folder name names layers {layers}, but it has {n} params_layer files"
            )
        return layers, True
    if kind == "crosscoder":
        raise FormatError(
            f"{path}: cannot tell which model layers this crosscoder reads: give config.json "
            "'layers' or name the folder layer_7_13_17_22_width_..."
        )
    return tuple(range(n)), False


def _multi_sites(conf: dict, conf_path: Path, kind: str, layers: tuple, depth: int | None):
    """(input_sites, output_sites) from config hooks: a list per layer, or one string whose
    site applies to every layer; None where the config has none (kind defaults)."""
    out = []
    for key in ("hf_hook_point_in", "hf_hook_point_out"):
        hook = conf.get(key)
        if hook is None:
            out.append(None)
        elif isinstance(hook, list):
            if len(hook) != len(layers):
                raise FormatError(
                    f"{conf_path}: {key} lists {len(hook)} hooks for {len(layers)} layers"
                )
            out.append(tuple(_resolve(h, key, conf_path, depth).name for h in hook))
        else:
            kind = _resolve(hook, key, conf_path, depth).kind
            out.append(tuple(f"{kind}.{layer}" for layer in layers))
    if out[1] is None and out[0] is not None and kind == "crosscoder":
        out[1] = out[0]
    return out[0], out[1]


def load_multi(path: Path, progress: bool):
    files = _layer_files(path)
    n = len(files)
    conf_path = path / CONFIG_FILE
    conf = read_json(conf_path) if conf_path.is_file() else {}
    _check_architecture(conf, conf_path)
    kind = _multi_kind(conf, conf_path, path)
    layers, stated = _multi_layers(conf, conf_path, path, kind, n)
    model_name = conf.get("model_name") or model_from_path(path)
    depth = model_num_layers(model_name)
    if kind == "clt" and not stated and depth is not None and depth != n:
        raise FormatError(
            f"{path}: a Gemma Scope 2 CLT has one params_layer file per model layer, but "
            f"there are {n} files and {model_name} has {depth} layers (incomplete folder?)"
        )
    sites_in, sites_out = _multi_sites(conf, conf_path, kind, layers, depth)

    first = TensorReader(files[0])
    affine = _affine_flag(conf, conf_path, "affine_skip_connection" in first, first.path)
    names = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"]
    names += ["affine_skip_connection"] if affine else []
    first.require(names)
    f = _latents(first, conf.get("width"), conf_path, n)
    d_in, d_out, dtype = _d_in(first, f), _d_out(first), _dtype(first)
    cfg = _make_config(
        conf_path,
        kind=kind,
        architecture="jumprelu",
        d_in=d_in,
        d_out=d_out,
        width=f,
        layers=layers,
        input_sites=sites_in,
        output_sites=sites_out,
        model_name=model_name,
        model_num_layers=depth,
        l0_target=conf.get("l0"),
        skip=affine,
        dtype=dtype,
        extra=_extra_keys(conf, MULTI_KEYS),
    )

    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    stacked = {
        "w_enc": np.empty((n, d_in, f), np_dtype),
        "b_enc": np.empty((n, f), np_dtype),
        "threshold": np.empty((n, f), np_dtype),
        "b_dec": np.empty((n, d_out), np_dtype),
    }
    if affine:
        stacked["w_skip"] = np.empty((n, d_in, d_out), np_dtype)
    shapes = {
        "w_enc": (d_in, f),
        "b_enc": (f,),
        "threshold": (f,),
        "b_dec": (d_out,),
        "affine_skip_connection": (d_in, d_out),
    }
    decoders, upstream = {}, []
    for i in tqdm(range(n), desc=f"loading {path.name}", unit="layer", disable=not progress):
        reader = first if i == 0 else TensorReader(files[i])
        reader.require(names)
        for name in names:
            if name == "w_dec":
                continue
            ours = "w_skip" if name == "affine_skip_connection" else name
            stacked[ours][i] = reader.read(name, shapes[name], dtype=None)
        if reader.shape("w_dec") == (f, n - i, d_out):  # causal blocks only (tolerated)
            w_dec = reader.read("w_dec", (f, n - i, d_out), dtype=None)
        else:
            w_dec = reader.read("w_dec", (f, n, d_out), dtype=None)
            if i and np.any(w_dec[:, :i, :] != 0):
                peak = float(np.max(np.abs(w_dec[:, :i, :].astype(np.float32))))
                upstream.append(f"{reader.path.name} (max |w| {peak:.3g})")
            w_dec = w_dec[:, i:, :]
        decoders[f"w_dec.{i}"] = jnp.asarray(w_dec.astype(np_dtype, copy=False))
        del w_dec
    if upstream:
        warnings.warn(
            f"{path}: non-zero decoder blocks to upstream layers in {', '.join(upstream)}. A "
            "Gemma Scope 2 CLT/crosscoder is causal (source layer l writes layers >= l), so "
            "these blocks were dropped and outputs ignore them.",
            UpstreamDecoderWarning,
            stacklevel=3,
        )
    arrays = {name: jnp.asarray(value) for name, value in stacked.items()}
    del stacked
    return _build(cfg, {**arrays, **decoders}, path)
