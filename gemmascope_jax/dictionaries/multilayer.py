"""`MultiLayerDictionary`: cross-layer transcoder (CLT) and weakly causal crosscoder.

Both read L source layers and write to the same L layers causally: latents of source layer
l decode to layers l' >= l only (docs/formats.md, TR §2.6). A CLT reads `mlp_in.l` and
predicts `mlp_out.l'` for all model layers; a crosscoder reads and predicts one site (e.g.
`resid_post`) at a subset of layers (e.g. 7, 13, 17, 22).

Parameters (F = width per layer, D_in/D_out = d_in/d_out):

| name          | shape             | logical axes               |
|---------------|-------------------|----------------------------|
| `w_enc`       | [L, D_in, F]      | (layers, embed, latents)   |
| `b_enc`       | [L, F]            | (layers, latents)          |
| `threshold`   | [L, F]            | (layers, latents)          |  `jumprelu` only
| `w_dec[l]`    | [F, L - l, D_out] | (latents, layers, embed)   |  l = 0..L-1, an nnx.List
| `b_dec`       | [L, D_out]        | (layers, embed)            |  bias of *output* layer l
| `w_skip`      | [L, D_in, D_out]  | (layers, embed, embed)     |  `cfg.skip` only, same layer
| `b_pre`       | [L, D_in]         | (layers, embed)            |

Only the causal decoder blocks are stored: `w_dec[l][:, j, :]` maps source layer l to
output layer l + j, so there are L(L+1)/2 blocks of F x D_out, never a dense
[L, F, L, D] array (GS2 files hold `w_dec` [F, L, D] per source layer, zeros upstream;
`full_decoder(l)` rebuilds that, converters slice `[:, l:, :]`). In nnx state and
`arrays()` the blocks are `w_dec.0`, ..., `w_dec.{L-1}`.

Forward, inputs x [..., L, D_in], codes [..., L, F], predictions [..., L, D_out]:

    f[l]     = act((x[l] - b_pre[l]) @ w_enc[l] + b_enc[l])
    y[l_out] = Σ_{l_in <= l_out} f[l_in] @ w_dec[l_in][:, l_out - l_in, :] + b_dec[l_out]
               (+ x[l_out] @ w_skip[l_out])

The cost is L(L+1)/2 (F x D) matmuls per token for dense codes; `decode_sparse` gathers K
rows per source layer instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemmascope_jax.dictionaries.base import Dictionary, ParamSpecs
from gemmascope_jax.dictionaries.config import MULTI_LAYER_KINDS, DictionaryConfig
from gemmascope_jax.dictionaries.single import GS2_INIT_THRESHOLD, check_prefix, unit_rows
from gemmascope_jax.dictionaries.sparse import SparseCodes, prefix_mask
from pallas_kernels import sparse_decode

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("prefix",))
def causal_decode(codes: jax.Array, blocks: tuple[jax.Array, ...], prefix: int | None = None):
    """`y[l'] = Σ_{l <= l'} codes[l, :n] @ blocks[l][:n, l' - l]` without bias or skip.

    codes [..., L, F]; blocks[l] [F, L - l, D] -> [..., L, D]. Jitted so that eager calls
    compile once per shape instead of once per op.
    """
    n_layers = len(blocks)
    n = codes.shape[-1] if prefix is None else prefix
    y = jnp.zeros((*codes.shape[:-2], n_layers, blocks[0].shape[-1]), codes.dtype)
    for layer, block in enumerate(blocks):
        part = jnp.einsum("...f,fjd->...jd", codes[..., layer, :n], block[:n])
        y = y.at[..., layer:, :].add(part)
    return y


@functools.partial(jax.jit, static_argnames="slot_groups")
def causal_decode_sparse(
    values: jax.Array, indices: jax.Array, blocks: tuple[jax.Array, ...], slot_groups: int = 1
):
    """Sparse `causal_decode`: values/indices [..., L, K] (indices local to each layer's F)
    -> [..., L, D]; `pallas_kernels.sparse_decode` (XLA on CPU, Pallas on TPU / GPU), whose
    cost is linear in K, not F. `slot_groups`: `SparseCodes.groups`."""
    return sparse_decode(values, indices, blocks, slot_groups=slot_groups)


class MultiLayerDictionary(Dictionary):
    """Cross-layer transcoder (`clt`) or weakly causal crosscoder (`crosscoder`)."""

    KIND_NAMES = MULTI_LAYER_KINDS

    @classmethod
    def param_specs(cls, cfg: DictionaryConfig) -> ParamSpecs:
        n, f, di, do = cfg.num_layers, cfg.width, cfg.d_in, cfg.d_out
        specs: ParamSpecs = {
            "w_enc": ((n, di, f), ("layers", "embed", "latents")),
            "b_enc": ((n, f), ("layers", "latents")),
        }
        if cfg.architecture == "jumprelu":
            specs["threshold"] = ((n, f), ("layers", "latents"))
        for layer in range(n):
            specs[f"w_dec.{layer}"] = ((f, n - layer, do), ("latents", "layers", "embed"))
        specs["b_dec"] = ((n, do), ("layers", "embed"))
        if cfg.skip:
            specs["w_skip"] = ((n, di, do), ("layers", "embed", "embed"))
        specs["b_pre"] = ((n, di), ("layers", "embed"))
        return specs

    @classmethod
    def init_arrays(cls, cfg: DictionaryConfig, key: jax.Array) -> dict[str, jax.Array]:
        """GS2-style init generalised to L layers: each latent's decoder vector (all its
        output layers together) is He-uniform with unit norm; its encoder column is the
        same-layer decoder block transposed, renormalised to unit norm (independent when
        d_in != d_out). GS2 itself initialises multi-layer models from single-layer SAEs."""
        # Two random draws in all (fast to compile), sliced along axes that keep the latent
        # axis whole so that sharded init stays sharded.
        he = jax.nn.initializers.he_uniform()
        n, f = cfg.num_layers, cfg.width
        k_dec, k_enc = jax.random.split(key)
        dec = he(k_dec, (f, n * (n + 1) // 2, cfg.d_out), jnp.float32)
        if cfg.d_in != cfg.d_out:
            enc_all = unit_rows(he(k_enc, (n, cfg.d_in, f), jnp.float32), axes=(-2,))
        out, enc, start = {}, [], 0
        for layer in range(n):
            w = unit_rows(dec[:, start : start + n - layer], axes=(-2, -1))
            out[f"w_dec.{layer}"], start = w, start + n - layer
            if cfg.d_in == cfg.d_out:
                enc.append(unit_rows(w[:, 0, :].T, axes=(0,)))
            else:
                enc.append(enc_all[layer])
        out["w_enc"] = jnp.stack(enc)
        if cfg.architecture == "jumprelu":
            out["threshold"] = jnp.full((n, f), GS2_INIT_THRESHOLD, jnp.float32)
        specs = cls.param_specs(cfg)
        return {k: out.get(k, jnp.zeros(s, jnp.float32)) for k, (s, _) in specs.items()}

    # ---- forward ----------------------------------------------------------------------------

    def _check_x(self, x: jax.Array) -> None:
        n, d = self.cfg.num_layers, self.cfg.d_in
        if x.ndim < 2 or x.shape[-2:] != (n, d):
            raise ValueError(f"expected inputs [..., {n}, {d}] (layers, d_in), got {x.shape}")

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """x [..., L, D_in] -> [..., L, F], each layer with its own encoder."""
        self._check_x(x)
        dt = self._compute_dtype(x)
        x = x.astype(dt) - self._p(self.b_pre, dt)
        return jnp.einsum("...li,lif->...lf", x, self._p(self.w_enc, dt)) + self._p(self.b_enc, dt)

    def decode(self, codes: jax.Array, x: jax.Array | None = None, prefix: int | None = None):
        """Causal decode: codes [..., L, F] -> [..., L, D_out] (formula in the module doc).

        `prefix=n` uses only the first n latents of every source layer; `x` [..., L, D_in]
        is needed (only) for the skip term.
        """
        n_layers, width = self.cfg.num_layers, self.cfg.width
        if codes.ndim < 2 or codes.shape[-2:] != (n_layers, width):
            raise ValueError(f"expected codes [..., {n_layers}, {width}], got {codes.shape}")
        check_prefix(prefix, width)
        dt = self._compute_dtype(codes)
        blocks = tuple(self._p(w, dt) for w in self.w_dec)
        y = causal_decode(codes.astype(dt), blocks, prefix)
        return self._add_skip(y + self._p(self.b_dec, dt), x)

    def decode_sparse(
        self, codes: SparseCodes, x: jax.Array | None = None, prefix: int | None = None
    ):
        """Gather-and-sum decode of `SparseCodes` [..., L, K]; equals `decode` of the dense
        codes. Each source layer gathers K rows of its [F, L - l, D_out] block."""
        n_layers = self.cfg.num_layers
        if codes.values.ndim < 2 or codes.values.shape[-2] != n_layers:
            raise ValueError(
                f"expected sparse codes [..., {n_layers}, K], got {codes.values.shape}"
            )
        check_prefix(prefix, self.cfg.width)
        codes = prefix_mask(codes, prefix)
        dt = self._compute_dtype(codes.values)
        blocks = tuple(self._p(w, dt) for w in self.w_dec)
        y = causal_decode_sparse(codes.values.astype(dt), codes.indices, blocks, codes.groups)
        return self._add_skip(y + self._p(self.b_dec, dt), x)

    def _add_skip(self, y: jax.Array, x: jax.Array | None) -> jax.Array:
        if self.w_skip is None:
            return y
        if x is None:
            raise ValueError(f"this {self.cfg.kind}'s decode needs the input x for the skip term")
        self._check_x(x)
        dt = jnp.result_type(y.dtype, x.dtype)
        return y.astype(dt) + jnp.einsum("...li,lio->...lo", x.astype(dt), self._p(self.w_skip, dt))

    def full_decoder(self, source_layer: int) -> jax.Array:
        """Source layer l's decoder to every layer, [F, L, D_out], zeros for outputs < l
        (the GS2 `params_layer_{l}.safetensors` `w_dec` layout)."""
        block = self.w_dec[source_layer][...]
        return jnp.pad(block, ((0, 0), (source_layer, 0), (0, 0)))

    # ---- folds ------------------------------------------------------------------------------

    def fold_input_scale(self, s_in, s_out=None) -> MultiLayerDictionary:
        """Fold per-layer training normalisation; returns a new dictionary.

        Trained on `x[l] / s_in[l]` with targets `y[l] / s_out[l]` (scalars or [L]; s_out
        defaults to s_in): `new(x)[l] == s_out[l] * old(x / s_in)[l]`. w_enc[l] /= s_in[l],
        b_pre[l] *= s_in[l], w_dec[l][:, j] *= s_out[l + j], b_dec[l] *= s_out[l],
        w_skip[l] *= s_out[l] / s_in[l]; thresholds and b_enc unchanged.
        """
        n = self.cfg.num_layers
        s_in = jnp.broadcast_to(jnp.asarray(s_in, jnp.float32), (n,))
        s_out = s_in if s_out is None else jnp.broadcast_to(jnp.asarray(s_out, jnp.float32), (n,))
        a = {k: v.astype(jnp.float32) for k, v in self.arrays().items()}
        a["w_enc"] = a["w_enc"] / s_in[:, None, None]
        a["b_pre"] = a["b_pre"] * s_in[:, None]
        for layer in range(n):
            a[f"w_dec.{layer}"] = a[f"w_dec.{layer}"] * s_out[layer:][None, :, None]
        a["b_dec"] = a["b_dec"] * s_out[:, None]
        if "w_skip" in a:
            a["w_skip"] = a["w_skip"] * (s_out / s_in)[:, None, None]
        return type(self).from_arrays(self.cfg, a)

    def fold_pre_encoder_bias(self) -> MultiLayerDictionary:
        """`b_enc[l] -= b_pre[l] @ w_enc[l]`, `b_pre = 0`; returns a new dictionary."""
        a = {k: v.astype(jnp.float32) for k, v in self.arrays().items()}
        shift = jnp.einsum("li,lif->lf", a["b_pre"], a["w_enc"], precision=_HIGHEST)
        a["b_enc"] = a["b_enc"] - shift
        a["b_pre"] = jnp.zeros_like(a["b_pre"])
        return type(self).from_arrays(self.cfg, a)
