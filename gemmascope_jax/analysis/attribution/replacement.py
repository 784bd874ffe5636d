"""The frozen local replacement model of one prompt, and interventions on it.

    rep = ReplacementModel.build(model, transcoders, tokens)   # PLT set or CLT
    logits = intervene(rep, [(3, 5, 17, 0.0)], how="frozen")

As circuit-tracer 0.5.0 (`attribution/attribute.py`): every MLP output `mlp_out.l` is the
transcoder (or CLT) reconstruction plus a frozen error; attention probabilities and every
RMSNorm's `1/rms` (input, post-attention, pre- and post-feedforward, final; q/k norms only
feed the frozen probabilities) are frozen at their values on the prompt. The residual stream
is then linear in the node contributions: scaled token embeddings, `a_f * decoder_f`, errors
and (skip-transcoders) the skip path `mlp_in.l @ w_skip`, which stays live as in
circuit-tracer's `configure_skip_connection`. Features at `zero_positions` (BOS, as
circuit-tracer) are zeroed and their errors too; their MLP outputs are constants.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.dictionaries import MultiLayerDictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrozenState:
    """Per-layer frozen quantities of one prompt (float32), stacked over layers L.

    gain_*: `1 + w` of each norm [L, d]; scale_*: frozen `1/rms` [L, T]; w_v [L, d, KV*hd];
    w_o [L, H*hd, d]; probs [L, H, T, T]; w_skip [L, d, d] (zeros without skip);
    final_gain [d], final_scale [T].
    """

    gain_in: jax.Array
    scale_in: jax.Array
    w_v: jax.Array
    probs: jax.Array
    w_o: jax.Array
    gain_pa: jax.Array
    scale_pa: jax.Array
    gain_pf: jax.Array
    scale_pf: jax.Array
    w_skip: jax.Array
    final_gain: jax.Array
    final_scale: jax.Array


def linear_forward(state: FrozenState, embed: jax.Array, mlp_add: jax.Array, num_kv: int):
    """The frozen replacement model, linear in its inputs.

    embed [T, d] (scaled embeddings), mlp_add [L, T, d] (what each MLP adds besides its live
    skip term) -> (mlp_in [L, T, d] (transcoder inputs), final [T, d] (final-norm output)).
    """

    def layer(h, xs):
        gain_in, s_in, w_v, probs, w_o, gain_pa, s_pa, gain_pf, s_pf, w_skip, add = xs
        t, n_heads = h.shape[0], probs.shape[0]
        v = ((h * s_in[:, None] * gain_in) @ w_v).reshape(t, num_kv, -1)
        probs = probs.reshape(num_kv, n_heads // num_kv, t, t)
        z = jnp.einsum("kgts,skh->tkgh", probs, v, precision=_HIGHEST).reshape(t, -1)
        h = h + (z @ w_o) * s_pa[:, None] * gain_pa
        mlp_in = h * s_pf[:, None] * gain_pf
        return h + mlp_in @ w_skip + add, mlp_in

    s = state
    xs = (s.gain_in, s.scale_in, s.w_v, s.probs, s.w_o, s.gain_pa, s.scale_pa, s.gain_pf)
    xs = (*xs, s.scale_pf, s.w_skip, mlp_add)
    with jax.default_matmul_precision("highest"):
        h, mlp_in = jax.lax.scan(layer, embed, xs)
    return mlp_in, h * s.final_scale[:, None] * s.final_gain


def _rms_scale(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)


@dataclasses.dataclass
class ReplacementModel:
    """The frozen local replacement model of one prompt, and what attribution needs of it.

    tokens [T]; mlp_in, mlp_out, errors [L, T, d]; embed [T, d]; mlp_add [L, T, d] (the MLP
    output minus its skip term: the constant that reproduces the real forward);
    codes[l] [T, F_l] activations of source layer l (zeroed at `zero_positions`);
    logits [T, vocab] of the real model.
    """

    model: Any
    transcoders: TranscoderSet | MultiLayerDictionary
    tokens: np.ndarray
    state: FrozenState
    embed: jax.Array
    mlp_in: jax.Array
    mlp_out: jax.Array
    mlp_add: jax.Array
    errors: jax.Array
    codes: list[np.ndarray]
    logits: np.ndarray
    zero_positions: tuple[int, ...]

    @classmethod
    def build(cls, model, transcoders, tokens, zero_positions: Sequence[int] | None = None):
        """Run `model` on `tokens` [T] (BOS first) and freeze it around `transcoders`.

        zero_positions: positions whose features and errors are dropped (constants);
            default (0,) or, for `-it` models, (0, 1, 2, 3) (`<bos><start_of_turn>user\\n`),
            as circuit-tracer.
        """
        cfg = model.cfg
        check_transcoders(cfg, transcoders)
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size < 1 or tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"tokens must be ids in 0..{cfg.vocab_size - 1}, got {tokens}")
        if zero_positions is None:
            it = (cfg.name or "").endswith("-it")
            zero_positions = (0, 1, 2, 3) if it else (0,)
        zero = tuple(int(p) for p in zero_positions if int(p) < tokens.size)
        n = cfg.num_layers
        kinds = ("resid_pre", "attn_proj", "resid_mid", "attn_pattern", "mlp_in", "mlp_out")
        capture = [f"{k}.{i}" for i in range(n) for k in kinds] + [f"resid_post.{n - 1}"]
        out = _capture_forward(model, tuple(capture))(jnp.asarray(tokens)[None])
        site = lambda k: jnp.stack([out.sites[f"{k}.{i}"][0] for i in range(n)]).astype(jnp.float32)
        layers, eps = model.layers, cfg.rms_norm_eps
        gain = lambda get: jnp.stack([1.0 + get(m).weight[...] for m in layers]).astype(jnp.float32)
        kernel = lambda get: jnp.stack([get(m).kernel[...] for m in layers]).astype(jnp.float32)
        mlp_in, mlp_out = site("mlp_in"), site("mlp_out")
        skip = _skip_weights(transcoders, n, cfg.hidden_size)
        state = FrozenState(
            gain_in=gain(lambda m: m.input_layernorm),
            scale_in=_rms_scale(site("resid_pre"), eps),
            w_v=kernel(lambda m: m.self_attn.v_proj),
            probs=site("attn_pattern"),
            w_o=kernel(lambda m: m.self_attn.o_proj),
            gain_pa=gain(lambda m: m.post_attention_layernorm),
            scale_pa=_rms_scale(site("attn_proj"), eps),
            gain_pf=gain(lambda m: m.pre_feedforward_layernorm),
            scale_pf=_rms_scale(site("resid_mid"), eps),
            w_skip=skip,
            final_gain=(1.0 + model.norm.weight[...]).astype(jnp.float32),
            final_scale=_rms_scale(out.sites[f"resid_post.{n - 1}"][0], eps),
        )
        codes, recon = _encode_decode(transcoders, mlp_in, zero)
        errors = (mlp_out - recon).at[:, np.asarray(zero, np.int32)].set(0.0)
        embed = model.embed(jnp.asarray(tokens)[None])[0].astype(jnp.float32)
        mlp_add = mlp_out - jnp.einsum("ltd,lde->lte", mlp_in, skip, precision=_HIGHEST)
        logits = np.asarray(out.logits[0], np.float32)
        return cls(model, transcoders, tokens, state, embed, mlp_in, mlp_out, mlp_add, errors,
                   codes, logits, zero)  # fmt: skip

    # ---- dictionary access ----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.codes)

    def encoder_vectors(self, layer: int, latents: np.ndarray) -> jax.Array:
        """Encoder columns [n, d] of `latents` of source layer `layer`."""
        return _encoder(self.transcoders, layer)[:, latents].T.astype(jnp.float32)

    def decoder_block(self, layer: int) -> jax.Array:
        """Decoder of source layer `layer` to the layers it writes: [F, J, d] (J = 1 for a
        per-layer transcoder, L - layer for a CLT)."""
        t = self.transcoders
        if isinstance(t, TranscoderSet):
            return t[layer].w_dec[...].astype(jnp.float32)[:, None, :]
        return t.w_dec[layer][...].astype(jnp.float32)

    def pre_activation_bias(self, layer: int, latents: np.ndarray) -> np.ndarray:
        """Constant part of the pre-activations: `b_enc - b_pre @ w_enc`, [n]."""
        t = self.transcoders
        d = t[layer] if isinstance(t, TranscoderSet) else None
        b_enc = d.b_enc[...] if d is not None else t.b_enc[...][layer]
        b_pre = d.b_pre[...] if d is not None else t.b_pre[...][layer]
        w_enc = _encoder(t, layer)
        return np.asarray(b_enc - b_pre @ w_enc, np.float32)[latents]

    def frozen_forward(self, mlp_add: jax.Array | None = None, embed: jax.Array | None = None):
        """The frozen model on (embed, mlp_add) (defaults: this prompt's) -> (mlp_in, final)."""
        mlp_add = self.mlp_add if mlp_add is None else mlp_add
        embed = self.embed if embed is None else embed
        return _linear_forward_jit(self.state, embed, mlp_add, self.model.cfg.num_kv_heads)

    def unembed(self, final: jax.Array) -> jax.Array:
        """Final-norm output [..., d] -> logits [..., vocab] (float32)."""
        table = self.model.embed_tokens[...].astype(jnp.float32)
        return jnp.matmul(final, table.T, precision=_HIGHEST)


_linear_forward_jit = jax.jit(linear_forward, static_argnums=3)
_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _capture_forward(model, capture: tuple[str, ...]):
    """`model.jitted(capture=capture)`, compiled once per model (not once per prompt)."""
    per_model = _FORWARDS.setdefault(model, {})
    if capture not in per_model:
        per_model[capture] = model.jitted(capture=capture)
    return per_model[capture]


def _encoder(t, layer: int) -> jax.Array:
    if isinstance(t, TranscoderSet):
        return t[layer].w_enc[...].astype(jnp.float32)
    return t.w_enc[...][layer].astype(jnp.float32)


def _skip_weights(t, n_layers: int, d: int) -> jax.Array:
    if isinstance(t, TranscoderSet):
        mats = [m.w_skip[...] if m.w_skip is not None else jnp.zeros((d, d)) for m in t]
        return jnp.stack(mats).astype(jnp.float32)
    if t.w_skip is None:
        return jnp.zeros((n_layers, d, d), jnp.float32)
    return t.w_skip[...].astype(jnp.float32)


def _encode_decode(t, mlp_in: jax.Array, zero: tuple[int, ...]):
    """Codes per source layer (numpy [T, F], zeroed at `zero`) and the reconstruction
    [L, T, d] of every output layer from those codes (skip included)."""
    if isinstance(t, TranscoderSet):
        codes, recon = [], []
        for layer, member in enumerate(t):
            c = (
                member.encode(mlp_in[layer])
                .astype(jnp.float32)
                .at[np.asarray(zero, np.int32)]
                .set(0.0)
            )
            codes.append(np.asarray(c))
            recon.append(member.decode(c, mlp_in[layer]).astype(jnp.float32))
        return codes, jnp.stack(recon)
    x = jnp.swapaxes(mlp_in, 0, 1)  # [T, L, d]
    c = t.encode(x).astype(jnp.float32).at[np.asarray(zero, np.int32)].set(0.0)
    recon = jnp.swapaxes(t.decode(c, x).astype(jnp.float32), 0, 1)
    return [np.asarray(c[:, layer]) for layer in range(c.shape[1])], recon


def check_transcoders(model_cfg, t) -> None:
    """ValueError unless `t` is a PLT set or a CLT reading mlp_in.l -> mlp_out.l for every
    layer of this model, with the model's d_model."""
    n, d = model_cfg.num_layers, model_cfg.hidden_size
    if isinstance(t, TranscoderSet):
        sites, dims = (t.input_site, t.output_site), {(m.cfg.d_in, m.cfg.d_out) for m in t}
        layers = t.num_layers
    elif isinstance(t, MultiLayerDictionary) and t.cfg.kind == "clt":
        sites = (
            {s.kind for s in t.cfg.input_site_objects},
            {s.kind for s in t.cfg.output_site_objects},
        )
        sites = tuple(next(iter(s)) if len(s) == 1 else str(sorted(s)) for s in sites)
        dims, layers = {(t.cfg.d_in, t.cfg.d_out)}, t.cfg.num_layers
        if t.cfg.layers != tuple(range(layers)):
            raise ValueError(f"a CLT for attribution must cover layers 0..L-1, got {t.cfg.layers}")
    else:
        what = getattr(getattr(t, "cfg", None), "kind", type(t).__name__)
        raise ValueError(
            f"attribution needs a TranscoderSet (one transcoder per layer) or a CLT, got a {what}"
        )
    problems = []
    if layers != n:
        problems.append(f"transcoders cover {layers} layers, the model has {n}")
    if dims != {(d, d)}:
        problems.append(
            f"transcoder widths (d_in, d_out) {sorted(dims)}, the model's d_model is {d}"
        )
    if sites != ("mlp_in", "mlp_out"):
        problems.append(
            f"transcoders map {sites[0]} -> {sites[1]}, attribution needs mlp_in -> mlp_out"
        )
    if problems:
        raise ValueError("transcoders do not match the model: " + "; ".join(problems))


# ---- interventions ----------------------------------------------------------------------------


def _decoder_delta(rep: ReplacementModel, interventions, scale: bool) -> jax.Array:
    """[L, T, d]: what setting (or scaling) the given features adds to each MLP output."""
    n, (t, d) = rep.num_layers, rep.embed.shape
    delta = jnp.zeros((n, t, d), jnp.float32)
    for layer, pos, latent, value in interventions:
        layer, pos, latent = int(layer), int(pos), int(latent)
        if not (0 <= layer < n and 0 <= pos < t and 0 <= latent < rep.codes[layer].shape[1]):
            raise ValueError(
                f"intervention ({layer}, {pos}, {latent}) out of range: layers 0..{n - 1}, "
                f"positions 0..{t - 1}, latents 0..{rep.codes[layer % n].shape[1] - 1}"
            )
        old = float(rep.codes[layer][pos, latent])
        change = old * float(value) - old if scale else float(value) - old
        block = rep.decoder_block(layer)[latent]  # [J, d]
        delta = delta.at[layer : layer + block.shape[0], pos].add(change * block)
    return delta


def intervene(target, interventions, *, how: str = "frozen", scale: bool = False) -> np.ndarray:
    """Set (or, with `scale=True`, multiply) feature activations and rerun; -> logits [T, V].

    target: a `ReplacementModel` (or an object with a `.replacement` one).
    interventions: (layer, pos, latent, value) tuples.
    how: `frozen`: the frozen replacement model (attention, norms, other features and errors
        held), so a logit moves by exactly the graph's direct-effect prediction
        `sum_s A[logit, s] / a_s * (new a_s - a_s)` plus the mean logit shift;
        `original`: the real model with the decoder change added to the MLP outputs, all
        effects propagating through attention, norms and MLPs.
    """
    rep = getattr(target, "replacement", target)
    if not isinstance(rep, ReplacementModel):
        raise ValueError(f"intervene needs a ReplacementModel, got {type(target).__name__}")
    delta = _decoder_delta(rep, interventions, scale)
    if how == "frozen":
        _, final = rep.frozen_forward(rep.mlp_add + delta)
        return np.asarray(rep.unembed(final))
    if how == "original":
        fns = {f"mlp_out.{i}": functools.partial(lambda x, i: x + delta[i].astype(x.dtype), i=i)
               for i in range(rep.num_layers)}  # fmt: skip
        out = rep.model(jnp.asarray(rep.tokens)[None], interventions=fns)
        return np.asarray(out.logits[0], np.float32)
    raise ValueError(f"how must be 'frozen' or 'original', got {how!r}")
