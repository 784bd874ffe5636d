"""Run configuration: a training run's schema as frozen dataclasses, loaded from YAML,
overridden by `key=value` and checked for meaning before any work.

    cfg = load_config("configs/demo.yaml", ["train.steps=100", "dictionaries.0.width=8192"],
                      device_count=jax.device_count())
    cfg.dictionaries[0].matryoshka_widths, cfg.checkpoint_dir, print(cfg.describe())

Sections (their dataclasses and defaults: `training.config_sections`): `run`, `model`,
`data`, `dictionaries` (plus an optional top-level `dictionary_defaults` merged into each),
`train`, `mesh`, `checkpoint`, `eval`, `export`, `report`, `finetune` (the end-to-end stage,
`training.finetune`); relative directories in `checkpoint`, `export`, `report`,
`data.cache_dir` are under `run.dir`. Meaning is checked by `training.config_checks` (sites
against the model depth, L0 < width, mesh vs device count, width divisible by the `model`
axis, ...), every problem at once in a `ConfigError` naming its dotted key. The generic
machinery (`extends`, YAML 1.2 floats, overrides, typed building with unknown-key
suggestions) is `training.yaml_schema`. This module is the whole run: `RunConfig`,
`load_config`, and `dictionary_trainings` (the run's settings per dictionary).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from gemmascope_jax.gemma3.config import Gemma3Config
from gemmascope_jax.gemma3.sites import resolve_site, site_width
from gemmascope_jax.training.config_checks import model_architecture, validate_run
from gemmascope_jax.training.config_sections import (
    CheckpointConfig,
    DataConfig,
    DictionarySpec,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    MeshConfig,
    ModelConfig,
    ReportConfig,
    RunSection,
    TrainConfig,
)
from gemmascope_jax.training.losses import LossConfig
from gemmascope_jax.training.optimizer import OptimizerConfig
from gemmascope_jax.training.step import DictionaryTraining
from gemmascope_jax.training.yaml_schema import (  # ConfigError and the loaders are re-exported
    ConfigError,  # noqa: F401
    apply_overrides,
    build_checked,
    dump_yaml,
    merge_defaults,
    parse_value,  # noqa: F401
    read_yaml,
    write_yaml,
)
from gemmascope_jax.training.yaml_schema import field as _f


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSection = _f(factory=RunSection)
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    dictionaries: tuple[DictionarySpec, ...] = ()
    train: TrainConfig = _f(factory=TrainConfig)
    mesh: MeshConfig = _f(factory=MeshConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    export: ExportConfig = _f(factory=ExportConfig)
    report: ReportConfig = _f(factory=ReportConfig)
    finetune: FinetuneConfig = _f(factory=FinetuneConfig)

    @classmethod
    def from_dict(cls, raw: dict, *, device_count: int | None = None) -> RunConfig:
        """Build and validate (see `validate`); ConfigError lists every problem."""
        problems: list[tuple[str, str]] = []
        raw = merge_defaults(raw, "dictionary_defaults", "dictionaries", DictionarySpec, problems)
        return build_checked(cls, raw, problems).validate(device_count=device_count)

    def to_dict(self) -> dict:
        """Plain JSON/YAML-safe dict; `RunConfig.from_dict(cfg.to_dict()) == cfg`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path) -> Path:
        """Write the resolved config as YAML (e.g. into the run dir)."""
        return write_yaml(path, self.to_dict(), f"resolved config of run {self.run.name!r}")

    def path(self, p: str | None) -> Path | None:
        """`p` under `run.dir` when relative."""
        return None if p is None else Path(self.run.dir or f"runs/{self.run.name}") / p

    checkpoint_dir = property(lambda self: self.path(self.checkpoint.dir))
    export_dir = property(lambda self: self.path(self.export.dir))
    report_dir = property(lambda self: self.path(self.report.dir))
    cache_dir = property(lambda self: self.path(self.data.cache_dir))

    def model_arch(self) -> Gemma3Config | None:
        return model_architecture(self.model)

    def validate(self, *, device_count: int | None = None) -> RunConfig:
        """Check meaning; return the resolved config (dictionary layers, canonical site
        names and names filled in, `run.dir` set). `device_count` enables the mesh checks."""
        return validate_run(self, device_count)

    def describe(self) -> str:
        """A few human-readable lines summarising the run."""
        arch, t = self.model_arch(), self.train
        depth = f"{arch.name}, {arch.num_layers} layers" if arch else "architecture unknown"
        srcs = ", ".join(s.type + (f" {s.path}" if s.path else "") for s in self.data.sources)
        cache = (
            f", cache {self.cache_dir} x {self.data.epochs} epochs" if self.data.cache_dir else ""
        )
        lines = [
            f"run {self.run.name} -> {self.run.dir}",
            f"model {self.model.source} ({depth}, {self.model.dtype})",
            f"data {srcs}; seq_len {self.data.seq_len}, {self.data.batch_size} seqs/forward{cache}",
            f"train {t.steps} steps x {t.batch_tokens} tokens = {t.steps * t.batch_tokens:,} "
            f"tokens; lr {t.lr:g} ({t.lr_schedule}, warmup {t.lr_warmup_steps}), "
            f"sparsity {t.sparsity_coeff:g} (warmup {t.sparsity_warmup_steps})",
            f"mesh data={self.mesh.data} model={self.mesh.model}"
            + (f", distributed {self.mesh.distributed}" if self.mesh.distributed else ""),
        ]
        for d in self.dictionaries:
            sparsity = f"k {d.k}" if d.k else f"L0 {d.l0_target:g}" if d.l0_target else ""
            sites = " -> ".join(
                ",".join(x) if len(x) < 5 else f"{x[0]}..{x[-1]} ({len(x)})"
                for x in (d.input_sites, d.output_sites)
            )
            m = d.matryoshka_widths
            lines.append(
                f"  {d.name}: {d.kind} {d.architecture} {sites} width {d.width} {sparsity}"
                + (f" matryoshka {'/'.join(map(str, m))}" if m else "")
            )
        return "\n".join(lines)


def load_config(path, overrides: Sequence[str] = (), *, device_count: int | None = None):
    """Read `path` (+ its `extends`), apply overrides, build and validate a `RunConfig`."""
    return RunConfig.from_dict(
        apply_overrides(read_yaml(path), overrides), device_count=device_count
    )


def dictionary_trainings(cfg: RunConfig, model) -> list[DictionaryTraining]:
    """Per dictionary of a validated run: its `DictionaryConfig` (widths from `model`'s
    sites), `LossConfig` and `OptimizerConfig`, with `train` settings overridden by the
    dictionary's own (`lr`, `sparsity_coeff`, ...)."""
    t, arch, out = cfg.train, model.cfg, []
    for spec in cfg.dictionaries:
        sites_in = spec.input_sites or ()
        sites_out = spec.output_sites or sites_in
        d_in = site_width(resolve_site(sites_in[0], arch.num_layers), arch)
        d_out = site_width(resolve_site(sites_out[0], arch.num_layers), arch)
        dcfg = spec.dictionary_config(
            d_in, d_out, model_name=arch.name, model_num_layers=arch.num_layers
        )
        loss = LossConfig(
            bandwidth=t.bandwidth,
            threshold_init=t.threshold_init,
            sparsity_coeff=spec.sparsity_coeff
            if spec.sparsity_coeff is not None
            else (t.sparsity_coeff),
            sparsity_warmup_steps=t.sparsity_warmup_steps,
            l0_target_init=spec.l0_target_init,
            l0_target_decay_steps=t.l0_target_decay_steps,
            l0_penalty=t.l0_penalty,
            freq_penalty_coeff=t.freq_penalty_coeff,
            freq_penalty_max=t.freq_penalty_max,
            aux_k=t.aux_k,
            aux_coeff=t.aux_coeff,
            dead_steps=t.dead_steps,
            sparse_k=spec.sparse_k,
            sparse_groups=spec.sparse_groups,
            topk_recall=spec.topk_recall,
        )
        optimizer = OptimizerConfig(
            lr=spec.lr if spec.lr is not None else t.lr,
            warmup_steps=t.lr_warmup_steps,
            warmup_init_fraction=t.lr_warmup_from,
            total_steps=t.steps,
            final_lr_fraction=t.lr_final_fraction if t.lr_schedule == "cosine" else 1.0,
            b1=t.adam_betas[0],
            b2=t.adam_betas[1],
            eps=t.adam_eps,
            grad_clip_norm=t.grad_clip_norm,
        )
        out.append(DictionaryTraining(dcfg, loss, optimizer, name=spec.name))
    return out
