"""The main job: `gemmascope-jax train CONFIG [key=value ...]` end to end.

    text -> packed tokens (BOS first, this host's shard) -> Gemma 3 (loaded into its mesh
    shardings) forward returning only the needed sites -> BOS/pad dropped -> shuffle buffer
    (or the on-disk activation cache, written once and read for `data.epochs` epochs) ->
    per-site normalisation scalar (all of it `data.pipeline.ActivationPipeline`, prefetched
    in a background thread) -> sharded train step of every dictionary -> metrics (JSONL,
    TensorBoard, tqdm), orbax checkpoints (state + data-iterator position + scalars) every N
    steps and on SIGTERM ->
    held-out evals (FVU, L0, dead/dense, delta LM loss, KL) -> scales folded into the weights
    -> exports (native, Gemma Scope 2, SAELens, circuit-tracer) -> report folder.

A rerun of the same config resumes from the latest checkpoint and, because every random
choice is a function of (seed, step) and the data position is restored exactly, reaches the
same final parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from gemmascope_jax.data.activations import normalize
from gemmascope_jax.data.corpus import embedded_corpus, open_source
from gemmascope_jax.data.pipeline import ActivationPipeline, model_mesh, packed_tokens
from gemmascope_jax.data.rollouts import rollout_documents
from gemmascope_jax.data.sources import (
    ConcatSource,
    LossTokensSource,
    split_documents,
)
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.evals.metrics import evaluate
from gemmascope_jax.evals.saebench import keep_mask
from gemmascope_jax.evals.splice import splice_eval
from gemmascope_jax.formats import save_dictionary
from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.gemma3.loading import load_gemma3
from gemmascope_jax.gemma3.sites import resolve_site, site_width
from gemmascope_jax.gemma3.tokenizer import BOS_ID, PAD_ID
from gemmascope_jax.sharding import lm_rules, make_mesh
from gemmascope_jax.training.checkpoint import Checkpointer
from gemmascope_jax.training.config import RunConfig
from gemmascope_jax.training.init_from import init_from_exports
from gemmascope_jax.training.losses import LossConfig
from gemmascope_jax.training.optimizer import OptimizerConfig
from gemmascope_jax.training.report import RunLogger, write_report
from gemmascope_jax.training.step import DictionaryTraining, make_train_step

log = logging.getLogger(__name__)
HELDOUT_FRACTION = 0.1


@dataclasses.dataclass
class RunResult:
    """What a finished run produced: per-dictionary eval metrics and output locations."""

    steps: int
    evals: dict[str, dict[str, Any]]
    exports: dict[str, dict[str, str]]
    report_dir: Path
    stopped_early: bool = False
    cards: dict[str, Path] = dataclasses.field(default_factory=dict)  # name -> card.md


def run_training(cfg: RunConfig) -> RunResult:
    """Run (or resume) the training job described by a validated `RunConfig`."""
    _init_distributed(cfg)
    cfg = cfg.validate(device_count=jax.device_count())
    mesh = make_mesh(*cfg.mesh.shape(jax.device_count()))
    lead = jax.process_index() == 0
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.name}")
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")

    source = None if cfg.model.source == "embedded" else cfg.model.source
    model, tok = load_gemma3(
        source,
        dtype=cfg.model.dtype,
        mesh=model_mesh(mesh),
        rules=lm_rules(cfg.mesh.fsdp),
        progress=lead,
    )
    step = make_train_step(_trainings(cfg, model), mesh)
    sites = step.sites
    train_docs, heldout_docs = split_documents(
        _documents(cfg, model, tok, progress=lead), holdout=HELDOUT_FRACTION, seed=cfg.data.seed
    )

    ckpt = Checkpointer.from_config(cfg)
    restored = ckpt.restore(step.abstract_state()) if cfg.checkpoint.resume else None
    pipeline = ActivationPipeline(cfg, model, tok, sites, train_docs, step)
    try:
        return _train(cfg, model, tok, step, ckpt, restored, pipeline, heldout_docs, lead)
    finally:
        pipeline.close()


def _train(cfg, model, tok, step, ckpt, restored, pipeline, heldout_docs, lead) -> RunResult:
    sites = step.sites
    if restored is not None:
        state, start = restored.state, int(restored.step)
        pipeline.set_state(restored.extras)
        log.info("resumed from step %d", start)
    else:
        mean_batch = pipeline.init_norm_scalars()
        mean_batch = mean_batch if cfg.train.init_b_dec_mean else None
        state, start = step.init(seed=cfg.train.seed, mean_batch=mean_batch), 0
        state = init_from_exports(cfg, step, state, pipeline.scalars)
    scalars = pipeline.scalars

    heldout = _HeldoutEval(cfg, model, tok, sites, heldout_docs)
    logger = RunLogger(cfg.report_dir, tensorboard=cfg.report.tensorboard and lead, enabled=lead)
    bar = tqdm(
        total=cfg.train.steps,
        initial=start,
        unit="step",
        disable=not (cfg.report.progress and lead),
        desc="train",
    )
    stopped = False
    t0, tokens_done = time.perf_counter(), 0
    for i in range(start, cfg.train.steps):
        state, metrics = step(state, next(pipeline))
        tokens_done += cfg.train.batch_tokens
        done = i + 1
        if done % cfg.report.log_every == 0 or done == cfg.train.steps:
            rate = tokens_done / (time.perf_counter() - t0)
            logger.log_train(done, jax.device_get(metrics), tokens_per_s=rate)
            bar.set_postfix(_postfix(metrics, rate))
        bar.update(1)
        every = cfg.eval.every_steps
        if every and done % every == 0 and done < cfg.train.steps:
            folded = _folded(step, state, scalars, pipeline, heldout_docs)
            logger.log_eval(done, heldout(folded))
        stop = ckpt.stop_requested(done)
        if ckpt.should_save(done) or stop or done == cfg.train.steps:
            ckpt.save(done, state, extras=pipeline.get_state())
        if stop and done < cfg.train.steps:
            stopped = True
            break
    bar.close()
    ckpt.wait()
    final_step = int(jax.device_get(state.step))
    if stopped:
        ckpt.close()
        logger.close()
        return RunResult(final_step, {}, {}, cfg.report_dir, stopped_early=True)

    dictionaries = _folded(step, state, scalars, pipeline, heldout_docs)
    evals = heldout(dictionaries)
    logger.log_eval(final_step, evals)
    exports = _export(cfg, dictionaries) if lead else {}
    cards = {}
    if lead:
        write_report(cfg.report_dir, logger.history, evals, exports, dictionaries)
        if cfg.eval.card and cfg.eval.heldout_tokens:
            cards = _write_cards(cfg, model, tok, dictionaries, heldout)
    logger.close()
    ckpt.close()
    return RunResult(final_step, evals, exports, cfg.report_dir, cards=cards)


# ---- setup ------------------------------------------------------------------------------------


def _init_distributed(cfg: RunConfig) -> None:
    kwargs = cfg.mesh.distributed_kwargs()
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)


def _trainings(cfg: RunConfig, model) -> list[DictionaryTraining]:
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


def _documents(cfg: RunConfig, model=None, tok=None, progress: bool = True):
    """The run's documents; `rollouts` sources are generated with `model` (or reused), chats
    of a source with `loss_tokens` other than "all" are tagged for the loss mask."""
    parts = []
    for i, src in enumerate(cfg.data.sources):
        if src.type == "embedded":
            docs = embedded_corpus(src.path)
        elif src.type == "rollouts":
            docs = rollout_documents(cfg, i, model, tok, progress=progress)
        else:
            docs = open_source(src.path, field=src.text_field)
        parts.append(docs if src.loss_tokens == "all" else LossTokensSource(docs, src.loss_tokens))
    return parts[0] if len(parts) == 1 else ConcatSource(parts)


def _postfix(metrics, rate: float) -> dict[str, str]:
    out = {"tok/s": f"{rate:,.0f}"}
    for name, m in metrics.items():
        out[name[:12]] = f"L0 {float(m['l0']):.0f} mse {float(m['mse']):.3g}"
    return out


# ---- after training ---------------------------------------------------------------------------


def _scales(d_cfg, scalars):
    s_in = np.asarray([scalars[s] for s in d_cfg.input_sites], np.float32)
    s_out = np.asarray([scalars[s] for s in d_cfg.output_sites], np.float32)
    if not d_cfg.multilayer:
        return float(s_in[0]), float(s_out[0])
    return s_in, s_out


def _heldout_tokens(cfg, tok, docs) -> list[np.ndarray]:
    n_batches = max(1, cfg.eval.heldout_tokens // (cfg.data.seq_len * cfg.data.batch_size))
    tokens = packed_tokens(cfg, tok, docs, epochs=None, seed_offset=2)
    return [next(tokens) for _ in range(n_batches)]


def _folded(step, state, scalars, pipeline, heldout_docs):
    """Trained dictionaries with normalisation folded in (raw activations in and out);
    BatchTopK converted to JumpReLU thresholds calibrated on held-out activations."""
    out = {}
    for name, d in zip(step.names, step.dictionaries(state), strict=True):
        if d.cfg.architecture == "batchtopk":
            calib = normalize(pipeline.calibration_batch(heldout_docs, 4096, 3), scalars)
            x = _stack(d.cfg, calib, d.cfg.input_sites)
            d = d.to_jumprelu(x)
        s_in, s_out = _scales(d.cfg, scalars)
        out[name] = d.fold_input_scale(s_in, s_out).fold_pre_encoder_bias()
    return out


def _stack(d_cfg, batch, sites):
    if d_cfg.multilayer:
        return np.stack([batch[s] for s in sites], axis=-2)
    return batch[sites[0]]


class _HeldoutEval:
    """FVU/L0/dead/dense on held-out activations (raw units) and, if enabled, delta LM loss
    and KL with each dictionary spliced in. Held-out tokens and their activations are
    computed once and reused by every periodic eval."""

    def __init__(self, cfg, model, tok, sites, heldout_docs):
        self.cfg, self.model, self.tok, self.sites = cfg, model, tok, sites
        self.docs = heldout_docs
        self._data = None

    def _heldout(self):
        if self._data is None:
            tokens = _heldout_tokens(self.cfg, self.tok, self.docs)
            forward = self.model.jitted(capture=self.sites, logits=False)
            acts = [
                {s: np.asarray(v[:, 1:]) for s, v in forward(t).sites.items()} for t in tokens
            ]  # BOS is neither trained nor evaluated on
            self._data = tokens, acts
        return self._data

    def __call__(self, dictionaries) -> dict[str, dict[str, Any]]:
        if self.cfg.eval.heldout_tokens == 0:
            return {}
        tokens, acts = self._heldout()
        evals = {}
        for name, d in dictionaries.items():

            def pairs(d=d):
                for t, a in zip(tokens, acts, strict=True):
                    # the positions training uses: not <pad>, not a <bos> (the row's first is
                    # already cut; packed documents are separated by more of them)
                    valid = keep_mask(np.asarray(t[:, 1:]), ignore_ids=(PAD_ID, BOS_ID)).reshape(-1)
                    x, y = _stack(d.cfg, a, d.cfg.input_sites), _stack(d.cfg, a, d.cfg.output_sites)
                    yield x.reshape(-1, *x.shape[2:])[valid], y.reshape(-1, *y.shape[2:])[valid]

            result = evaluate(d, pairs())
            if self.cfg.eval.splice:
                result.update(splice_eval(self.model, d, tokens))
            evals[name] = result
        return evals


def _write_cards(cfg, model, tok, dictionaries, heldout) -> dict[str, Path]:
    """The quality card of each dictionary on the held-out tokens: report/cards/NAME."""
    from gemmascope_jax.evals.card import write_card

    tokens, _ = heldout._heldout()
    cards = {}
    for name, d in dictionaries.items():
        out = Path(cfg.report_dir) / "cards" / name
        write_card(d, model, tokens, out, tokenizer=tok, absorption=False)
        cards[name] = out / "card.md"
    return cards


TRANSCODER_SET = "transcoder_set"  # export name of the per-layer transcoders as one set


def _export(cfg, dictionaries) -> dict[str, dict[str, str]]:
    """Save every dictionary in every requested format. A format that cannot represent a
    dictionary (TopK in Gemma Scope 2, a CLT in SAELens, a single transcoder as a
    circuit-tracer set) is skipped with the reason recorded, not fatal after training.

    circuit-tracer holds CLTs and whole-model transcoder sets: when the run trained one
    transcoder per model layer (e.g. `{kind: transcoder, layers: all}`), they are exported
    together as `export/transcoder_set/circuit-tracer`."""
    out: dict[str, dict[str, str]] = {}
    set_members = _transcoder_set_members(dictionaries)
    for name, d in dictionaries.items():
        out[name] = {}
        for fmt in cfg.export.formats:
            if fmt == "circuit-tracer" and d.cfg.kind != "clt":
                out[name][fmt] = (
                    f"skipped: exported with the whole-model set as {TRANSCODER_SET}"
                    if name in set_members
                    else "skipped: circuit-tracer holds CLTs and whole-model transcoder sets "
                    "(train one transcoder per layer to get a set)"
                )
                continue
            out[name][fmt] = _save(d, cfg.export_dir / name / fmt, fmt, name)
    if set_members and "circuit-tracer" in cfg.export.formats:
        members = [dictionaries[n] for n in set_members]
        try:
            tset = TranscoderSet.from_transcoders(members)
        except ValueError as e:
            out[TRANSCODER_SET] = {"circuit-tracer": f"skipped: {e}"}
        else:
            path = cfg.export_dir / TRANSCODER_SET / "circuit-tracer"
            out[TRANSCODER_SET] = {"circuit-tracer": _save(tset, path, "circuit-tracer", "set")}
    return out


def _save(obj, path: Path, fmt: str, name: str) -> str:
    try:
        # replaces an export of an earlier run, never a folder gemmascope-jax did not write
        save_dictionary(obj, path, format=fmt, replace_ours=True)
    except (FormatError, FileExistsError) as e:
        log.warning("export of %s as %s skipped: %s", name, fmt, e)
        return f"skipped: {e}"
    return str(path)


def _transcoder_set_members(dictionaries) -> list[str]:
    """Names of the run's transcoders ordered by layer when they are exactly one per model
    layer (0..L-1), else []."""
    by_layer: dict[int, list[str]] = {}
    depth = None
    for name, d in dictionaries.items():
        if d.cfg.kind in ("transcoder", "skip_transcoder"):
            by_layer.setdefault(d.cfg.layers[0], []).append(name)
            depth = d.cfg.model_num_layers
    if depth is None or sorted(by_layer) != list(range(depth)):
        return []
    if any(len(names) != 1 for names in by_layer.values()):
        return []
    return [by_layer[layer][0] for layer in range(depth)]


def summary_json(result: RunResult) -> str:
    """Compact JSON of the headline numbers (FVU, L0, delta loss) per dictionary."""
    keys = ("fvu", "l0", "dead_fraction", "delta_loss", "kl")
    head = {n: {k: e[k] for k in keys if k in e} for n, e in result.evals.items()}
    return json.dumps({"steps": result.steps, "evals": head}, indent=2)
