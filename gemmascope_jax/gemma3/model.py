"""Gemma 3 text model in Flax NNX, numerically matching transformers' `Gemma3ForCausalLM`.

The forward captures and patches named activation sites (see `sites.py`):

    out = model(tokens, capture=("resid_post.9", "mlp_in.5"))
    out.logits, out.sites["resid_post.9"]
    model(tokens, interventions={"resid_post.9": lambda x: x + delta})

Module and parameter names mirror the transformers module tree (`layers[i].self_attn.q_proj`)
so that weight names map one-to-one; projection kernels are stored `[in, out]` (transposed
from torch). Every parameter carries logical axis names for `gemmascope_jax.sharding`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gemmascope_jax.gemma3.config import Gemma3Config
from gemmascope_jax.gemma3.layers import (
    Linear,
    RMSNorm,
    apply_rope,
    attention_masks,
    matmul,
    rope_tables,
    weight,
)
from gemmascope_jax.gemma3.sites import Site, resolve_site

Intervention = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class Gemma3Output:
    """Forward result: `logits` [batch, seq, vocab] (None when not requested) and the captured
    sites, keyed by the names the caller used."""

    logits: jax.Array | None
    sites: dict[str, jax.Array]


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma3Config, layer: int, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.layer = cfg, layer
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("q_heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)

    def __call__(self, x, rope: tuple[jax.Array, jax.Array], mask: jax.Array, hook) -> jax.Array:
        """x [batch, seq, d_model] -> o_proj output [batch, seq, d_model].

        rope: (cos, sin) [batch, seq, head_dim]; mask: bool [batch, 1, 1, q, k].
        """
        q_btkgh, k_bskh, v_bskh = self.project(x, rope)
        return self.attend(q_btkgh, k_bskh, v_bskh, mask, hook)

    def project(self, x, rope: tuple[jax.Array, jax.Array]):
        """x [batch, t, d_model] -> q [batch, t, kv_heads, q_per_kv, head_dim] and k, v
        [batch, t, kv_heads, head_dim], q and k normed and rotated."""
        cfg = self.cfg
        b, t, _ = x.shape
        kv, g, hd = cfg.num_kv_heads, cfg.queries_per_kv, cfg.head_dim
        q_btkgh = self.q_norm(self.q_proj(x).reshape(b, t, kv, g, hd))
        k_bskh = self.k_norm(self.k_proj(x).reshape(b, t, kv, hd))
        v_bskh = self.v_proj(x).reshape(b, t, kv, hd)
        cos, sin = rope
        q_btkgh = apply_rope(q_btkgh, cos[:, :, None, None], sin[:, :, None, None])
        k_bskh = apply_rope(k_bskh, cos[:, :, None], sin[:, :, None])
        return q_btkgh, k_bskh, v_bskh

    def attend(self, q_btkgh, k_bskh, v_bskh, mask: jax.Array, hook) -> jax.Array:
        """Queries [batch, t, kv, g, hd] over keys/values [batch, s, kv, hd] (s = t in the
        forward, the cache length when decoding) -> o_proj output [batch, t, d_model].

        mask: bool [batch, 1, 1, t, s].
        """
        cfg = self.cfg
        b, t = q_btkgh.shape[:2]
        s, dtype = k_bskh.shape[1], v_bskh.dtype
        wide = jnp.promote_types(dtype, jnp.float32)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh)
        # Scale in float32 then round, as torch does for `bf16_tensor * python_float`.
        scores = (scores.astype(wide) * cfg.query_pre_attn_scalar**-0.5).astype(dtype)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(wide), axis=-1).astype(dtype)
        probs = hook("attn_pattern", probs.reshape(b, cfg.num_heads, t, s)).reshape(probs.shape)
        z = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh).reshape(
            b, t, cfg.num_heads * cfg.head_dim
        )
        return self.o_proj(hook("attn_z", z))


class MLP(nnx.Module):
    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, hook) -> jax.Array:
        gate = self.gate_proj(x)
        # tanh-GELU evaluated in float32 and rounded once, like torch's bf16 kernel.
        act = jax.nn.gelu(gate.astype(jnp.promote_types(gate.dtype, jnp.float32)), approximate=True)
        hidden = act.astype(x.dtype) * self.up_proj(x)
        return self.down_proj(hook("mlp_hidden", hidden))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3Config, layer: int, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, **kw)
        self.self_attn = Attention(cfg, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, **kw)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(d, eps, **kw)

    def __call__(self, h, rope, mask, hook) -> jax.Array:
        return self.forward_with(
            h, functools.partial(self.self_attn, rope=rope, mask=mask, hook=hook), hook
        )

    def forward_with(self, h, attention: Callable[[jax.Array], jax.Array], hook) -> jax.Array:
        """The block around `attention` (attn_in [batch, t, d_model] -> o_proj output), which
        the KV-cache decoder replaces by cached attention."""
        h = hook("resid_pre", h)
        attn = attention(hook("attn_in", self.input_layernorm(h)))
        attn = hook("attn_out", self.post_attention_layernorm(hook("attn_proj", attn)))
        h = hook("resid_mid", h + attn)
        mlp = self.mlp(hook("mlp_in", self.pre_feedforward_layernorm(h)), hook)
        mlp = hook("mlp_out", self.post_feedforward_layernorm(hook("mlp_proj", mlp)))
        return hook("resid_post", h + mlp)


class Gemma3(nnx.Module):
    """Gemma 3 text model with a tied unembedding."""

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.embed_tokens = weight(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype, 0.02
        )
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )

    # ---- pieces, public because analysis code composes them ----------------------------------

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, seq] -> scaled embeddings [batch, seq, d_model], activation dtype."""
        table = self.embed_tokens[...]
        scale = jnp.asarray(self.cfg.embed_scale, table.dtype)
        return (jnp.take(table, tokens, axis=0) * scale).astype(self.cfg.dtype)

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden [..., d_model] -> logits [..., vocab] (tied embedding, no scale)."""
        return matmul(h, self.embed_tokens[...].astype(h.dtype).T)

    # ---- forward ------------------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        capture: Iterable[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
        logits: bool = True,
    ) -> Gemma3Output:
        """Run the model on tokens [batch, seq].

        attention_mask: [batch, seq], 1 for real tokens, 0 for padding (left or right).
        positions: [batch, seq] RoPE positions; by default `cumsum(mask) - 1`, so a left-padded
            row sees the same positions as the unpadded sequence (arange(seq) without a mask).
        capture: site names (ours, GS2/transformers hook strings, TL/SAELens hooks) whose
            values are returned in `out.sites`, keyed by the given names. A site's captured
            value is the one after any intervention at that site.
        interventions: site name -> function replacing the activation (same shape); works
            under `jax.jit` and `jax.grad` (differentiate through it to get site gradients).
        logits: compute the unembedding. With `logits=False` the forward stops after the
            deepest layer that a captured site needs and skips the final norm and the
            unembedding (unless `final_norm`/`logits` are captured), which is what activation
            collection wants.
        """
        cfg = self.cfg
        hook = SiteHooks(cfg.num_layers, capture, interventions or {})
        tokens = jnp.asarray(tokens)
        b, t = tokens.shape
        if attention_mask is None:
            valid = jnp.ones((b, t), bool)
            default_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        else:
            valid = jnp.asarray(attention_mask).astype(bool)
            default_pos = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
        positions = default_pos if positions is None else jnp.asarray(positions)

        need_head = logits or hook.needs_global()
        last_layer = cfg.num_layers - 1 if need_head else hook.deepest_layer()
        masks = attention_masks(valid, cfg.sliding_window)
        ropes = {
            sliding: rope_tables(positions, cfg.head_dim, *self.rope_params(sliding), cfg.dtype)
            for sliding in (True, False)
        }

        h = self.embed(tokens)
        for i in range(last_layer + 1):
            sliding = cfg.is_sliding(i)
            h = self.layers[i](h, ropes[sliding], masks[sliding], hook.at_layer(i))
        out_logits = None
        if need_head:
            h = hook.apply(Site("final_norm"), self.norm(h))
            if logits or Site("logits") in hook.wanted:
                out_logits = hook.apply(Site("logits"), self.unembed(h))
        return Gemma3Output(logits=out_logits if logits else None, sites=hook.results())

    def rope_params(self, sliding: bool) -> tuple[float, float]:
        """RoPE (base, scaling) of sliding (local) or full (global) attention layers."""
        if sliding:
            return self.cfg.rope_local_base, 1.0
        return self.cfg.rope_global_base, self.cfg.rope_global_scaling

    def jitted(
        self,
        *,
        capture: Iterable[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
        logits: bool = True,
    ) -> Callable[..., Gemma3Output]:
        """A jitted forward `f(tokens, attention_mask=None, positions=None)` for fixed sites and
        interventions. Parameters are passed as arguments (not baked in as constants) and read
        at every call, so later parameter updates are seen; compiles once per input shape."""
        graphdef = nnx.graphdef(self)
        capture = tuple(capture)
        for name in (*capture, *(interventions or {})):
            resolve_site(name, self.cfg.num_layers)

        @jax.jit
        def run(state, tokens, attention_mask, positions):
            model = nnx.merge(graphdef, state)
            return model(
                tokens,
                attention_mask=attention_mask,
                positions=positions,
                capture=capture,
                interventions=interventions,
                logits=logits,
            )

        def forward(tokens, attention_mask=None, positions=None) -> Gemma3Output:
            return run(nnx.state(self), tokens, attention_mask, positions)

        return forward


class SiteHooks:
    """Applies interventions and records captures as the forward passes each site."""

    def __init__(self, num_layers: int, capture: Iterable[str], interventions: Mapping):
        self.num_layers = num_layers
        self.wanted: dict[Site, list[str]] = {}
        for name in capture:
            self.wanted.setdefault(resolve_site(name, num_layers), []).append(name)
        self.interventions: dict[Site, Intervention] = {}
        for name, fn in interventions.items():
            site = resolve_site(name, num_layers)
            if site in self.interventions:
                raise ValueError(f"two interventions name the same site {site.name} ({name!r})")
            if not callable(fn):
                raise TypeError(f"intervention at {name!r} must be callable, got {fn!r}")
            self.interventions[site] = fn
        self.values: dict[Site, jax.Array] = {}

    def needs_global(self) -> bool:
        return any(site.layer is None for site in self.wanted)

    def deepest_layer(self) -> int:
        layers = [site.layer for site in self.wanted if site.layer is not None]
        return max(layers, default=-1)

    def at_layer(self, layer: int):
        return functools.partial(self._layer_hook, layer)

    def _layer_hook(self, layer: int, kind: str, x: jax.Array) -> jax.Array:
        return self.apply(Site(kind, layer), x)

    def apply(self, site: Site, x: jax.Array) -> jax.Array:
        if site in self.interventions:
            new = jnp.asarray(self.interventions[site](x))
            if new.shape != x.shape:
                raise ValueError(
                    f"intervention at {site.name} returned shape {new.shape}, expected {x.shape}"
                )
            x = new.astype(x.dtype)
        if site in self.wanted:
            self.values[site] = x
        return x

    def results(self) -> dict[str, jax.Array]:
        return {name: self.values[site] for site, names in self.wanted.items() for name in names}
