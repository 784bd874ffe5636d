"""The sections of a run config (`training.config.RunConfig`): `run`, `model`, `data` (its
sources and their rollouts), `dictionaries` (one `DictionarySpec` each), `train`, `mesh`,
`checkpoint`, `eval`, `export`, `report`, `finetune`, as frozen dataclasses with their
defaults and per-field bounds (`yaml_schema.field`). Checks that need more than one field are
`training.config_checks`.
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Any, Literal

from gemmascope_jax.dictionaries.config import (
    DEFAULT_MATRYOSHKA_FRACTIONS,
    KIND_NAMES,
    DictionaryConfig,
    matryoshka_widths,
)
from gemmascope_jax.training.yaml_schema import field as _f

SOURCE_TYPES = ("txt", "jsonl", "parquet", "datasets", "embedded", "rollouts")
LOSS_TOKENS = ("all", "response", "prompt")  # data.sources.N.loss_tokens (chat_loss_flags)


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
    # divide each site by one scalar so that E||x||^2 = 1 ("unit", GS2) or = d ("sqrt_d",
    # SAELens' expected_average_only_in); bandwidth / threshold_init / lr are in these units
    normalization: Literal["unit", "sqrt_d"] = "unit"
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
    # CLT / crosscoder only: start from single-layer exports, one per source layer, by the
    # GS2 prefix init (TR §3.3, `training.init_from.prefix_init`): a path with `{layer}`
    # (the model layer), e.g. runs/tc/export/transcoder_{layer}/native.
    init_from_layers: str | None = None

    @property
    def matryoshka_widths(self) -> tuple[int, ...] | None:
        """Cumulative prefix widths ending at `width`, or None (see `_parse_matryoshka`)."""
        m = self.matryoshka
        if m is None:
            return None
        if m is True or isinstance(m[0], float):
            fracs = DEFAULT_MATRYOSHKA_FRACTIONS if m is True else tuple(m)
            widths = list(matryoshka_widths(self.width, fracs))
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
    threshold_init: float = _f(0.001, min=0)  # JumpReLU θ at step 0 (GS2 0.001)
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
