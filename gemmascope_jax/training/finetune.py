"""End-to-end KL finetuning of trained dictionaries (Gemma Scope 2 TR §2.4).

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

The run: the first stage's checkpoint (`finetune.init_from`, a run directory; default this
run's) gives the dictionaries and the normalisation scalars. Without one, the finetune starts
from exports (raw units): `finetune.init_from` an export folder (`<name>/native` per
dictionary, e.g. `runs/x/export`), or, with `finetune.init_from: null` and no checkpoint in
this run, every dictionary's `dictionaries.N.init_from` (e.g. the IT recipe's PT exports);
they are unfolded with normalisation scalars estimated on this run's data as the first stage
does. A `rollouts` data source is generated with the run's model if its file is missing
(reused otherwise), as in the first stage. Finetune checkpoints (state +
token-iterator position) go to `<run.dir>/<finetune.dir>/checkpoints`, so a rerun resumes
exactly after a kill; at the end the held-out evals of the starting and the finetuned
dictionaries go to `<finetune.dir>/report/summary.json` and the exports to
`<finetune.dir>/export`. One process (multi-host finetuning is not supported yet).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gemmascope_jax.training.losses import jumprelu_penalties
from gemmascope_jax.training.optimizer import OptimizerConfig, constrain_params
from gemmascope_jax.training.step import DictionaryTraining, TrainState, TrainStep

log = logging.getLogger(__name__)
FINETUNE_ARCHITECTURES = ("jumprelu", "topk")
_DATA_SEED_OFFSET = 3  # token order of the finetune stage (0: first stage, 1: norm, 2: held-out)


def token_masks(tokens: jax.Array, bos_id: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """(valid [B, T], spliced [B, T]): real tokens, and real tokens that are not <bos>."""
    valid = tokens != pad_id
    return valid, valid & (tokens != bos_id)


def _sq(a: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))


def _f32(a: jax.Array) -> jax.Array:
    """At least float32 (float64 stays: the finite-difference test runs the model in it)."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


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


class _CausalSplicer:
    """Interventions of one spliced forward of a multi-layer dictionary: records the input
    sites as the forward reaches them, replaces output site j with the prediction from the
    (spliced run's) inputs 0..j (STE codes, normalised units scaled back)."""

    def __init__(self, d, predict, spliced, s_in, s_out):
        self.d, self.cfg, self.predict = d, d.cfg, predict
        self.spliced = spliced[..., None]
        self.s_in, self.s_out = s_in, s_out
        self.seen: dict[int, jax.Array] = {}

    def _inputs_upto(self) -> jax.Array:
        xs = [self.seen.get(i, jnp.zeros_like(self.seen[0])) for i in range(self.cfg.num_layers)]
        return jnp.stack(xs, axis=-2) / self.s_in[:, None]

    def record(self, j: int):
        def fn(x):
            self.seen[j] = _f32(x)
            return x

        return fn

    def replace(self, j: int, same_site: bool):
        def fn(x):
            if same_site:
                self.seen[j] = _f32(x)
            new = self.predict(self._inputs_upto())[..., j, :] * self.s_out[j]
            return jnp.where(self.spliced, new.astype(x.dtype), x)

        return fn

    def interventions(self) -> dict[str, Any]:
        out = {}
        for j, (s_in, s_out) in enumerate(
            zip(self.cfg.input_sites, self.cfg.output_sites, strict=True)
        ):
            if s_in != s_out:
                out[s_in] = self.record(j)
            out[s_out] = self.replace(j, same_site=s_in == s_out)
        return out


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
        logp_clean = jax.lax.stop_gradient(jax.nn.log_softmax(_f32(clean.logits[:, :-1]), axis=-1))
        p_clean = jnp.exp(logp_clean)
        kl_mask = (spliced[:, :-1] & valid[:, 1:]).astype(jnp.float32)
        n_kl = jnp.maximum(jnp.sum(kl_mask), 1.0)
        w = spliced.reshape(-1).astype(jnp.float32)
        n_tok = jnp.maximum(jnp.sum(w), 1.0)
        next_tokens = tokens[:, 1:, None]

        def site(name, scale):
            a = _f32(jax.lax.stop_gradient(clean.sites[name]))
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

                splicer = _CausalSplicer(d, predict, spliced, jnp.asarray(s_in), s_out)
                interventions = splicer.interventions()
            else:
                new = (y_hat * s_out).reshape(b, t_len, -1)

                def put(h, new=new):
                    return jnp.where(spliced[..., None], new.astype(h.dtype), h)

                interventions = {cfg.output_sites[0]: put}
            start = starts[i]
            h0 = jax.lax.stop_gradient(clean.sites[f"resid_pre.{start}"])
            logits = forward_from(model, h0, start, valid, interventions)
            logp = jax.nn.log_softmax(_f32(logits[:, :-1]), axis=-1)
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
        params, opt_states, fired, out = [], [], [], {}
        for i, t in enumerate(self.trainings):
            p = state.params[i]
            updates, opt_state = self._opts[i].update(grads[i], state.opt_state[i], p)
            params.append(constrain_params(optax.apply_updates(p, updates), self._norm_axes[i]))
            opt_states.append(opt_state)
            m = metrics[i]
            ssf = jnp.where(m["fire_counts"] > 0, 0, state.steps_since_fired[i] + 1)
            fired.append(ssf)
            m["dead_fraction"] = jnp.mean((ssf >= t.loss.dead_steps).astype(jnp.float32))
            m["lr"] = jnp.asarray(t.optimizer.schedule()(state.step), jnp.float32)
            out[self.names[i]] = m
        new = TrainState(
            step=state.step + 1,
            params=tuple(params),
            opt_state=tuple(opt_states),
            steps_since_fired=tuple(fired),
        )
        return new, out

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


# ---- the run -----------------------------------------------------------------------------------


def finetune_trainings(cfg, trainings: Sequence[DictionaryTraining]) -> list[DictionaryTraining]:
    """The first stage's trainings with the finetune's loss and optimizer: sparsity at its
    full coefficient and final L0 target from step 0, lr `finetune.lr` (else the first
    stage's), `finetune.lr_warmup_steps`, constant after."""
    ft = cfg.finetune
    out = []
    for t in trainings:
        loss = dataclasses.replace(t.loss, sparsity_warmup_steps=0, l0_target_init=None)
        o = t.optimizer
        opt = OptimizerConfig(
            lr=ft.lr if ft.lr is not None else o.lr,
            warmup_steps=ft.lr_warmup_steps,
            warmup_init_fraction=o.warmup_init_fraction,
            total_steps=ft.steps,
            final_lr_fraction=1.0,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            grad_clip_norm=o.grad_clip_norm,
        )
        out.append(dataclasses.replace(t, loss=loss, optimizer=opt))
    return out


@dataclasses.dataclass
class FinetuneResult:
    steps: int
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    exports: dict[str, dict[str, str]]
    out_dir: Path
    stopped_early: bool = False


def _first_stage(cfg, stage1_step, estimate_scalars):
    """The starting dictionaries (normalised units), their normalisation scalars and where
    they came from (module docstring, "The run"):

    - `finetune.init_from` a run directory (its `config.yaml`, or a `checkpoints/` folder),
      or null (this run): the newest first-stage checkpoint, with its scalars;
    - `finetune.init_from` an export folder (e.g. `runs/x/export`, one `<name>/native` or
      `<name>` per dictionary), or null with no checkpoint in this run but
      `dictionaries.N.init_from` exports for every dictionary: those exports (raw units),
      unfolded with scalars estimated on this run's data as the first stage does
      (`estimate_scalars()`; `training.init_from.normalised_copy`)."""
    from gemmascope_jax.training.checkpoint import Checkpointer
    from gemmascope_jax.training.config import load_config

    src = cfg.finetune.init_from
    ckpt_dir, exports = cfg.checkpoint_dir, None
    if src is not None:
        run_dir = Path(src)
        if (run_dir / "config.yaml").is_file():
            first = load_config(run_dir / "config.yaml")
            first = dataclasses.replace(first, run=dataclasses.replace(first.run, dir=str(run_dir)))
            ckpt_dir = first.checkpoint_dir
        elif (run_dir / "checkpoints").is_dir():
            ckpt_dir = run_dir / "checkpoints"
        elif run_dir.is_dir():
            ckpt_dir, exports = None, _export_paths(run_dir, stage1_step.names)
        else:
            raise FileNotFoundError(f"finetune.init_from: no such folder {run_dir}")
    restored = None
    if ckpt_dir is not None and Path(ckpt_dir).is_dir():
        ckpt = Checkpointer(ckpt_dir, keep=10**6, every_steps=0, handle_sigterm=False)
        try:
            restored = ckpt.restore(stage1_step.abstract_state())
        finally:
            ckpt.close()
    if restored is not None:
        if restored.step < cfg.train.steps:
            log.warning("first stage stopped at step %d of %d", restored.step, cfg.train.steps)
        scalars = {k: float(v) for k, v in restored.extras["norm_scalars"].items()}
        where = f"checkpoint {ckpt_dir} (step {restored.step})"
        return stage1_step.dictionaries(restored.state), scalars, where
    if exports is None:
        specs = {s.name: s.init_from for s in cfg.dictionaries}
        if src is None and all(specs.get(n) for n in stage1_step.names):
            exports = {n: Path(specs[n]) for n in stage1_step.names}
        else:
            raise FileNotFoundError(
                f"no first-stage checkpoint in {ckpt_dir} (finetune.init_from: a run dir or an "
                "export folder; or dictionaries.N.init_from exports for every dictionary)"
            )
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.training.init_from import normalised_copy

    scalars = estimate_scalars()
    dicts = [
        normalised_copy(load_dictionary(exports[n]), t.cfg, scalars, f"{n}: {exports[n]}")
        for n, t in zip(stage1_step.names, stage1_step.trainings, strict=True)
    ]
    return dicts, scalars, "exports " + ", ".join(str(exports[n]) for n in stage1_step.names)


def _export_paths(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    """`{name: folder/name/native}` (or `folder/name`, any format) for every dictionary."""
    out, missing = {}, []
    for n in names:
        for p in (folder / n / "native", folder / n):
            if p.is_dir() and any(p.iterdir()):
                out[n] = p
                break
        else:
            missing.append(n)
    if missing:
        raise FileNotFoundError(
            f"finetune.init_from {folder}: not a run directory, and no export of {missing} "
            "in it (<name>/native or <name>)"
        )
    return out


def _norm_scalars(cfg, model, tok, sites, docs) -> dict[str, float]:
    """Per-site normalisation scalars of `docs` estimated as the first stage does without an
    activation cache (`ActivationPipeline.init_norm_scalars`: `data.norm_tokens` tokens of
    the live stream with seed offset 1, one data shard)."""
    from gemmascope_jax.data.activations import estimate_norm_scalars
    from gemmascope_jax.data.pipeline import activation_stream, sharded_forward
    from gemmascope_jax.data.shards import combine_norm_scalars

    batch_tokens = cfg.train.batch_tokens
    n_batches = max(1, cfg.data.norm_tokens // batch_tokens)
    forward = sharded_forward(model, tuple(sites))
    stream = activation_stream(
        cfg,
        forward,
        tok,
        tuple(sites),
        docs,
        batch_tokens,
        epochs=None,
        seed_offset=1,
        shard=(0, 1),
    )
    try:
        scalars = combine_norm_scalars(
            [estimate_norm_scalars(stream, n_batches, cfg.data.normalization)]
        )
    finally:
        getattr(stream, "close", lambda: None)()
    return {k: float(v) for k, v in scalars.items()}


def _folded(step, dictionaries, scalars) -> dict:
    from gemmascope_jax.training.trainer import _scales

    return {
        name: d.fold_input_scale(*_scales(d.cfg, scalars)).fold_pre_encoder_bias()
        for name, d in zip(step.names, dictionaries, strict=True)
    }


def run_finetune(cfg) -> FinetuneResult:
    """Run (or resume) the finetune stage of a validated `RunConfig` (module docstring)."""
    from gemmascope_jax.data.pipeline import model_mesh, packed_tokens, uses_loss_mask
    from gemmascope_jax.data.sources import split_documents
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.sharding import lm_rules, make_mesh
    from gemmascope_jax.training.checkpoint import Checkpointer
    from gemmascope_jax.training.report import RunLogger, _scalars
    from gemmascope_jax.training.trainer import (
        HELDOUT_FRACTION,
        _documents,
        _export,
        _HeldoutEval,
        _trainings,
    )

    if jax.process_count() > 1:
        raise NotImplementedError("end-to-end finetuning runs in one process")
    cfg = cfg.validate(device_count=jax.device_count())
    ft = cfg.finetune
    mesh = make_mesh(*cfg.mesh.shape(jax.device_count()))
    out_dir = cfg.path(ft.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    source = None if cfg.model.source == "embedded" else cfg.model.source
    model, tok = load_gemma3(
        source,
        dtype=cfg.model.dtype,
        mesh=model_mesh(mesh),
        rules=lm_rules(cfg.mesh.fsdp),
        progress=cfg.report.progress,
    )
    first = _trainings(cfg, model)
    stage1 = TrainStep(first, mesh, donate=False)
    train_docs, heldout_docs = split_documents(
        _documents(cfg, model, tok, progress=cfg.report.progress),
        holdout=HELDOUT_FRACTION,
        seed=cfg.data.seed,
    )
    start_dicts, scalars, started = _first_stage(
        cfg, stage1, lambda: _norm_scalars(cfg, model, tok, stage1.sites, train_docs)
    )
    log.info("finetune starts from %s", started)
    step = FinetuneStep(
        finetune_trainings(cfg, first),
        mesh,
        model,
        scalars,
        beta=ft.beta,
        kl_eps=ft.kl_eps,
        bos_id=int(getattr(tok, "bos_id", 2)),
        pad_id=int(getattr(tok, "pad_id", 0)),
    )
    data_cfg = dataclasses.replace(cfg.data, batch_size=ft.batch_size or cfg.data.batch_size)
    tokens = packed_tokens(
        dataclasses.replace(cfg, data=data_cfg),
        tok,
        train_docs,
        epochs=None,
        seed_offset=_DATA_SEED_OFFSET,
        shard=(0, 1),
        loss_mask=uses_loss_mask(cfg),
    )
    ckpt = Checkpointer(
        out_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        every_steps=cfg.checkpoint.every_steps,
        async_save=cfg.checkpoint.async_save,
    )
    restored = ckpt.restore(step.abstract_state()) if cfg.checkpoint.resume else None
    if restored is not None:
        state, start = restored.state, int(restored.step)
        tokens.set_state(restored.extras["data"])
        saved = {k: float(v) for k, v in restored.extras["norm_scalars"].items()}
        if saved != scalars:  # e.g. re-estimated for an export on another device count
            log.warning("finetune resumes with its checkpoint's normalisation scalars")
            scalars = saved
            step.scalars = {s: saved[s] for s in step.sites}  # read when the step compiles
        log.info("finetune resumed from step %d", start)
    else:
        state, start = step.init(dictionaries=start_dicts), 0

    report_dir = out_dir / "report"
    logger = RunLogger(report_dir, tensorboard=False)
    stopped, t0 = False, time.perf_counter()
    for i in range(start, ft.steps):
        batch = next(tokens)
        batch = step.put_batch(batch if isinstance(batch, dict) else {"tokens": batch})
        state, metrics = step(state, batch)
        done = i + 1
        if done % cfg.report.log_every == 0 or done == ft.steps:
            rate = (done - start) * batch["tokens"].size / (time.perf_counter() - t0)
            logger.log_train(done, jax.device_get(metrics), tokens_per_s=rate)
        stop = ckpt.stop_requested(done)
        if ckpt.should_save(done) or stop or done == ft.steps:
            ckpt.save(done, state, extras={"data": tokens.get_state(), "norm_scalars": scalars})
        if stop and done < ft.steps:
            stopped = True
            break
    ckpt.wait()
    final = int(jax.device_get(state.step))
    if stopped:
        ckpt.close()
        logger.close()
        return FinetuneResult(final, {}, {}, {}, out_dir, stopped_early=True)

    heldout = _HeldoutEval(cfg, model, tok, step.sites, heldout_docs)
    before = heldout(_folded(step, start_dicts, scalars))
    finetuned = _folded(step, step.dictionaries(state), scalars)
    after = heldout(finetuned)
    logger.log_eval(final, after)
    export_cfg = dataclasses.replace(
        cfg, export=dataclasses.replace(cfg.export, dir=str(Path(ft.dir) / "export"))
    )
    exports = _export(export_cfg, finetuned)
    summary = {
        "steps": final,
        "beta": ft.beta,
        "before": {n: _scalars(e) for n, e in before.items()},
        "after": {n: _scalars(e) for n, e in after.items()},
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.close()
    ckpt.close()
    return FinetuneResult(final, before, after, exports, out_dir)


HEADLINE = ("fvu", "l0", "delta_loss", "kl")


def finetune_summary(result: FinetuneResult) -> str:
    """Compact JSON: FVU, L0, delta loss, KL per dictionary before and after."""

    def head(evals):
        return {n: {k: e[k] for k in HEADLINE if k in e} for n, e in evals.items()}

    return json.dumps(
        {"steps": result.steps, "before": head(result.before), "after": head(result.after)},
        indent=2,
    )
