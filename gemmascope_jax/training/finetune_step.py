"""The end-to-end KL finetune step (Gemma Scope 2 TR §2.4); the run is `training.finetune`.

    gemmascope-jax finetune CONFIG [key=value ...]     # the run config plus its `finetune:`

After the reconstruction stage, each dictionary is trained further on token batches with

    L = (MSE + α·β·KL(p(x) ‖ p(x̂))) / (1 + β) + sparsity,   α = stop_gradient(MSE / (KL + ε))

    MSE       mean over spliced tokens of ‖y - ŷ‖² (normalised units, as the first stage)
    p(x)      the model's next-token distribution on the clean run
    p(x̂)      the same with the dictionary's prediction spliced in at its output site(s):
              SAE / crosscoder at its site, (skip-)transcoder at mlp_out.l, CLT at every
              mlp_out.l at once (causal: layer l's prediction reads inputs 0..l of the spliced
              run, as `evals.splice`)
    KL        Σ_v p(x)_v (log p(x)_v - log p(x̂)_v), mean over predicted positions t with t
              spliced and t+1 a real token
    sparsity  the first stage's JumpReLU L0 penalty (and frequency penalty, if on) at its full
              coefficient and final L0 target, so L0 holds; TopK keeps its k (no term)
    β, ε      `finetune.beta`, `finetune.kl_eps` (1e-8)

Spliced tokens are the real tokens that are not <bos> (a packed window has a <bos> at the
start of every document; pads come only at the end): the positions the first stage trains on.
Because α is held constant, the loss *value* equals MSE + sparsity; only the gradient mixes
in the KL term, with weight β/(1+β) after rescaling it to the MSE's size.

The step (`FinetuneStep`, a `TrainStep` with the same state, shardings and optimizer) runs
inside one `jax.jit` with explicit shardings: dictionary parameters as in the first stage
(latents over `model`), token rows over `data`, the language model's parameters where
`load_gemma3(mesh=...)` placed them. The model is frozen: its parameters are an argument
under `stop_gradient`, and only the dictionaries' parameters are differentiated. The clean
forward computes the sites, the logits and `resid_pre` of each dictionary's first layer;
each dictionary then runs one spliced forward from there to the logits (`forward_from`: the
layers below the site are not re-run, and nothing there depends on the dictionary).
JumpReLU codes use the first stage's straight-through estimator for θ (in MSE and KL alike),
so θ's gradient is the STE's, the others are exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gemmascope_jax.evals.splice import Splicer, at_least_f32
from gemmascope_jax.training.losses import jumprelu_penalties
from gemmascope_jax.training.step import DictionaryTraining, TrainState, TrainStep

FINETUNE_ARCHITECTURES = ("jumprelu", "topk")


def token_masks(tokens: jax.Array, bos_id: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """(valid [B, T], spliced [B, T]): real tokens, and real tokens that are not <bos>."""
    valid = tokens != pad_id
    return valid, valid & (tokens != bos_id)


def _sq(a: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))


def _expand(w: jax.Array, like: jax.Array) -> jax.Array:
    return w.reshape(w.shape + (1,) * (like.ndim - w.ndim))


def forward_from(model, resid_pre: jax.Array, start: int, valid: jax.Array, interventions):
    """Logits [B, T, V] of `model` run from layer `start`'s input `resid_pre` [B, T, d] (the
    clean run's `resid_pre.{start}`) to the unembedding, with `interventions` at sites of
    layers >= start: the same computation as `model(tokens, attention_mask=valid,
    interventions=...)` without re-running layers 0..start-1."""
    from gemmascope_jax.gemma3.layers import attention_masks, rope_tables
    from gemmascope_jax.gemma3.model import SiteHooks

    cfg = model.cfg
    hook = SiteHooks(cfg.num_layers, (), interventions)
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
    masks = attention_masks(valid, cfg.sliding_window)
    ropes = {
        sliding: rope_tables(positions, cfg.head_dim, *model.rope_params(sliding), cfg.dtype)
        for sliding in (True, False)
    }
    h = resid_pre
    for i in range(start, cfg.num_layers):
        sliding = cfg.is_sliding(i)
        h = model.layers[i](h, ropes[sliding], masks[sliding], hook.at_layer(i))
    return model.unembed(model.norm(h))


class FinetuneStep(TrainStep):
    """Jitted, sharded end-to-end finetune step (module docstring).

    trainings: the dictionaries with their finetune loss / optimizer settings; model: the
    language model (parameters placed on `mesh`, or anywhere: they are then replicated);
    scalars: `{site: normalisation scalar}` of the first stage; beta, kl_eps: β and ε.
    The batch is `{"tokens": int32 [B, T]}` (packed windows, <bos> first), optionally with
    `"loss_mask"` bool [B, T] (`PackedTokens(loss_mask=True)`: a source's `loss_tokens`)."""

    def __init__(
        self,
        trainings: Sequence[DictionaryTraining],
        mesh: Mesh | None,
        model,
        scalars: Mapping[str, float],
        *,
        beta: float = 1.0,
        kl_eps: float = 1e-8,
        bos_id: int = 2,
        pad_id: int = 0,
        donate: bool = True,
    ):
        super().__init__(trainings, mesh, donate=donate)
        for t in self.trainings:
            if t.cfg.architecture not in FINETUNE_ARCHITECTURES:
                raise ValueError(
                    f"{t.label}: end-to-end finetuning supports {FINETUNE_ARCHITECTURES}, not "
                    f"{t.cfg.architecture!r} (finetune the exported JumpReLU conversion)"
                )
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.kl_eps = float(beta), float(kl_eps)
        self.bos_id, self.pad_id = int(bos_id), int(pad_id)
        self.graphdef, lm_params = nnx.split(model)
        self.num_layers = model.cfg.num_layers
        on_mesh = all(
            isinstance(getattr(a, "sharding", None), NamedSharding)
            and a.sharding.mesh.shape == self.mesh.shape
            for a in jax.tree.leaves(lm_params)
        )
        if not on_mesh:
            lm_params = jax.device_put(lm_params, self._replicated)
        self.lm_params = lm_params
        self.lm_shardings = jax.tree.map(lambda a: a.sharding, lm_params)
        missing = [s for s in self.sites if s not in scalars]
        if missing:
            raise KeyError(f"no normalisation scalar for sites {missing}")
        self.scalars = {s: float(scalars[s]) for s in self.sites}

    # ---- the loss ------------------------------------------------------------------------------

    def _scales(self, t: DictionaryTraining):
        s_in = np.asarray([self.scalars[s] for s in t.cfg.input_sites], np.float32)
        s_out = np.asarray([self.scalars[s] for s in t.cfg.output_sites], np.float32)
        return (s_in, s_out) if t.cfg.multilayer else (s_in[0], s_out[0])

    def _start_layer(self, t: DictionaryTraining) -> int:
        """The first layer whose computation the dictionary's splice can change."""
        from gemmascope_jax.gemma3.sites import resolve_site

        layers = [resolve_site(s, self.num_layers).layer for s in t.cfg.input_sites]
        layers += [resolve_site(s, self.num_layers).layer for s in t.cfg.output_sites]
        if None in layers:
            raise ValueError(f"{t.label}: finetuning splices per-layer sites, not {t.cfg}")
        return min(layers)

    def _codes(self, t: DictionaryTraining, d, x):
        jump = t.cfg.architecture == "jumprelu"
        pre = d.pre_activations(x)
        return pre, d.activate(pre, bandwidth=t.loss.bandwidth if jump else None)

    def losses(
        self, params, tokens: jax.Array, lm_params, step, return_parts=False, loss_mask=None
    ):
        """(total loss, [metrics per dictionary]) for dictionary `params` on `tokens`.

        `loss_mask` [B, T] (a source's `loss_tokens`, e.g. only the responses of chats)
        further restricts the spliced tokens, hence the MSE, the sparsity term and the KL.

        Each metrics dict: `loss`, `e2e_loss` ((MSE + αβKL)/(1+β)), `mse`, `kl`, `alpha`,
        `sparsity_loss`, `l0`, `fire_counts`, `ce_clean`, `ce_spliced`, `delta_loss` (this
        batch). `return_parts` also returns per dictionary the un-stopped (mse, kl) pair."""
        model = nnx.merge(self.graphdef, jax.lax.stop_gradient(lm_params))
        tokens = jnp.asarray(tokens)
        valid, spliced = token_masks(tokens, self.bos_id, self.pad_id)
        if loss_mask is not None:
            spliced = spliced & jnp.asarray(loss_mask, bool)
        b, t_len = tokens.shape
        starts = [self._start_layer(t) for t in self.trainings]
        resid = [f"resid_pre.{i}" for i in sorted(set(starts))]
        clean = model(tokens, attention_mask=valid, capture=(*self.sites, *resid))
        clean_logits = at_least_f32(clean.logits[:, :-1])
        logp_clean = jax.lax.stop_gradient(jax.nn.log_softmax(clean_logits, axis=-1))
        p_clean = jnp.exp(logp_clean)
        kl_mask = (spliced[:, :-1] & valid[:, 1:]).astype(jnp.float32)
        n_kl = jnp.maximum(jnp.sum(kl_mask), 1.0)
        w = spliced.reshape(-1).astype(jnp.float32)
        n_tok = jnp.maximum(jnp.sum(w), 1.0)
        next_tokens = tokens[:, 1:, None]

        def site(name, scale):
            a = at_least_f32(jax.lax.stop_gradient(clean.sites[name]))
            return a.reshape(b * t_len, -1) / scale

        total, metrics, parts = 0.0, [], []
        for i, t in enumerate(self.trainings):
            cfg = t.cfg
            d = t.module(params[i])
            s_in, s_out = self._scales(t)
            if cfg.multilayer:
                x = jnp.stack([site(s, s_in[j]) for j, s in enumerate(cfg.input_sites)], -2)
                y = jnp.stack([site(s, s_out[j]) for j, s in enumerate(cfg.output_sites)], -2)
            else:
                x, y = site(cfg.input_sites[0], s_in), site(cfg.output_sites[0], s_out)
            pre, codes = self._codes(t, d, x)
            y_hat = d.decode(codes, x)
            mse = jnp.sum(w * _sq(y - y_hat)) / n_tok

            if cfg.multilayer:

                def predict(xs, t=t, d=d):
                    return d.decode(self._codes(t, d, xs)[1], xs)

                splicer = Splicer(d, spliced, jnp.asarray(s_in), s_out, forward=predict)
                interventions = splicer.interventions()
            else:
                new = (y_hat * s_out).reshape(b, t_len, -1)

                def put(h, new=new):
                    return jnp.where(spliced[..., None], new.astype(h.dtype), h)

                interventions = {cfg.output_sites[0]: put}
            start = starts[i]
            h0 = jax.lax.stop_gradient(clean.sites[f"resid_pre.{start}"])
            logits = forward_from(model, h0, start, valid, interventions)
            logp = jax.nn.log_softmax(at_least_f32(logits[:, :-1]), axis=-1)
            kl = jnp.sum(kl_mask * jnp.sum(p_clean * (logp_clean - logp), axis=-1)) / n_kl
            alpha = jax.lax.stop_gradient(mse / (kl + self.kl_eps))
            e2e = (mse + alpha * self.beta * kl) / (1.0 + self.beta)
            m = {}
            sparsity = self._sparsity(t, d, pre, w, n_tok, step, m)
            loss = e2e + sparsity

            fired = (codes > 0) & (_expand(w, codes) > 0)
            l0_tokens = jnp.sum(fired, axis=tuple(range(1, codes.ndim))).astype(jnp.float32)
            ce_clean = -jnp.take_along_axis(logp_clean, next_tokens, axis=-1)[..., 0]
            ce_spliced = -jnp.take_along_axis(logp, next_tokens, axis=-1)[..., 0]
            ce_clean = jnp.sum(ce_clean * kl_mask) / n_kl
            ce_spliced = jax.lax.stop_gradient(jnp.sum(ce_spliced * kl_mask) / n_kl)
            m.update(
                loss=loss,
                e2e_loss=e2e,
                mse=mse,
                kl=kl,
                alpha=alpha,
                sparsity_loss=sparsity,
                l0=jnp.sum(l0_tokens) / n_tok,
                fire_counts=jnp.sum(fired, axis=0).astype(jnp.int32),
                ce_clean=ce_clean,
                ce_spliced=ce_spliced,
                delta_loss=ce_spliced - ce_clean,
            )
            total = total + loss
            metrics.append(m)
            parts.append((mse, kl))
        if return_parts:
            return total, metrics, parts
        return total, metrics

    def _sparsity(self, t: DictionaryTraining, d, pre, w, n_tok, step, metrics) -> jax.Array:
        """The first stage's JumpReLU penalties over spliced tokens (token weights `w`); 0 for
        TopK."""
        if t.cfg.architecture != "jumprelu":
            return jnp.zeros((), jnp.float32)
        return jumprelu_penalties(d, pre, t.loss, step, metrics, weights=w)

    # ---- the step ------------------------------------------------------------------------------

    def step_fn(self, state: TrainState, batch: Mapping[str, jax.Array], lm_params=None):
        lm_params = self.lm_params if lm_params is None else lm_params
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self._ft_step(state, batch["tokens"], batch.get("loss_mask"), lm_params)

    def _ft_step(self, state: TrainState, tokens, loss_mask, lm_params):
        def loss_fn(params):
            return self.losses(params, tokens, lm_params, state.step, loss_mask=loss_mask)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return self._update(state, grads, metrics)

    def _jitted(self, state: TrainState, batch: Mapping[str, jax.Array]):
        tokens = batch["tokens"]
        key = (tuple(tokens.shape), str(tokens.dtype), "loss_mask" in batch)
        if key not in self._compiled:
            b_sh = self.batch_shardings(batch)
            _, m_shape = jax.eval_shape(self.step_fn, state, dict(batch), self.lm_params)
            self._compiled[key] = jax.jit(
                self.step_fn,
                in_shardings=(self.state_shardings, b_sh, self.lm_shardings),
                out_shardings=(self.state_shardings, self._metric_shardings(m_shape)),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._compiled[key]

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """One finetune update of every dictionary on `{"tokens": [B, T]}` (and optionally
        `"loss_mask"` [B, T])."""
        batch = {k: batch[k] for k in ("tokens", "loss_mask") if k in batch}
        return self._jitted(state, batch)(state, batch, self.lm_params)
