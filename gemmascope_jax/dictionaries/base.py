"""`Dictionary`: the API shared by every dictionary kind, on top of named parameter arrays.

A dictionary is an NNX module whose parameters are `Weight`s (an `nnx.Param` with
`logical_axes` metadata, see `gemmascope_jax.sharding`). Subclasses (`single.py`,
`multilayer.py`) declare their parameters in `param_specs(cfg)` as
`name -> (shape, logical_axes)` and implement `pre_activations`, `decode`, `decode_sparse`
and the two folds; everything else lives here:

    encode(x)                       -> dense codes, activation per `cfg.architecture`
    __call__(x, prefix=None)        -> decode(encode(x), x, prefix)
    encode_sparse(x, k)             -> SparseCodes (K = k slots per token and source layer)
    arrays() / from_arrays(cfg, a)  <-> flat `{name: array}` dict, names as in nnx state
    to_jumprelu(x_calibration)      -> BatchTopK dictionary converted to JumpReLU
    metadata()                      -> JSON-safe dict (config + GS2 hook strings)

Flat names are the nnx state paths joined by '.': `w_enc`, `b_enc`, `threshold`, `w_dec`,
`b_dec`, `w_skip`, `b_pre` and, for multi-layer kinds, `w_dec.0 .. w_dec.{L-1}`. `threshold`
exists only for `jumprelu`, `w_skip` only when `cfg.skip`.

Dtypes: parameters are stored in `cfg.dtype`; a computation runs in the wider of the input's
and the parameters' dtypes and returns that dtype (a float32 dictionary on bfloat16
activations computes and returns float32). Matmuls use JAX's default precision; on GPU/TPU
wrap calls in `jax.default_matmul_precision("highest")` for full float32 accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemmascope_jax.dictionaries import activations as act_lib
from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.dictionaries.sparse import SparseCodes, sparsify
from gemmascope_jax.gemma3.layers import Weight

ParamSpecs = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]
OPTIONAL_PARAMS = ("b_pre",)  # may be missing from `from_arrays` input; zeros then


class Dictionary(nnx.Module):
    """Base class; construct a subclass, or use `make_dictionary` / `from_arrays`.

    Args:
        cfg: the config; `cfg.kind` must be one the subclass handles (`KIND_NAMES`).
        rngs: GS2-style random init (`init_arrays` with `rngs.params()`); None gives
            all-zero parameters.
        arrays: explicit parameters `{flat name: array}` (see `from_arrays`); overrides rngs.
    """

    KIND_NAMES: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: DictionaryConfig,
        *,
        rngs: nnx.Rngs | None = None,
        arrays: Mapping[str, Any] | None = None,
    ):
        if cfg.kind not in self.KIND_NAMES:
            raise ValueError(
                f"{type(self).__name__} handles kinds {self.KIND_NAMES}, got {cfg.kind!r}"
            )
        self.cfg = cfg
        specs = self.param_specs(cfg)
        if arrays is None:
            if rngs is None:
                arrays = {n: jnp.zeros(s, cfg.param_dtype) for n, (s, _) in specs.items()}
            else:
                arrays = _jitted_init(type(self), cfg, rngs.params())
        values = _checked_arrays(cfg, specs, arrays)
        lists: dict[str, list[Weight]] = {}
        for name, (_, axes) in specs.items():
            param = Weight(values[name], logical_axes=axes)
            if "." in name:
                lists.setdefault(name.split(".")[0], []).append(param)
            else:
                setattr(self, name, param)
        for name, params in lists.items():
            setattr(self, name, nnx.List(params))
        if "threshold" not in specs:
            self.threshold = None
        if "w_skip" not in specs:
            self.w_skip = None

    # ---- subclass interface -----------------------------------------------------------------

    @classmethod
    def param_specs(cls, cfg: DictionaryConfig) -> ParamSpecs:
        """`{flat name: (shape, logical_axes)}` of every parameter, in a fixed order."""
        raise NotImplementedError

    @classmethod
    def init_arrays(cls, cfg: DictionaryConfig, key: jax.Array) -> dict[str, jax.Array]:
        """GS2 initial float32 parameters (TR §3.2) from a PRNG key: unit-norm He-uniform
        decoder, encoder = decoder transpose, threshold 0.001, zero biases and skip."""
        raise NotImplementedError

    def pre_activations(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def decode(self, codes: jax.Array, x: jax.Array | None = None, prefix: int | None = None):
        raise NotImplementedError

    def decode_sparse(
        self, codes: SparseCodes, x: jax.Array | None = None, prefix: int | None = None
    ):
        raise NotImplementedError

    def fold_input_scale(self, s_in, s_out=None) -> Dictionary:
        raise NotImplementedError

    def fold_pre_encoder_bias(self) -> Dictionary:
        raise NotImplementedError

    # ---- shared API -------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def width(self) -> int:
        """Latents per source layer."""
        return self.cfg.width

    @property
    def num_layers(self) -> int:
        """Source layers L (1 for single-layer kinds)."""
        return self.cfg.num_layers

    def activate(self, pre: jax.Array, *, bandwidth: float | None = None) -> jax.Array:
        """Codes from pre-activations. `bandwidth` selects the JumpReLU straight-through
        estimator (training; `activations.jumprelu_ste`); other architectures ignore it.

        `batchtopk` treats all axes but the feature axis (and, for multi-layer kinds, the
        layer axis: selection is per source layer) as the batch.
        """
        cfg = self.cfg
        threshold = None if self.threshold is None else self.threshold[...]
        fn = lambda p, th: act_lib.apply_activation(
            cfg.architecture, p, threshold=th, k=cfg.k, bandwidth=bandwidth
        )
        if cfg.multilayer and cfg.architecture == "batchtopk":
            return jax.vmap(fn, in_axes=(-2, None), out_axes=-2)(pre, threshold)
        return fn(pre, threshold)

    def encode(self, x: jax.Array, *, bandwidth: float | None = None) -> jax.Array:
        """Dense codes: [..., F] (single-layer) or [..., L, F] (multi-layer)."""
        return self.activate(self.pre_activations(x), bandwidth=bandwidth)

    def __call__(self, x: jax.Array, prefix: int | None = None) -> jax.Array:
        """The prediction `decode(encode(x), x, prefix)` of the output site(s)."""
        return self.decode(self.encode(x), x, prefix)

    def encode_sparse(self, x: jax.Array, k: int) -> SparseCodes:
        """The k largest active codes per token (and source layer); see `sparse.py`."""
        return sparsify(self.encode(x), k)

    def arrays(self) -> dict[str, jax.Array]:
        """Parameters as `{flat name: array}` (nnx state paths joined by '.')."""
        state = nnx.state(self, nnx.Param)
        return {".".join(map(str, path)): var[...] for path, var in nnx.to_flat_state(state)}

    @classmethod
    def from_arrays(cls, cfg: DictionaryConfig, arrays: Mapping[str, Any]) -> Dictionary:
        """Build from `{flat name: array}`. Shapes are checked (ValueError naming the tensor);
        arrays are cast to `cfg.dtype`; a missing `b_pre` means zeros."""
        return cls(cfg, arrays=arrays)

    def with_arrays(self, **updates: Any) -> Dictionary:
        """A new dictionary of the same config with some parameters replaced."""
        return type(self).from_arrays(self.cfg, {**self.arrays(), **updates})

    def to_jumprelu(self, x: jax.Array, *, per_latent: bool = True) -> Dictionary:
        """Convert a `batchtopk` dictionary to a `jumprelu` one calibrated on inputs `x`.

        Thresholds come from `activations.batchtopk_threshold` on this batch's
        pre-activations (per source layer for multi-layer kinds), so the new dictionary's
        `encode(x)` equals this one's on `x` (up to exact ties). `k` moves to
        `cfg.extra["batchtopk_k"]`.
        """
        cfg = self.cfg
        if cfg.architecture != "batchtopk":
            raise ValueError(f"to_jumprelu converts batchtopk dictionaries, not {cfg.architecture}")
        pre = self.pre_activations(x)
        calib = lambda p: act_lib.batchtopk_threshold(p, cfg.k, per_latent=per_latent)
        threshold = jax.vmap(calib, in_axes=-2)(pre) if cfg.multilayer else calib(pre)
        extra = {
            **cfg.extra,
            "batchtopk_k": cfg.k,
            "threshold_calibration": "per_latent" if per_latent else "global",
        }
        new_cfg = cfg.replace(architecture="jumprelu", k=None, extra=extra)
        return type(self).from_arrays(new_cfg, {**self.arrays(), "threshold": threshold})

    def metadata(self) -> dict[str, Any]:
        """JSON-safe description: the config fields plus `total_width`, `num_params` and the
        GS2 `hf_hook_points_in` / `hf_hook_points_out` strings."""
        cfg = self.cfg
        out = cfg.to_dict()
        out["total_width"] = cfg.total_width
        out["num_params"] = int(sum(np.prod(a.shape) for a in self.arrays().values()))
        out["hf_hook_points_in"] = list(cfg.hf_hook_points_in)
        out["hf_hook_points_out"] = list(cfg.hf_hook_points_out)
        return out

    # ---- helpers for subclasses ---------------------------------------------------------------

    def _compute_dtype(self, *arrays: jax.Array):
        return jnp.result_type(*(a.dtype for a in arrays), self.cfg.param_dtype)

    def _p(self, param: Weight | None, dtype) -> jax.Array | None:
        return None if param is None else param[...].astype(dtype)


def stack_sites(sites: Mapping[str, Any], names, multilayer: bool):
    """A dictionary's input or target from per-site arrays: the one site's [..., d] as it is,
    or the sites `names` stacked to [..., L, d] for multi-layer kinds (numpy stays numpy)."""
    if not multilayer:
        return sites[names[0]]
    xs = [sites[s] for s in names]
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs, axis=-2)
    return jnp.stack(xs, axis=-2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_init(cls: type[Dictionary], cfg: DictionaryConfig, key: jax.Array):
    # One compiled program instead of one compilation per random op and shape.
    return cls.init_arrays(cfg, key)


def _checked_arrays(
    cfg: DictionaryConfig, specs: ParamSpecs, arrays: Mapping[str, Any]
) -> dict[str, jax.Array]:
    problems = []
    if unknown := sorted(set(arrays) - set(specs)):
        problems.append(f"unknown tensors {unknown}")
    if missing := sorted(set(specs) - set(arrays) - set(OPTIONAL_PARAMS)):
        problems.append(f"missing tensors {missing}")
    out = {}
    for name, (shape, _) in specs.items():
        if name not in arrays:
            out[name] = jnp.zeros(shape, cfg.param_dtype)
            continue
        value = arrays[name]
        if tuple(np.shape(value)) != tuple(shape):
            problems.append(f"{name} has shape {tuple(np.shape(value))}, expected {shape}")
            continue
        out[name] = jnp.asarray(value).astype(cfg.param_dtype)
    if problems:
        raise ValueError(
            f"parameters do not match the {cfg.kind} config "
            f"(d_in={cfg.d_in}, d_out={cfg.d_out}, width={cfg.width}, "
            f"layers={cfg.num_layers}): " + "; ".join(problems)
        )
    return out
