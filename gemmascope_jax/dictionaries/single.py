"""`SingleLayerDictionary`: SAE, transcoder and skip-transcoder, in Gemma Scope 2 layout.

Parameters (F = width; file orientation of GS2 `params.safetensors`, docs/formats.md):

| name        | shape         | logical axes     | use                                      |
|-------------|---------------|------------------|------------------------------------------|
| `w_enc`     | [d_in, F]     | (embed, latents) | `pre = (x - b_pre) @ w_enc + b_enc`      |
| `b_enc`     | [F]           | (latents,)       |                                          |
| `threshold` | [F]           | (latents,)       | JumpReLU θ (`jumprelu` only)             |
| `w_dec`     | [F, d_out]    | (latents, embed) | `y = f @ w_dec + b_dec (+ x @ w_skip)`   |
| `b_dec`     | [d_out]       | (embed,)         |                                          |
| `w_skip`    | [d_in, d_out] | (embed, embed)   | skip only; GS2 `affine_skip_connection`  |
| `b_pre`     | [d_in]        | (embed,)         | pre-encoder bias; zeros unless trained   |

Inputs x are [..., d_in], codes [..., F], predictions [..., d_out]. An SAE predicts its
input site, a transcoder its output site from the input site; the skip term uses the raw
input x (not x - b_pre).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemmascope_jax.dictionaries.base import Dictionary, ParamSpecs
from gemmascope_jax.dictionaries.config import SINGLE_LAYER_KINDS, DictionaryConfig
from gemmascope_jax.dictionaries.sparse import SparseCodes, prefix_mask
from pallas_kernels import sparse_decode_single

GS2_INIT_THRESHOLD = 0.001


def unit_rows(w: jax.Array, axes=(-1,)) -> jax.Array:
    """Rescale `w` so that the norm over `axes` is 1 (GS2 decoder normalisation)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    return w / jnp.maximum(norm, jnp.finfo(w.dtype).tiny)


def check_prefix(prefix: int | None, width: int) -> None:
    if prefix is not None and (not isinstance(prefix, int) or not 1 <= prefix <= width):
        raise ValueError(f"prefix must be an int in 1..{width} (latents), got {prefix!r}")


class SingleLayerDictionary(Dictionary):
    """SAE (`sae`), transcoder (`transcoder`) or skip-transcoder (`skip_transcoder`)."""

    KIND_NAMES = SINGLE_LAYER_KINDS

    @classmethod
    def param_specs(cls, cfg: DictionaryConfig) -> ParamSpecs:
        f, di, do = cfg.width, cfg.d_in, cfg.d_out
        specs: ParamSpecs = {
            "w_enc": ((di, f), ("embed", "latents")),
            "b_enc": ((f,), ("latents",)),
        }
        if cfg.architecture == "jumprelu":
            specs["threshold"] = ((f,), ("latents",))
        specs["w_dec"] = ((f, do), ("latents", "embed"))
        specs["b_dec"] = ((do,), ("embed",))
        if cfg.skip:
            specs["w_skip"] = ((di, do), ("embed", "embed"))
        specs["b_pre"] = ((di,), ("embed",))
        return specs

    @classmethod
    def init_arrays(cls, cfg: DictionaryConfig, key: jax.Array) -> dict[str, jax.Array]:
        """GS2 init; when d_in != d_out the encoder gets its own unit-norm He-uniform columns."""
        he = jax.nn.initializers.he_uniform()
        k_dec, k_enc = jax.random.split(key)
        w_dec = unit_rows(he(k_dec, (cfg.width, cfg.d_out), jnp.float32))
        if cfg.d_in == cfg.d_out:
            w_enc = w_dec.T
        else:
            w_enc = unit_rows(he(k_enc, (cfg.d_in, cfg.width), jnp.float32), axes=(0,))
        out = {"w_enc": w_enc, "w_dec": w_dec}
        if cfg.architecture == "jumprelu":
            out["threshold"] = jnp.full((cfg.width,), GS2_INIT_THRESHOLD, jnp.float32)
        specs = cls.param_specs(cfg)
        return {n: out.get(n, jnp.zeros(s, jnp.float32)) for n, (s, _) in specs.items()}

    # ---- forward ----------------------------------------------------------------------------

    def _check_x(self, x: jax.Array) -> None:
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected inputs [..., {self.cfg.d_in}], got shape {x.shape}")

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """`(x - b_pre) @ w_enc + b_enc`: x [..., d_in] -> [..., F]."""
        self._check_x(x)
        dt = self._compute_dtype(x)
        x = x.astype(dt) - self._p(self.b_pre, dt)
        return x @ self._p(self.w_enc, dt) + self._p(self.b_enc, dt)

    def decode(self, codes: jax.Array, x: jax.Array | None = None, prefix: int | None = None):
        """`codes[..., :n] @ w_dec[:n] + b_dec (+ x @ w_skip)`: codes [..., F] -> [..., d_out].

        `prefix=n` decodes from the first n latents only (a Matryoshka level); `x` [..., d_in]
        is needed (only) by skip-transcoders.
        """
        if codes.shape[-1] != self.cfg.width:
            raise ValueError(f"expected codes [..., {self.cfg.width}], got shape {codes.shape}")
        check_prefix(prefix, self.cfg.width)
        dt = self._compute_dtype(codes)
        n = self.cfg.width if prefix is None else prefix
        w_dec = self._p(self.w_dec, dt)
        y = codes[..., :n].astype(dt) @ w_dec[:n] + self._p(self.b_dec, dt)
        return self._add_skip(y, x)

    def decode_sparse(
        self, codes: SparseCodes, x: jax.Array | None = None, prefix: int | None = None
    ):
        """Gather-and-sum decode of `SparseCodes` [..., K]; equals `decode` of the dense codes.
        Costs O(K·d_out) per token (`pallas_kernels.sparse_decode_single`)."""
        check_prefix(prefix, self.cfg.width)
        codes = prefix_mask(codes, prefix)
        dt = self._compute_dtype(codes.values)
        w_dec = self._p(self.w_dec, dt)
        y = sparse_decode_single(
            codes.values.astype(dt), codes.indices, w_dec, slot_groups=codes.groups
        )
        return self._add_skip(y + self._p(self.b_dec, dt), x)

    def _add_skip(self, y: jax.Array, x: jax.Array | None) -> jax.Array:
        if self.w_skip is None:
            return y
        if x is None:
            raise ValueError("a skip-transcoder's decode needs the input x for the skip term")
        self._check_x(x)
        dt = jnp.result_type(y.dtype, x.dtype)
        return y.astype(dt) + x.astype(dt) @ self._p(self.w_skip, dt)

    # ---- folds ------------------------------------------------------------------------------

    def fold_input_scale(self, s_in, s_out=None) -> SingleLayerDictionary:
        """Fold training normalisation into the weights; returns a new dictionary.

        Trained on `x / s_in` with targets `y / s_out` (s_out defaults to s_in), the new
        dictionary maps raw x to raw y: `new(x) == s_out * old(x / s_in)`. Pre-activations
        (hence codes, thresholds and b_enc) are unchanged: w_enc /= s_in, b_pre *= s_in,
        w_dec *= s_out, b_dec *= s_out, w_skip *= s_out / s_in. Scales are scalars.
        """
        s_in = jnp.asarray(s_in, jnp.float32)
        s_out = s_in if s_out is None else jnp.asarray(s_out, jnp.float32)
        if s_in.ndim or s_out.ndim:
            raise ValueError("single-layer dictionaries take scalar s_in / s_out")
        a = {n: v.astype(jnp.float32) for n, v in self.arrays().items()}
        a["w_enc"] = a["w_enc"] / s_in
        a["b_pre"] = a["b_pre"] * s_in
        a["w_dec"] = a["w_dec"] * s_out
        a["b_dec"] = a["b_dec"] * s_out
        if "w_skip" in a:
            a["w_skip"] = a["w_skip"] * (s_out / s_in)
        return type(self).from_arrays(self.cfg, a)

    def fold_pre_encoder_bias(self) -> SingleLayerDictionary:
        """`b_enc -= b_pre @ w_enc`, `b_pre = 0`; returns a new dictionary, same outputs."""
        a = {n: v.astype(jnp.float32) for n, v in self.arrays().items()}
        a["b_enc"] = a["b_enc"] - jnp.matmul(a["b_pre"], a["w_enc"], precision="highest")
        a["b_pre"] = jnp.zeros_like(a["b_pre"])
        return type(self).from_arrays(self.cfg, a)
