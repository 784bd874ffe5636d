"""The sharded train step: several dictionaries, one batch of site activations, one jit.

    specs = [DictionaryTraining(cfg_sae, LossConfig(...), OptimizerConfig(...)), ...]
    train_step = make_train_step(specs, mesh)        # mesh: sharding.make_mesh(data, model)
    state = train_step.init(seed=0)                  # or init(dictionaries=[d0, d1, ...])
    batch = train_step.put_batch({"resid_post.9": x, "mlp_in.9": a, "mlp_out.9": b})
    state, metrics = train_step(state, batch)        # metrics[name]["loss"], ...
    d0, d1 = train_step.dictionaries(state)          # Dictionary modules, for export

`TrainState` is a pure pytree (orbax-friendly): `step` (int32, updates done),
`params[i]` = dictionary i's `{flat name: array}` (`Dictionary.arrays()` names; `b_pre`
only with a free pre-encoder bias, see `DictionaryTraining`), `opt_state[i]` its optax
state, `steps_since_fired[i]` [(L,) F] int32 (steps since the latent last fired on a
batch; reset to 0 when it fires, so `>= dead_steps` means dead).

The batch maps canonical site names (`DictionaryConfig.input_sites` / `output_sites`; see
`TrainStep.sites`) to *normalised* activations [N, d] (the data pipeline divides by the
per-site scale). A CLT / crosscoder stacks its L sites to [N, L, d] inside the step. All
dictionaries train from the same batch in one program; their losses are independent (the
gradient of the sum is each one's own gradient).

Sharding (one rules table, `gemmascope_jax.sharding.LOGICAL_RULES`): parameters follow their
`logical_axes` (`latents` -> `model`: w_enc columns, w_dec rows, b_enc, threshold), Adam
moments and `steps_since_fired` follow the parameter / latent axis, batch arrays are split
on the token axis over `data` (`batch` -> `data`), scalars are replicated. The step is
`jax.jit` with these explicit in/out shardings and the state donated; one compiled program
per batch shape. The same code runs on one device (mesh 1x1) and on any (data, model) mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.dictionaries.registry import dictionary_class
from gemmascope_jax.sharding import logical_sharding, make_mesh
from gemmascope_jax.training.losses import LossConfig, dictionary_loss
from gemmascope_jax.training.optimizer import (
    OptimizerConfig,
    constrain_params,
    decoder_norm_axes,
    make_optimizer,
)


@flax.struct.dataclass
class TrainState:
    """step [] int32; params, opt_state, steps_since_fired: one entry per dictionary."""

    step: jax.Array
    params: tuple[dict[str, jax.Array], ...]
    opt_state: tuple[Any, ...]
    steps_since_fired: tuple[jax.Array, ...]


PRE_ENCODER_BIAS = ("auto", "tied", "free", "none")


@dataclasses.dataclass(frozen=True)
class DictionaryTraining:
    """One dictionary to train.

    Fields:
        cfg, loss, optimizer: the dictionary config and its loss / optimizer settings.
        name: unique metrics name; default `{kind}.{first input site}` (`sae.resid_post.9`).
        pre_encoder_bias: what is subtracted from x before the encoder (docs/recipe.md):
            "tied" uses b_dec (GS2: `x - b_dec`; the exported `b_pre` equals `b_dec`),
            "free" trains `b_pre` as its own parameter, "none" keeps it 0. "auto" (default)
            is "tied" for kinds that predict their input (sae, crosscoder) and "free" for
            the transcoders and CLTs, whose b_dec lives in the output space.
    """

    cfg: DictionaryConfig
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    name: str | None = None
    pre_encoder_bias: str = "auto"

    def __post_init__(self):
        mode = self.pre_encoder_bias
        if mode not in PRE_ENCODER_BIAS:
            raise ValueError(f"pre_encoder_bias must be one of {PRE_ENCODER_BIAS}, got {mode!r}")
        if mode == "tied" and self.cfg.kind not in ("sae", "crosscoder"):
            raise ValueError(
                f"pre_encoder_bias 'tied' needs d_in == d_out space, not {self.cfg.kind}"
            )

    @property
    def label(self) -> str:
        return self.name or f"{self.cfg.kind}.{self.cfg.input_sites[0]}"

    @property
    def bias_mode(self) -> str:
        if self.pre_encoder_bias != "auto":
            return self.pre_encoder_bias
        return "tied" if self.cfg.kind in ("sae", "crosscoder") else "free"

    def param_specs(self):
        """Specs of the trained parameters: the dictionary's, without `b_pre` unless "free"."""
        specs = dict(dictionary_class(self.cfg.kind).param_specs(self.cfg))
        if self.bias_mode != "free":
            specs.pop("b_pre")
        return specs

    def module(self, params: Mapping[str, jax.Array]) -> Dictionary:
        """The Dictionary for trained `params` (b_pre = b_dec when tied, 0 when none)."""
        arrays = dict(params)
        if self.bias_mode == "tied":
            arrays["b_pre"] = arrays["b_dec"]
        return dictionary_class(self.cfg.kind).from_arrays(self.cfg, arrays)

    def params_of(self, d: Dictionary) -> dict[str, jax.Array]:
        """Trained parameters for dictionary `d`, same function: b_enc absorbs the change of
        pre-encoder bias (`pre = (x - b_pre) @ w_enc + b_enc` is kept)."""
        a = d.arrays()
        if self.bias_mode == "free":
            return a
        shift = -a.pop("b_pre") + (a["b_dec"] if self.bias_mode == "tied" else 0.0)
        eq = "li,lif->lf" if self.cfg.multilayer else "i,if->f"
        a["b_enc"] = a["b_enc"] + jnp.einsum(eq, shift, a["w_enc"], precision="highest")
        return a


def _latent_axes(cfg: DictionaryConfig) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if cfg.multilayer:
        return (cfg.num_layers, cfg.width), ("layers", "latents")
    return (cfg.width,), ("latents",)


def _stack_sites(cfg: DictionaryConfig, batch: Mapping[str, jax.Array], sites) -> jax.Array:
    if cfg.multilayer:
        x = jnp.stack([batch[s] for s in sites], axis=-2)
        return x.reshape(-1, *x.shape[-2:])
    return batch[sites[0]].reshape(-1, batch[sites[0]].shape[-1])


def _site_means(t: DictionaryTraining, batch: Mapping[str, Any], with_pre: bool) -> dict:
    """`b_dec` = mean of the output site(s) [(L,) d_out], `b_pre` = mean of the input(s)."""
    batch = {s: jnp.asarray(a, jnp.float32) for s, a in batch.items()}
    out = {"b_dec": jnp.mean(_stack_sites(t.cfg, batch, t.cfg.output_sites), axis=0)}
    if with_pre:
        out["b_pre"] = jnp.mean(_stack_sites(t.cfg, batch, t.cfg.input_sites), axis=0)
    return {n: a.astype(t.cfg.param_dtype) for n, a in out.items()}


class TrainStep:
    """Jitted, sharded train step for `trainings` on `mesh` (see the module docstring)."""

    def __init__(
        self,
        trainings: Sequence[DictionaryTraining],
        mesh: Mesh | None = None,
        *,
        donate: bool = True,
    ):
        self.trainings = tuple(trainings)
        if not self.trainings:
            raise ValueError("nothing to train: no DictionaryTraining given")
        names = [t.label for t in self.trainings]
        if len(set(names)) != len(names):
            raise ValueError(f"dictionary names must be unique, got {names}")
        for t in self.trainings:
            t.loss.check(t.cfg)
        self.names = tuple(names)
        self.mesh = mesh if mesh is not None else make_mesh(data=-1, model=1)
        self.donate = donate
        self._norm_axes = tuple(decoder_norm_axes(t.cfg) for t in self.trainings)
        self._opts = tuple(
            make_optimizer(t.optimizer, axes)
            for t, axes in zip(self.trainings, self._norm_axes, strict=True)
        )
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = self._state_shardings()
        self._compiled: dict[Any, Any] = {}

    # ---- shardings ----------------------------------------------------------------------------

    def _param_shardings(self, t: DictionaryTraining) -> dict[str, NamedSharding]:
        specs = t.param_specs()
        return {n: logical_sharding(ax, shape, self.mesh) for n, (shape, ax) in specs.items()}

    def _latent_sharding(self, cfg: DictionaryConfig) -> NamedSharding:
        shape, axes = _latent_axes(cfg)
        return logical_sharding(axes, shape, self.mesh)

    def _state_shardings(self) -> TrainState:
        params, opts = [], []
        for t, opt in zip(self.trainings, self._opts, strict=True):
            p_sh = self._param_shardings(t)
            abstract = {
                n: jax.ShapeDtypeStruct(shape, t.cfg.param_dtype)
                for n, (shape, _) in t.param_specs().items()
            }
            opt_shape = jax.eval_shape(opt.init, abstract)
            opts.append(
                optax.tree_utils.tree_map_params(
                    opt,
                    lambda _, sh: sh,
                    opt_shape,
                    p_sh,
                    transform_non_params=lambda _: self._replicated,
                )
            )
            params.append(p_sh)
        return TrainState(
            step=self._replicated,
            params=tuple(params),
            opt_state=tuple(opts),
            steps_since_fired=tuple(self._latent_sharding(t.cfg) for t in self.trainings),
        )

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """Token axis over `data` (when it divides), everything else replicated."""
        out = {}
        for site, a in batch.items():
            axes = ("batch",) + (None,) * (len(a.shape) - 1)
            out[site] = logical_sharding(axes, a.shape, self.mesh)
        return out

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Place a host batch with `batch_shardings` (single process; multi-host loops build
        global arrays with `jax.make_array_from_process_local_data` and the same shardings)."""
        shardings = self.batch_shardings(batch)
        return {s: jax.device_put(a, shardings[s]) for s, a in batch.items()}

    @property
    def sites(self) -> tuple[str, ...]:
        """Canonical site names the batch must contain."""
        out: list[str] = []
        for t in self.trainings:
            for s in (*t.cfg.input_sites, *t.cfg.output_sites):
                if s not in out:
                    out.append(s)
        return tuple(out)

    # ---- state --------------------------------------------------------------------------------

    def init(
        self,
        dictionaries: Sequence[Dictionary] | None = None,
        seed: int = 0,
        mean_batch: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """Fresh state: GS2 initialisation (`init_arrays`, key `fold_in(key(seed), i)`; θ from
        `LossConfig.threshold_init` when set), created directly in its shardings, or the given
        dictionaries' parameters.

        `mean_batch` (a batch like the step's, normalised) sets `b_dec` to the mean of the
        output site(s) and a free `b_pre` to the mean of the input site(s), so that the
        encoder starts on centred inputs (SAELens `b_dec_init_method="mean"`; GS2 starts
        from 0). Worth it for short runs on sites with a large mean such as resid_post:
        b_dec otherwise needs thousands of steps to learn it.
        """
        if dictionaries is not None and len(dictionaries) != len(self.trainings):
            raise ValueError(f"got {len(dictionaries)} dictionaries for {len(self.trainings)}")
        params = []
        for i, t in enumerate(self.trainings):
            sh = self.state_shardings.params[i]
            if dictionaries is not None:
                d = dictionaries[i]
                if d.cfg != t.cfg:
                    raise ValueError(f"dictionary {i} config differs from training {t.label!r}")
                p = t.params_of(d)
            else:

                def make(key, t=t):
                    arrays = dictionary_class(t.cfg.kind).init_arrays(t.cfg, key)
                    if t.loss.threshold_init is not None and "threshold" in arrays:
                        th = arrays["threshold"]
                        arrays["threshold"] = jnp.full_like(th, t.loss.threshold_init)
                    return {n: arrays[n].astype(t.cfg.param_dtype) for n in t.param_specs()}

                key = jax.random.fold_in(jax.random.key(seed), i)
                p = jax.jit(make, out_shardings=sh)(key)
            if mean_batch is not None:
                p = {**p, **_site_means(t, mean_batch, with_pre="b_pre" in p)}
            params.append({n: jax.device_put(a, sh[n]) for n, a in p.items()})
        return self._state_from_params(tuple(params))

    def _state_from_params(self, params) -> TrainState:
        sh = self.state_shardings

        def make(params):
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tuple(opt.init(p) for opt, p in zip(self._opts, params, strict=True)),
                steps_since_fired=tuple(
                    jnp.zeros(_latent_axes(t.cfg)[0], jnp.int32) for t in self.trainings
                ),
            )

        return jax.jit(make, in_shardings=(sh.params,), out_shardings=sh)(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings (a restore target for orbax)."""
        shapes = jax.eval_shape(lambda: self.init())
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shapes,
            self.state_shardings,
        )

    def dictionaries(self, state: TrainState) -> tuple[Dictionary, ...]:
        """The current dictionaries as modules (normalised units; fold scales at export)."""
        return tuple(t.module(p) for t, p in zip(self.trainings, state.params, strict=True))

    # ---- the step -----------------------------------------------------------------------------

    def step_fn(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """The un-jitted step: (state, batch) -> (new state, {name: metrics}).

        Traced under this step's mesh (`use_abstract_mesh`), so the sparse decode kernels
        run per latent shard (`pallas_kernels.sparse_decode`: `shard_map` over `model`)."""
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self._step(state, batch)

    def _step(self, state: TrainState, batch: Mapping[str, jax.Array]):

        def loss_fn(params):
            total, metrics = 0.0, []
            for i, t in enumerate(self.trainings):
                d = t.module(params[i])
                x = _stack_sites(t.cfg, batch, t.cfg.input_sites)
                y = _stack_sites(t.cfg, batch, t.cfg.output_sites)
                loss, m = dictionary_loss(
                    d, x, y, t.loss, step=state.step, steps_since_fired=state.steps_since_fired[i]
                )
                total, metrics = total + loss, [*metrics, m]
            return total, metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params)
        return self._update(state, grads, metrics)

    def _update(self, state: TrainState, grads, metrics):
        """(new state, {name: metrics}) after one optimizer update of every dictionary:
        decoder norms constrained, steps-since-fired, dead fraction and lr in the metrics.
        Shared by the first stage and the finetune step (`finetune_step.FinetuneStep`)."""
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

    def _metric_shardings(self, metrics_shape):
        def pick(path, leaf):
            name = path[0].key
            if any(getattr(k, "key", None) == "fire_counts" for k in path):
                i = self.names.index(name)
                return self._latent_sharding(self.trainings[i].cfg)
            return self._replicated

        return jax.tree_util.tree_map_with_path(pick, metrics_shape)

    def _jitted(self, state: TrainState, batch: Mapping[str, jax.Array]):
        key = tuple(sorted((s, tuple(a.shape), str(a.dtype)) for s, a in batch.items()))
        if key not in self._compiled:
            missing = [s for s in self.sites if s not in batch]
            if missing:
                raise KeyError(f"batch lacks sites {missing}; it has {sorted(batch)}")
            b_sh = self.batch_shardings(batch)
            _, m_shape = jax.eval_shape(self.step_fn, state, dict(batch))
            self._compiled[key] = jax.jit(
                self.step_fn,
                in_shardings=(self.state_shardings, b_sh),
                out_shardings=(self.state_shardings, self._metric_shardings(m_shape)),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._compiled[key]

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """One update of every dictionary; returns (new state, {name: metrics})."""
        batch = {s: a for s, a in batch.items() if s in self.sites}
        return self._jitted(state, batch)(state, batch)


def make_train_step(
    trainings: Sequence[DictionaryTraining], mesh: Mesh | None = None, *, donate: bool = True
) -> TrainStep:
    """A `TrainStep` for `trainings` on `mesh` (default: all devices on `data`)."""
    return TrainStep(trainings, mesh, donate=donate)
