"""End-to-end KL finetuning of trained dictionaries (Gemma Scope 2 TR §2.4): the run.

    gemmascope-jax finetune CONFIG [key=value ...]     # the run config plus its `finetune:`

The loss and the jitted, sharded step are `training.finetune_step.FinetuneStep`.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from gemmascope_jax.training.config import dictionary_trainings
from gemmascope_jax.training.export import export_dictionaries, fold_scales
from gemmascope_jax.training.finetune_step import FinetuneStep
from gemmascope_jax.training.optimizer import OptimizerConfig
from gemmascope_jax.training.step import DictionaryTraining, TrainStep

log = logging.getLogger(__name__)
_DATA_SEED_OFFSET = 3  # token order of the finetune stage (0: first stage, 1: norm, 2: held-out)


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


def _folded(step, dictionaries, scalars) -> dict:
    return fold_scales(dict(zip(step.names, dictionaries, strict=True)), scalars)


def run_finetune(cfg) -> FinetuneResult:
    """Run (or resume) the finetune stage of a validated `RunConfig` (module docstring)."""
    from gemmascope_jax.data.pipeline import (
        model_mesh,
        norm_scalars_of,
        packed_tokens,
        split_run_documents,
        uses_loss_mask,
    )
    from gemmascope_jax.evals.heldout import HeldoutEval
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.sharding import lm_rules, make_mesh
    from gemmascope_jax.training.checkpoint import Checkpointer
    from gemmascope_jax.training.report import RunLogger, _scalars

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
    first = dictionary_trainings(cfg, model)
    stage1 = TrainStep(first, mesh, donate=False)
    train_docs, heldout_docs = split_run_documents(cfg, model, tok, progress=cfg.report.progress)
    start_dicts, scalars, started = _first_stage(
        cfg, stage1, lambda: norm_scalars_of(cfg, model, tok, stage1.sites, train_docs)
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

    heldout = HeldoutEval(cfg, model, tok, step.sites, heldout_docs)
    before = heldout(_folded(step, start_dicts, scalars))
    finetuned = _folded(step, step.dictionaries(state), scalars)
    after = heldout(finetuned)
    logger.log_eval(final, after)
    export_cfg = dataclasses.replace(
        cfg, export=dataclasses.replace(cfg.export, dir=str(Path(ft.dir) / "export"))
    )
    exports = export_dictionaries(export_cfg, finetuned)
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
