"""Run configuration: a training run's schema as frozen dataclasses, loaded from YAML,
overridden by `key=value` and checked for meaning before any work.

    cfg = load_config("configs/demo.yaml", ["train.steps=100", "dictionaries.0.width=8192"],
                      device_count=jax.device_count())
    cfg.dictionaries[0].matryoshka_widths, cfg.checkpoint_dir, print(cfg.describe())

Sections (defaults below): `run`, `model`, `data`, `dictionaries` (plus an optional top-level
`dictionary_defaults` merged into each), `train`, `mesh`, `checkpoint`, `eval`, `export`,
`report`, `finetune` (the end-to-end stage, `training.finetune`); relative directories in
`checkpoint`, `export`, `report`, `data.cache_dir` are under `run.dir`. Meaning is checked
here (sites against the model depth, L0 < width, mesh vs device count, width divisible by
the `model` axis, ...), every problem at once in a `ConfigError`
naming its dotted key. The generic machinery (`extends`, YAML 1.2 floats, overrides, typed
building with unknown-key suggestions) is `training.yaml_schema`, so this module is the run's.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gemmascope_jax.dictionaries.activations import ACTIVATIONS, canonical_architecture
from gemmascope_jax.dictionaries.config import KIND_NAMES, SINGLE_LAYER_KINDS, DictionaryConfig
from gemmascope_jax.formats import canonical_format
from gemmascope_jax.gemma3.config import Gemma3Config, preset
from gemmascope_jax.gemma3.sites import resolve_site
from gemmascope_jax.training.yaml_schema import (  # ConfigError and the loaders are re-exported
    ConfigError,
    apply_overrides,
    build_checked,
    dump_yaml,
    merge_defaults,
    parse_value,  # noqa: F401
    read_yaml,
    write_yaml,
)
from gemmascope_jax.training.yaml_schema import field as _f

DEFAULT_MATRYOSHKA_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # groups; the rest is the last
SOURCE_TYPES = ("txt", "jsonl", "parquet", "datasets", "embedded", "rollouts")
LOSS_TOKENS = ("all", "response", "prompt")  # data.sources.N.loss_tokens (chat_loss_flags)
_DEPTH_UNKNOWN = 1 << 30


def _parse_matryoshka(value, key):
    """None/false: off; true: default fractions; floats in (0, 1) or "a/b" strings: group
    fractions (the rest is the last group); ints: cumulative prefix widths."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    items = [value] if isinstance(value, int | float | str) else value
    if not isinstance(items, list | tuple) or not items:
        raise TypeError("expected true/false, a list of fractions or a list of widths")
    out = []
    for x in items:
        if isinstance(x, str):
            try:
                x = float(fractions.Fraction(x.strip()))
            except (ValueError, ZeroDivisionError):
                raise TypeError(f"{x!r} is not a number or a fraction like 1/32") from None
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise TypeError(f"{x!r} is not a number")
        out.append(x)
    if all(isinstance(x, int) for x in out) or all(isinstance(x, float) for x in out):
        return tuple(out)
    raise TypeError("mix of ints (widths) and floats (fractions); use one kind")


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "run"
    dir: str | None = None  # None: runs/<name>


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    source: str = "embedded"  # transformers dir | hub id | .gguf file | "embedded"
    preset: str | None = None  # architecture ('270m', '1b', ...) when the source isn't read
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """`type: rollouts` sources: the model's own responses to chat prompts (`data.rollouts`),
    generated before training into `out` and reused while the settings are unchanged."""

    out: str | None = None  # JSONL of chats, under run.dir (None: rollouts/source_N.jsonl)
    max_new_tokens: int = _f(256, min=1)
    batch_size: int = _f(8, min=1)  # prompts per generate call
    temperature: float = _f(0.0, min=0)  # 0: greedy
    top_p: float = _f(1.0, min=0, max=1)
    seed: int = 0
    max_prompts: int | None = _f(None, min=1)  # the first N prompts only


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    type: Literal[SOURCE_TYPES] = "embedded"
    # file, glob or directory; not used by "embedded"; rollouts: the prompts JSONL (None or
    # "packaged": the packaged prompt set)
    path: str | None = None
    text_field: str = "text"  # with chat: the field holding the list of turns (rollouts: prompt)
    chat: bool = False  # render records with the Gemma 3 chat template
    # Which tokens of chat documents are trained on: all | response (assistant turns) | prompt.
    loss_tokens: Literal[LOSS_TOKENS] = "all"
    rollouts: RolloutConfig = _f(factory=RolloutConfig)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = _f(factory=lambda: (SourceConfig(),))
    seq_len: int = _f(1024, min=2)  # tokens per packed window, BOS first
    batch_size: int = _f(8, min=1)  # sequences per model forward (global)
    shuffle_buffer_tokens: int = _f(262_144, min=1)
    seed: int = 0
    cache_dir: str | None = None  # activation cache (write once, train `epochs` times)
    epochs: int = _f(1, min=1)
    norm_tokens: int = _f(65_536, min=1)  # tokens for the normalisation scalar estimate
    # Data shards (documents i::shards), default one per process; a multiple of the process
    # count. The global batch depends only on this, not on how many processes read it.
    shards: int | None = _f(None, min=1)


@dataclasses.dataclass(frozen=True)
class DictionarySpec:
    name: str | None = None  # None: "<kind>_<site>" (filled by validation)
    kind: Literal[KIND_NAMES] = "sae"
    architecture: str = "jumprelu"
    layers: tuple[int, ...] | Literal["all"] | None = None  # None: from input_sites
    input_sites: tuple[str, ...] | None = None  # our names or GS2/HF/TL hook strings
    output_sites: tuple[str, ...] | None = None
    width: int = _f(16_384, min=1)  # latents per source layer
    l0_target: float | None = _f(None, min=0)  # summed over source layers (GS2 `l0`)
    k: int | None = _f(None, min=1)  # topk / batchtopk: latents per token and source layer
    skip: bool | None = None  # None: True exactly for skip_transcoder
    matryoshka: Any = _f(None, parse=_parse_matryoshka)
    dtype: Literal["float32", "bfloat16"] = "float32"
    sparsity_coeff: float | None = _f(None, min=0)  # None: train.sparsity_coeff
    lr: float | None = _f(None, min=0)  # None: train.lr
    l0_target_init: float | None = _f(None, min=0)  # decays to l0_target (CLT, crosscoder)
    # Sparse decoder path: JumpReLU / BatchTopK decode their sparse_k largest codes per token
    # and source layer (CLTs: cost linear in depth); TopK always decodes sparsely.
    # topk_recall < 1 uses lax.approx_max_k with that recall (null: exact top-k).
    sparse_k: int | None = _f(None, min=1)
    # sparse_k/G per each of G latent ranges (TR App. B.2): G a multiple of mesh.model lets
    # every device select and decode only its own latent shard (docs/kernels.md).
    sparse_groups: int = _f(1, min=1)
    topk_recall: float | None = _f(None, min=0, max=1)
    # Start from an exported dictionary (any format `formats.load_dictionary` reads, in raw
    # activation units) instead of the GS2 init, e.g. an IT dictionary from the PT one.
    init_from: str | None = None

    @property
    def matryoshka_widths(self) -> tuple[int, ...] | None:
        """Cumulative prefix widths ending at `width`, or None (see `_parse_matryoshka`)."""
        m = self.matryoshka
        if m is None:
            return None
        if m is True or isinstance(m[0], float):
            fracs = DEFAULT_MATRYOSHKA_FRACTIONS if m is True else m
            sizes = [int(round(f * self.width)) for f in fracs]
            if sum(fracs) > 1 + 1e-9 or min(sizes) < 1 or sum(sizes) > self.width:
                raise ValueError(f"fractions {list(fracs)} do not split width {self.width}")
            if sum(sizes) < self.width and abs(sum(fracs) - 1) > 1e-9:
                sizes.append(self.width - sum(sizes))
            sizes[-1] += self.width - sum(sizes)
            widths = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        else:
            widths = list(m) if m[-1] == self.width else [*m, self.width]
        if any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or widths[0] < 1:
            raise ValueError(f"prefix widths {widths} are not increasing in 1..{self.width}")
        return tuple(widths)

    def dictionary_config(self, d_in: int, d_out: int, **kw) -> DictionaryConfig:
        """The `DictionaryConfig` this spec trains; d_in / d_out from the model's sites, `kw`
        more fields (model_name, model_num_layers, extra)."""
        same = ("kind", "architecture", "width", "layers", "input_sites", "output_sites")
        same += ("l0_target", "k", "skip", "matryoshka_widths", "dtype")
        kw["extra"] = {"name": self.name, **kw.get("extra", {})}
        return DictionaryConfig(d_in=d_in, d_out=d_out, **{n: getattr(self, n) for n in same}, **kw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loss settings shared by the dictionaries (names follow the training
    package's `OptimizerConfig` / `LossConfig`)."""

    steps: int = _f(100_000, min=1)
    batch_tokens: int = _f(4096, min=1)  # tokens per optimizer step (global)
    lr: float = _f(7e-5, min=0)
    lr_warmup_steps: int = _f(1000, min=0)  # cosine warmup from lr_warmup_from * lr
    lr_warmup_from: float = _f(0.1, min=0, max=1)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warmup
    lr_final_fraction: float = _f(0.0, min=0)  # cosine: lr at `steps` / lr
    sparsity_coeff: float = _f(1.0, min=0)  # lambda of the quadratic L0 penalty
    init_b_dec_mean: bool = False  # b_dec (and a free b_pre) start at the data mean, not 0
    sparsity_warmup_steps: int = _f(50_000, min=0)  # linear 0 -> lambda
    l0_penalty: Literal["batch", "token"] = "batch"  # square the batch-mean or each token's L0
    l0_target_decay_steps: int = _f(50_000, min=0)  # from dictionaries' l0_target_init
    # high-frequency penalty (0 = off); 3 removes every latent above freq_penalty_max (GS2 TR)
    freq_penalty_coeff: float = _f(3.0, min=0)
    freq_penalty_max: float = _f(0.1, min=0, max=1)
    bandwidth: float = _f(0.001, min=0)  # JumpReLU STE, in normalised units
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = _f(1e-8, min=0)
    grad_clip_norm: float | None = _f(None, min=0)
    aux_k: int | None = _f(None, min=1)  # topk / batchtopk auxiliary-k loss (None: d_out // 2)
    aux_coeff: float = _f(1 / 32, min=0)
    dead_steps: int = _f(1000, min=1)  # steps without firing before a latent counts as dead
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str  # host:port of process 0
    num_processes: int = _f(min=1)
    process_id: int = _f(min=0)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: the devices left over
    model: int = 1
    # Also split the language model's d_model axis over `data` (FSDP, `sharding.lm_rules`):
    # for models whose tensor-parallel slice alone is too big for a chip.
    fsdp: bool = False
    distributed: DistributedConfig | Literal["auto"] | None = None  # "auto": from env

    def shape(self, device_count: int) -> tuple[int, int]:
        """(data, model) for `device_count` devices; ValueError if impossible."""
        data, model = self.data, self.model
        if data == -1 and model > 0 and device_count % model == 0:
            data = device_count // model
        elif model == -1 and data > 0 and device_count % data == 0:
            model = device_count // data
        if data < 1 or model < 1 or data * model != device_count:
            raise ValueError(
                f"data={self.data} x model={self.model} does not fit {device_count} device(s)"
            )
        return data, model

    def distributed_kwargs(self) -> dict | None:
        """kwargs for `jax.distributed.initialize` ({} = from the environment), None = off."""
        if self.distributed is None:
            return None
        return {} if self.distributed == "auto" else dataclasses.asdict(self.distributed)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = _f(1000, min=0)  # 0: only at the end and on SIGTERM
    keep: int = _f(3, min=1)
    resume: bool = True
    async_save: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = _f(1000, min=0)  # 0: only at the end
    heldout_tokens: int = _f(65_536, min=0)
    splice: bool = True  # delta LM loss and KL with reconstructions spliced in
    # a quality card per dictionary at the end (report/cards/NAME: SAEBench core metrics and
    # plots, docs/evaluate.md; absorption is left to `gemmascope-jax evaluate`: minutes on CPU)
    card: bool = True


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("native", "gemma-scope-2", "saelens")
    dir: str = "export"


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    dir: str = "report"
    log_every: int = _f(10, min=1)  # metrics (JSONL, TensorBoard) every N steps
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end KL finetuning after the first stage (`training.finetune`, TR §2.4):
    `gemmascope-jax finetune CONFIG`; outputs under `<run.dir>/<dir>`."""

    init_from: str | None = None  # first stage's run dir (None: this run's checkpoints)
    beta: float = _f(1.0, min=0)  # L = (MSE + alpha*beta*KL) / (1 + beta) + sparsity
    steps: int = _f(1000, min=1)
    lr: float | None = _f(None, min=0)  # None: the first stage's (dictionary or train.lr)
    lr_warmup_steps: int = _f(0, min=0)
    batch_size: int | None = _f(None, min=1)  # data.seq_len windows per step (None: data's)
    kl_eps: float = _f(1e-8, min=0)  # alpha = MSE / (KL + kl_eps)
    dir: str = "finetune"  # checkpoints/, report/, export/ of the stage, under run.dir


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
        return _validate(self, device_count)

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


def model_architecture(model: ModelConfig) -> Gemma3Config | None:
    """The Gemma 3 architecture named by `model.preset` or readable cheaply from the source
    (embedded, a transformers dir's config.json, a GGUF header, a gemma-3-SIZE name)."""
    if model.preset:
        return preset(model.preset)
    source = str(model.source)
    if source == "embedded":
        return preset("270m")
    path = Path(source).expanduser()
    try:
        if (path / "config.json").is_file():
            return Gemma3Config.from_hf(json.loads((path / "config.json").read_text()))
        if path.is_file() and path.suffix.lower() == ".gguf":
            from gemmascope_jax.gemma3.gguf import GGUFCheckpoint

            return Gemma3Config.from_hf(GGUFCheckpoint(path).hf_config)
    except (OSError, ValueError):
        return None
    if m := re.search(r"gemma-?3-(270m|1b|4b|12b|27b)", source.lower()):
        return preset(m[1])
    return None


def _validate(cfg: RunConfig, device_count: int | None) -> RunConfig:
    problems: list[tuple[str, str]] = []
    add = problems.append
    try:
        arch = cfg.model_arch()
    except ValueError as e:
        arch = add(("model.preset", str(e)))
    depth = arch.num_layers if arch else None
    mesh, m, d, t = cfg.mesh, cfg.mesh.model, cfg.data, cfg.train
    data_axis, model_axis = (mesh.data if mesh.data > 0 else None), (m if m > 0 else None)
    if device_count is not None and min(mesh.data, m) >= -1 and 0 not in (mesh.data, m) != (-1, -1):
        try:
            data_axis, model_axis = mesh.shape(device_count)
        except ValueError as e:
            add(("mesh", str(e)))
    dist = mesh.distributed if isinstance(mesh.distributed, DistributedConfig) else None
    shards = d.shards or (dist.num_processes if dist else 1)
    # fmt: off
    for bad, key, msg in (
        (mesh.data == 0 or mesh.data < -1, "mesh.data", f"must be -1 or >= 1, got {mesh.data}"),
        (m == 0 or m < -1, "mesh.model", f"must be -1 or >= 1, got {m}"),
        (mesh.data == m == -1, "mesh", "at most one of data, model may be -1"),
        (dist and dist.process_id >= dist.num_processes, "mesh.distributed.process_id",
         "must be < mesh.distributed.num_processes"),
        (dist and not re.fullmatch(r".+:\d+", dist.coordinator_address),
         "mesh.distributed.coordinator_address", "expected host:port"),
        (dist and d.shards and d.shards % dist.num_processes, "data.shards",
         "must be a multiple of mesh.distributed.num_processes (each reads whole shards)"),
        (d.batch_size % shards, "data.batch_size",
         f"must split evenly over the {shards} data shards (one per process by default)"),
        (t.batch_tokens % shards, "train.batch_tokens",
         f"must split evenly over the {shards} data shards (one per process by default)"),
        (not d.sources, "data.sources", "at least one source"),
        (d.epochs > 1 and d.cache_dir is None, "data.epochs",
         "more than one epoch needs data.cache_dir (the activation cache)"),
        (d.shuffle_buffer_tokens < t.batch_tokens, "data.shuffle_buffer_tokens",
         f"must be >= train.batch_tokens ({t.batch_tokens})"),
        (data_axis and t.batch_tokens % data_axis, "train.batch_tokens",
         f"{t.batch_tokens} not divisible by the mesh data axis ({data_axis})"),
        (any(not 0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
         f"each beta must be in [0, 1), got {list(t.adam_betas)}"),
        (not cfg.dictionaries, "dictionaries", "at least one dictionary"),
    ):  # fmt: on
        if bad:
            add((key, msg))
    for i, src in enumerate(d.sources):
        if src.type not in ("embedded", "rollouts") and not src.path:
            add((f"data.sources.{i}.path", f"required for type {src.type!r}"))
    formats = []
    for i, fmt in enumerate(cfg.export.formats):
        try:
            formats.append(canonical_format(fmt))
        except ValueError as e:
            add((f"export.formats.{i}", str(e)))
    specs = [
        _validate_dict(spec, key, depth, model_axis, add)
        for key, spec in _per_layer_specs(cfg.dictionaries, depth)
    ]
    names = [s.name for s in specs if s is not None]
    for name in sorted({n for n in names if names.count(n) > 1}):
        add(("dictionaries", f"duplicate name {name!r}; set dictionaries.N.name"))
    if problems:
        raise ConfigError(problems)
    export = dataclasses.replace(cfg.export, formats=tuple(dict.fromkeys(formats)))
    run = dataclasses.replace(cfg.run, dir=cfg.run.dir or f"runs/{cfg.run.name}")
    return dataclasses.replace(cfg, run=run, dictionaries=tuple(specs), export=export)


def _per_layer_specs(specs, depth):
    """(config key, spec) pairs with every single-layer spec that lists several layers (or
    `all`) split into one spec per layer, named `<name>_<layer>`: `{kind: transcoder, layers:
    all}` is a whole-model transcoder set (exported as one circuit-tracer set)."""
    out = []
    for i, spec in enumerate(specs):
        key, layers = f"dictionaries.{i}", spec.layers
        if layers == "all" and depth is not None:
            layers = tuple(range(depth))
        single = spec.kind in SINGLE_LAYER_KINDS and spec.input_sites is None
        if not single or not isinstance(layers, tuple) or len(layers) < 2:
            out.append((key, spec))
            continue
        for layer in layers:
            name = f"{spec.name}_{layer}" if spec.name else None
            one = dataclasses.replace(spec, layers=(layer,), name=name)
            out.append((f"{key}[layer {layer}]", one))
    return out


def _validate_dict(d: DictionarySpec, key: str, depth, model_axis, add) -> DictionarySpec | None:
    bad = []

    def err(k, msg):
        bad.append(k)
        add((f"{key}.{k}" if k else key, msg))

    try:
        arch = canonical_architecture(d.architecture)
    except ValueError as e:
        err("architecture", str(e))
        arch = None
    layers = d.layers
    if layers == "all":
        if depth is None:
            err("layers", "'all' needs the model depth; set model.preset")
        layers = tuple(range(depth or 0))
    sites = {}
    for field in ("input_sites", "output_sites"):
        for j, name in enumerate(getattr(d, field) or ()):
            try:
                site = resolve_site(name, depth or _DEPTH_UNKNOWN)
                if depth is None and site.layer is not None and site.layer >= _DEPTH_UNKNOWN // 2:
                    raise ValueError("negative layer needs the model depth; set model.preset")
                sites.setdefault(field, []).append(site)
            except (ValueError, TypeError) as e:
                err(f"{field}.{j}", str(e))
    if layers is None:
        if d.input_sites is None:
            err("layers", "required (or give input_sites)")
        elif "input_sites" in sites and all(s.layer is not None for s in sites["input_sites"]):
            layers = tuple(s.layer for s in sites["input_sites"])
        elif "input_sites" in sites:
            err("layers", "required: an input site has no layer")
    if depth is not None and layers:
        for j, layer in enumerate(layers):
            if not 0 <= layer < depth:
                err(f"layers.{j}", f"layer {layer} out of range for a {depth}-layer model")
    n_src = len(layers or ()) or 1
    if d.l0_target is not None and d.l0_target <= 0:
        err("l0_target", f"must be > 0, got {d.l0_target:g}")
    elif d.l0_target is not None and d.l0_target >= d.width * n_src:
        err("l0_target", f"{d.l0_target:g} must be < width ({d.width * n_src} latents)")
    if arch == "jumprelu" and d.l0_target is None:
        err("l0_target", "required for jumprelu (the quadratic L0 penalty's target)")
    if arch in ACTIVATIONS and ACTIVATIONS[arch].needs_k and d.k is None:
        err("k", f"required for {arch}")
    if arch in ACTIVATIONS and not ACTIVATIONS[arch].needs_k and d.k is not None:
        err("k", f"only topk / batchtopk use k, not {arch}")
    if d.skip is not None and d.skip != (d.kind == "skip_transcoder") and d.kind != "clt":
        err("skip", f"kind {d.kind!r} cannot have skip={d.skip}")
    if d.k is not None and d.k > d.width:
        err("k", f"{d.k} must be <= width ({d.width})")
    if d.sparse_k is not None and arch not in (None, "jumprelu", "batchtopk"):
        err("sparse_k", f"bounds JumpReLU / BatchTopK codes; {arch} decodes sparsely with k")
    elif d.sparse_k is not None and d.sparse_k > d.width:
        err("sparse_k", f"{d.sparse_k} must be <= width ({d.width})")
    if d.sparse_groups > 1 and d.sparse_k is None:
        err("sparse_groups", "groups the slots of sparse_k, which is not set")
    elif d.sparse_k is not None and (d.sparse_k % d.sparse_groups or d.width % d.sparse_groups):
        err("sparse_groups", f"{d.sparse_groups} must divide sparse_k and width ({d.width})")
    if model_axis and d.width % model_axis:
        err("width", f"{d.width} not divisible by the mesh model axis ({model_axis})")
    try:
        _ = d.matryoshka_widths
    except ValueError as e:
        err("matryoshka", str(e))
    if d.name is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", str(d.name)):
        err(
            "name",
            f"{d.name!r}: use letters, digits, '_', '-', '.', not starting with '.' (it names "
            "folders inside the run folder, so '.', '..' and paths are refused)",
        )
    if bad:
        return None
    try:
        dc = dataclasses.replace(d, layers=layers).dictionary_config(1, 1, model_num_layers=depth)
    except ValueError as e:
        err("", str(e))
        return None
    where = dc.input_sites[0] if dc.num_layers == 1 else f"layers_{layers[0]}-{layers[-1]}"
    name = d.name or f"{d.kind}_{where.replace('.', '_')}"
    return dataclasses.replace(
        d,
        name=name,
        architecture=dc.architecture,
        layers=dc.layers,
        input_sites=dc.input_sites,
        output_sites=dc.output_sites,
        skip=dc.skip,
    )
