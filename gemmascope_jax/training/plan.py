"""`gemmascope-jax plan CONFIG --topology v5p:4x4x4`: compile a run's whole step for a TPU
slice ahead of time, without a TPU and without allocating anything, and report whether it fits.

    plan = make_plan(cfg, "v5e:2x2")              # cfg: a validated RunConfig
    plan.fits, plan.per_device_bytes["total"], plan.est_tokens_per_s_per_chip
    print(plan.describe()); json.dumps(plan.to_json())

The compiled program is one training step as the main job runs it: the Gemma 3 forward on a
token batch [batch_size, seq_len] int32 (split over `data`) up to the deepest needed site (no
logits), the BOS column dropped, every site flattened to [batch_size * (seq_len - 1), d] and
divided by its normalisation scalar, then `TrainStep.step_fn` for every dictionary, under
`jax.jit` with explicit in/out shardings and the dictionary state donated. Everything is
abstract (`ShapeDtypeStruct`s with `NamedSharding`s on the abstract devices of
`jax.experimental.topologies.get_topology_desc`), so `.lower().compile()` runs the real
XLA:TPU compiler from libtpu on a CPU machine (the route of MaxText's `train_compile.py`).

Figures are compile-time: `memory_analysis()` (per device) and `cost_analysis()` (per device:
the SPMD-partitioned program; a 1-device and a 4-device mesh of the same step give FLOPs in the
ratio of the split work, see docs/scaling.md). The roofline estimate is
`max(flops / peak_flops, bytes / hbm_bandwidth)` per chip, from the published chip figures in
`CHIPS`; it ignores collectives and overlap, so it is a lower bound on step time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemmascope_jax.gemma3.model import Gemma3
from gemmascope_jax.sharding import lm_rules, logical_sharding, make_mesh
from gemmascope_jax.training.config import RunConfig, dictionary_trainings
from gemmascope_jax.training.step import TrainStep
from pallas_kernels.aot import compiled_kernels

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures: peak bf16 FLOP/s, HBM capacity (bytes), HBM bytes/s."""

    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    source: str


# Google Cloud TPU documentation, "System architecture" table of each generation's page.
CHIPS = {
    "v4": ChipSpec("TPU v4", 275e12, 32 * GIB, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("TPU v5e", 197e12, 16 * GIB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("TPU v5p", 459e12, 95 * GIB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("TPU v6e", 918e12, 32 * GIB, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# XLA:TPU keeps part of HBM for itself (on v5e it offers 15.75 of 16 GiB): a plan fits when
# its per-device total is at most this fraction of the published capacity.
USABLE_HBM_FRACTION = 63 / 64
# The LM weights go FSDP over `data` (fsdp="auto") when tensor parallelism alone leaves
# them more than this fraction of a chip's HBM.
FSDP_AUTO_FRACTION = 0.25


class PlanError(ValueError):
    """A bad topology name or a config the plan cannot build (the CLI exits 2)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What compiling one step for `topology` says. Byte counts are per device."""

    topology: str
    chip: ChipSpec
    devices: int
    mesh: dict[str, int]
    fsdp: bool
    tokens_per_step: int
    per_device_bytes: dict[str, int]  # arguments, temp, output, generated_code, alias, total
    argument_breakdown: dict[str, int]  # "model params", "dictionary <name>", "token batch"
    largest_arrays: dict[str, str]  # term -> its largest array, e.g. "w_dec.0 [..] f32"
    flops_per_step: float | None
    bytes_per_step: float | None
    compile_s: float
    compile_error: str | None = None  # set when XLA refused the program (out of HBM)
    pallas_kernels: tuple[str, ...] = ()  # Mosaic kernels in the compiled program, by name

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    @property
    def usable_hbm_bytes(self) -> int:
        return int(self.hbm_bytes * USABLE_HBM_FRACTION)

    @property
    def fits(self) -> bool:
        total = self.per_device_bytes["total"]
        return self.compile_error is None and total <= self.usable_hbm_bytes

    @property
    def est_step_s(self) -> float | None:
        if self.flops_per_step is None or self.bytes_per_step is None:
            return None
        return max(
            self.flops_per_step / self.chip.peak_bf16_flops,
            self.bytes_per_step / self.chip.hbm_bytes_per_s,
        )

    @property
    def est_tokens_per_s_per_chip(self) -> float | None:
        step = self.est_step_s
        return None if not step else self.tokens_per_step / step / self.devices

    def memory_terms(self) -> dict[str, int]:
        """Per-device bytes by cause: model params, dictionary state, batch, activations/temp."""
        b = self.argument_breakdown
        dicts = sum(v for k, v in b.items() if k.startswith("dictionary "))
        other = self.per_device_bytes["total"] - b["model params"] - dicts - b["token batch"]
        return {
            "dictionary state": dicts,
            "model params": b["model params"],
            "token batch": b["token batch"],
            "activations/temp": max(other, 0),
        }

    def dominant(self) -> str:
        """'dictionary state 61% (clt: w_dec.0 ...), model params 20%, ...', largest first."""
        terms = self.memory_terms()
        total = max(sum(terms.values()), 1)
        dict_terms = {k: v for k, v in self.argument_breakdown.items() if k.startswith("dict")}
        parts = []
        for name, size in sorted(terms.items(), key=lambda kv: -kv[1]):
            if not size:
                continue
            detail = ""
            if name == "dictionary state" and dict_terms:
                top = max(dict_terms, key=dict_terms.get)
                detail = f" ({top.removeprefix('dictionary ')}: {self.largest_arrays[top]})"
            elif name == "model params":
                detail = f" ({self.largest_arrays['model params']})"
            parts.append(f"{name} {100 * size / total:.0f}%{detail}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "chip": self.chip.name,
            "devices": self.devices,
            "mesh": self.mesh,
            "fsdp": self.fsdp,
            "per_device_bytes": self.per_device_bytes,
            "argument_breakdown": self.argument_breakdown,
            "hbm_bytes": self.hbm_bytes,
            "usable_hbm_bytes": self.usable_hbm_bytes,
            "fits": self.fits,
            "dominant": self.dominant(),
            "tokens_per_step": self.tokens_per_step,
            "flops_per_step": self.flops_per_step,
            "bytes_per_step": self.bytes_per_step,
            "cost_scope": "per device",
            "est_step_s": self.est_step_s,
            "est_tokens_per_s_per_chip": self.est_tokens_per_s_per_chip,
            "compile_s": round(self.compile_s, 1),
            "compile_error": self.compile_error,
            "pallas_kernels": list(self.pallas_kernels),
        }

    def describe(self) -> str:
        m, c, pd = self.mesh, self.chip, self.per_device_bytes
        lines = [
            f"topology {self.topology}: {self.devices} x {c.name}, mesh data={m['data']} "
            f"model={m['model']}, LM weights {'FSDP over data + ' if self.fsdp else ''}"
            f"tensor-parallel over model; compiled in {self.compile_s:.0f}s",
            "per-device memory (XLA:TPU memory_analysis):",
        ]
        for key in ("arguments", "temp", "output", "generated_code", "alias"):
            sign = "-" if key == "alias" else " "
            lines.append(f"  {key:<15}{sign}{pd[key] / GIB:9.3f} GiB")
        lines.append(
            f"  {'total':<15} {pd['total'] / GIB:9.3f} GiB of {c.hbm_bytes / GIB:.0f} GiB HBM "
            f"({self.usable_hbm_bytes / GIB:.2f} GiB usable)"
        )
        lines.append("arguments by owner (from the abstract shapes and shardings):")
        for name, size in self.argument_breakdown.items():
            lines.append(f"  {name:<30} {size / GIB:9.3f} GiB")
        rest = pd["arguments"] - sum(self.argument_breakdown.values())
        lines.append(f"  {'scalars, TPU layout padding':<30} {rest / GIB:9.3f} GiB")
        if self.pallas_kernels:
            lines.append(f"Pallas TPU kernels (Mosaic): {', '.join(self.pallas_kernels)}")
        if self.compile_error:
            lines.append(f"XLA refused the program: {self.compile_error}")
        else:
            lines.append(
                f"per step and device: {self.flops_per_step:.3e} FLOPs, "
                f"{self.bytes_per_step:.3e} bytes accessed ({self.tokens_per_step:,} tokens/step)"
            )
            lines.append(
                f"roofline ({c.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                f"{c.hbm_bytes_per_s / 1e9:.0f} GB/s HBM; {c.source}): step >= "
                f"{self.est_step_s * 1e3:.2f} ms, <= {self.est_tokens_per_s_per_chip:,.0f} "
                "tokens/s per chip"
            )
        verdict = "fits" if self.fits else f"does NOT fit; memory: {self.dominant()}"
        usable = self.usable_hbm_bytes / GIB
        lines.append(f"{verdict} ({pd['total'] / GIB:.2f} GiB of {usable:.2f} GiB usable)")
        return "\n".join(lines)


def topology_devices(topology: str) -> tuple[ChipSpec, list]:
    """(chip, abstract devices) for a topology name such as 'v5p:2x2x1' or 'v5e:4x4'."""
    # Abstract devices need no TPU: let plan run beside other libtpu users (a training job on
    # this host, other plans) instead of failing on libtpu's single-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    generation = topology.split(":", 1)[0].lower()
    if generation not in CHIPS or ":" not in topology:
        raise PlanError(
            f"unknown topology {topology!r}; expected <chip>:<shape> with chip in "
            f"{sorted(CHIPS)}, e.g. v5e:2x2, v5p:2x2x1, v6e:2x2"
        )
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu's errors are plain runtime errors
        raise PlanError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None
    return CHIPS[generation], list(desc.devices)


def _per_device_bytes(a: jax.ShapeDtypeStruct) -> int:
    shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    return int(np.prod(shard, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize


def _describe_array(name: str, a: jax.ShapeDtypeStruct) -> str:
    dims = "x".join(map(str, a.shape))
    return f"{name} [{dims}] {jnp.dtype(a.dtype).name} {_per_device_bytes(a) / GIB:.2f} GiB/dev"


def _largest(tree) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    path, leaf = max(leaves, key=lambda pl: _per_device_bytes(pl[1]))
    return _describe_array(jax.tree_util.keystr(path, simple=True, separator="."), leaf)


def abstract_model(cfg: RunConfig) -> Gemma3:
    """The run's Gemma 3 as an abstract module (no weights read, nothing allocated)."""
    arch = cfg.model_arch()
    if arch is None:
        raise PlanError(
            f"model.source {cfg.model.source!r}: architecture unknown; set model.preset"
        )
    arch = arch.with_dtype(cfg.model.dtype)
    return nnx.eval_shape(lambda: Gemma3(arch, rngs=nnx.Rngs(0)))


def abstract_lm_params(model: Gemma3, mesh: Mesh, *, fsdp: bool):
    """(graphdef, State of ShapeDtypeStructs placed by the logical-axis rules)."""
    graphdef, state = nnx.split(model)
    rules = lm_rules(fsdp=fsdp)

    def place(v: nnx.Variable):
        axes = v.get_metadata()["logical_axes"]
        sharding = logical_sharding(axes, v.shape, mesh, rules)
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _lm_bytes_per_device(model: Gemma3, mesh: Mesh, fsdp: bool) -> int:
    _, params = abstract_lm_params(model, mesh, fsdp=fsdp)
    return sum(_per_device_bytes(a) for a in jax.tree.leaves(params))


def _compile_error(e: Exception) -> tuple[str, int | None]:
    """(first line of XLA's out-of-memory error, the temporaries it says the program needs)."""
    text = str(e)
    need = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", text)
    need = need or re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", text)
    size = int(float(need[1]) * 1024 ** " KMGT".index(need[2])) if need else None
    return text.strip().splitlines()[0][:300], size


def make_plan(cfg: RunConfig, topology: str, *, fsdp: bool | None = None) -> Plan:
    """Compile `cfg`'s whole step for `topology` (see the module docstring).

    fsdp: shard the LM weights over `data` too; None = when tensor parallelism alone leaves
    them above `FSDP_AUTO_FRACTION` of a chip's HBM.
    """
    chip, devices = topology_devices(topology)
    try:
        cfg = cfg.validate(device_count=len(devices))
        data, model_axis = cfg.mesh.shape(len(devices))
    except ValueError as e:
        raise PlanError(str(e)) from None
    mesh = make_mesh(data, model_axis, devices=devices)
    lm = abstract_model(cfg)
    if fsdp is None and cfg.mesh.fsdp:
        fsdp = True
    if fsdp is None:
        tp_bytes = _lm_bytes_per_device(lm, mesh, fsdp=False)
        fsdp = data > 1 and tp_bytes > FSDP_AUTO_FRACTION * chip.hbm_bytes
    graphdef, lm_params = abstract_lm_params(lm, mesh, fsdp=fsdp)
    step = TrainStep(dictionary_trainings(cfg, lm), mesh)
    state = step.abstract_state()
    sites = step.sites
    b, t = cfg.data.batch_size, cfg.data.seq_len
    token_sharding = logical_sharding(("batch", None), (b, t), mesh)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=token_sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    scalars = {s: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for s in sites}
    n_tokens = b * (t - 1)

    def site_batch(params, tokens, scalars):
        out = nnx.merge(graphdef, params)(tokens, capture=sites, logits=False)
        flat = {}
        for s in sites:
            x = out.sites[s][:, 1:]
            flat[s] = x.reshape(n_tokens, x.shape[-1]).astype(jnp.float32) / scalars[s]
        shardings = step.batch_shardings(flat)
        return {s: jax.lax.with_sharding_constraint(x, shardings[s]) for s, x in flat.items()}

    def whole_step(params, train_state, tokens, scalars):
        return step.step_fn(train_state, site_batch(params, tokens, scalars))

    _, metrics_shape = jax.eval_shape(whole_step, lm_params, state, tokens, scalars)
    param_shardings = jax.tree.map(lambda a: a.sharding, lm_params)
    jitted = jax.jit(
        whole_step,
        in_shardings=(param_shardings, step.state_shardings, token_sharding, replicated),
        out_shardings=(step.state_shardings, step._metric_shardings(metrics_shape)),
        donate_argnums=(1,),
        keep_unused=True,  # the run holds every LM layer, also those past the deepest site
    )
    breakdown = {"model params": sum(_per_device_bytes(a) for a in jax.tree.leaves(lm_params))}
    largest = {"model params": _largest(lm_params)}
    for i, name in enumerate(step.names):
        own = (state.params[i], state.opt_state[i], state.steps_since_fired[i])
        breakdown[f"dictionary {name}"] = sum(_per_device_bytes(a) for a in jax.tree.leaves(own))
        largest[f"dictionary {name}"] = _largest(state.params[i])
    breakdown["token batch"] = _per_device_bytes(tokens)

    t0 = time.perf_counter()
    error, flops, bytes_accessed, kernels = None, None, None, ()
    args = sum(breakdown.values())
    try:
        if args > chip.hbm_bytes:  # no need to ask XLA
            raise MemoryError(f"RESOURCE_EXHAUSTED: arguments alone need {args / GIB:.1f} GiB")
        with jax.set_mesh(mesh):  # Pallas TPU lowering reads the chip from the mesh
            compiled = jitted.lower(lm_params, state, tokens, scalars).compile()
    except Exception as e:  # XLA:TPU refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e) and "hbm" not in str(e).lower():
            raise
        error, temp = _compile_error(e)
        per_device = dict(arguments=args, temp=temp or 0, output=0, generated_code=0, alias=0)
    else:
        mem = compiled.memory_analysis()
        per_device = dict(
            arguments=int(mem.argument_size_in_bytes),
            temp=int(mem.temp_size_in_bytes),
            output=int(mem.output_size_in_bytes),
            generated_code=int(mem.generated_code_size_in_bytes),
            alias=int(mem.alias_size_in_bytes),
        )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0))
        bytes_accessed = float(cost.get("bytes accessed", 0.0))
        kernels = compiled_kernels(compiled.as_text())
    per_device["total"] = (
        per_device["arguments"]
        + per_device["temp"]
        + per_device["output"]
        + per_device["generated_code"]
        - per_device["alias"]
    )
    return Plan(
        topology=topology,
        chip=chip,
        devices=len(devices),
        mesh={"data": data, "model": model_axis},
        fsdp=fsdp,
        tokens_per_step=n_tokens,
        per_device_bytes=per_device,
        argument_breakdown=breakdown,
        largest_arrays=largest,
        flops_per_step=flops,
        bytes_per_step=bytes_accessed,
        compile_s=time.perf_counter() - t0,
        compile_error=error,
        pallas_kernels=kernels,
    )
