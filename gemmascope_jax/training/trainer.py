"""The main job: `gemmascope-jax train CONFIG [key=value ...]` end to end.

    text -> packed tokens (BOS first, this host's shard) -> Gemma 3 (loaded into its mesh
    shardings) forward returning only the needed sites -> BOS/pad dropped -> shuffle buffer
    (or the on-disk activation cache, written once and read for `data.epochs` epochs) ->
    per-site normalisation scalar (all of it `data.pipeline.ActivationPipeline`, prefetched
    in a background thread) -> sharded train step of every dictionary -> metrics (JSONL,
    TensorBoard, tqdm), orbax checkpoints (state + data-iterator position + scalars) every N
    steps and on SIGTERM ->
    held-out evals (FVU, L0, dead/dense, delta LM loss, KL: `evals.heldout`) -> scales folded
    into the weights -> exports (native, Gemma Scope 2, SAELens, circuit-tracer:
    `training.export`) -> report folder. This module is the loop; the dictionaries' settings
    come from `training.config.dictionary_trainings`, the documents from
    `data.pipeline.split_run_documents`.

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
from tqdm.auto import tqdm

from gemmascope_jax.data.pipeline import ActivationPipeline, model_mesh, split_run_documents
from gemmascope_jax.evals.heldout import HeldoutEval
from gemmascope_jax.gemma3.loading import load_gemma3
from gemmascope_jax.sharding import lm_rules, make_mesh
from gemmascope_jax.training.checkpoint import Checkpointer
from gemmascope_jax.training.config import RunConfig, dictionary_trainings
from gemmascope_jax.training.export import export_dictionaries, folded_dictionaries
from gemmascope_jax.training.init_from import init_from_exports
from gemmascope_jax.training.report import RunLogger, write_report
from gemmascope_jax.training.step import make_train_step

log = logging.getLogger(__name__)


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
    step = make_train_step(dictionary_trainings(cfg, model), mesh)
    sites = step.sites
    train_docs, heldout_docs = split_run_documents(cfg, model, tok, progress=lead)

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

    heldout = HeldoutEval(cfg, model, tok, sites, heldout_docs)
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
            folded = folded_dictionaries(step, state, scalars, pipeline, heldout_docs)
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

    dictionaries = folded_dictionaries(step, state, scalars, pipeline, heldout_docs)
    evals = heldout(dictionaries)
    logger.log_eval(final_step, evals)
    exports = export_dictionaries(cfg, dictionaries) if lead else {}
    cards = {}
    if lead:
        write_report(cfg.report_dir, logger.history, evals, exports, dictionaries)
        if cfg.eval.card and cfg.eval.heldout_tokens:
            cards = heldout.write_cards(dictionaries, Path(cfg.report_dir) / "cards")
    logger.close()
    ckpt.close()
    return RunResult(final_step, evals, exports, cfg.report_dir, cards=cards)


# ---- setup ------------------------------------------------------------------------------------


def _init_distributed(cfg: RunConfig) -> None:
    kwargs = cfg.mesh.distributed_kwargs()
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)


def _postfix(metrics, rate: float) -> dict[str, str]:
    out = {"tok/s": f"{rate:,.0f}"}
    for name, m in metrics.items():
        out[name[:12]] = f"L0 {float(m['l0']):.0f} mse {float(m['mse']):.3g}"
    return out


def summary_json(result: RunResult) -> str:
    """Compact JSON of the headline numbers (FVU, L0, delta loss) per dictionary."""
    keys = ("fvu", "l0", "dead_fraction", "delta_loss", "kl")
    head = {n: {k: e[k] for k in keys if k in e} for n, e in result.evals.items()}
    return json.dumps({"steps": result.steps, "evals": head}, indent=2)
