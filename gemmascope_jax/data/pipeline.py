"""The main job's input pipeline as one object: text -> global, sharded, normalised batches.

    pipeline = ActivationPipeline(cfg, model, tok, step.sites, train_docs, step)
    mean_batch = pipeline.init_norm_scalars()   # or pipeline.set_state(checkpoint extras)
    batch = next(pipeline)                       # {site: jax.Array [batch_tokens, d]}
    extras = pipeline.get_state()                # {"data": ..., "norm_scalars": ...}

Stages: packed tokens of this process's data shards -> the language model's forward to the
deepest needed site, jitted with explicit shardings (`sharded_forward`: parameters as
`load_gemma3(mesh=...)` placed them, tokens and sites split over `data`) -> BOS/pad dropped and
shuffled (`ActivationStream`) or the on-disk activation cache (written on first use) -> divided
by the per-site normalisation scalars -> placed with the train step's batch shardings.

Where the bytes live. Live stream, one process: the site arrays stay on the device from the
forward to the train step (`ActivationStream(on_device=True)`; the host only computes, from
the tokens, which rows are kept and their shuffled order). The cache path reads rows from disk
on the host and puts each batch once. The norm-scalar estimate (float64 sums on the host) and,
with several processes, the live stream (global arrays are assembled from host data; the model
is then replicated per process, see `model_mesh`) also go through the host.

Prefetch. A background thread (`Prefetcher`) produces up to `prefetch` batches ahead, so token
packing, cache reads and dispatches overlap the device's train step. Each queued batch carries
the data state *after* it, and `get_state` is the state after the batch the consumer took
last, so a checkpoint never skips the batches that were produced but not yet trained on.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gemmascope_jax.data.activations import ActivationStream, estimate_norm_scalars, normalize
from gemmascope_jax.data.cache import ActivationCacheReader, read_manifest, write_activation_cache
from gemmascope_jax.data.corpus import embedded_corpus, open_source
from gemmascope_jax.data.packing import PackedTokens
from gemmascope_jax.data.rollouts import rollout_documents
from gemmascope_jax.data.shards import (
    ShardedBatches,
    combine_norm_scalars,
    concat_batches,
    local_shards,
)
from gemmascope_jax.data.sources import ConcatSource, LossTokensSource, split_documents

log = logging.getLogger(__name__)
DEFAULT_PREFETCH = 2
HELDOUT_FRACTION = 0.1  # of a run's documents, held out by source (`split_documents`)
Batch = dict[str, Any]


# ---- the language model on the mesh ------------------------------------------------------------


def model_mesh(mesh: Mesh) -> Mesh | None:
    """The mesh the language model is loaded onto: the run's mesh with one process. With
    several, None: each process keeps a whole copy and runs the forward of its own data shard
    (the held-out and splice evals mix the model with dictionaries on the global mesh)."""
    return mesh if jax.process_count() == 1 else None


def sharded_forward(model, sites: Sequence[str]) -> Callable:
    """`forward(tokens [B, T], mask [B, T] | None) -> {site: [B, T, d]}`, the forward to the
    deepest site, jitted with explicit shardings: parameters where they are (`load_gemma3(...,
    mesh=...)` placed each one), tokens and sites split over `data` when it divides B."""
    graphdef, params = nnx.split(model)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    shardings = {a.mesh for a in jax.tree.leaves(param_shardings) if hasattr(a, "mesh")}
    mesh = shardings.pop() if len(shardings) == 1 else None
    sites = tuple(sites)

    def run(params, tokens, mask):
        out = nnx.merge(graphdef, params)(tokens, attention_mask=mask, capture=sites, logits=False)
        return out.sites

    compiled: dict[tuple[int, bool], Callable] = {}

    def program(batch: int, masked: bool) -> Callable:
        if (batch, masked) not in compiled:
            if mesh is None:
                compiled[batch, masked] = jax.jit(run)
            else:
                split = batch % mesh.shape["data"] == 0
                rows = NamedSharding(mesh, PartitionSpec("data" if split else None))
                compiled[batch, masked] = jax.jit(
                    run,
                    in_shardings=(param_shardings, rows, rows if masked else None),
                    out_shardings=dict.fromkeys(sites, rows),
                )
        return compiled[batch, masked]

    def forward(tokens, mask=None) -> dict[str, jax.Array]:
        return program(tokens.shape[0], mask is not None)(params, tokens, mask)

    return forward


# ---- prefetch ------------------------------------------------------------------------------------


class _End:
    """Queue marker: the source is exhausted."""


class _Failure:
    """Queue marker: the producer raised `error` (re-raised in the consumer, traceback kept)."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Iterator):
    """`produce(next(source))` computed up to `depth` items ahead in a background thread.

    `source` has `get_state`/`set_state`; `get_state()` here is the source's state after the
    last item *returned*, whatever the thread has read since. `depth=0` runs inline.
    """

    def __init__(self, source, produce: Callable[[Any], Any] = lambda x: x, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source, self.produce, self.depth = source, produce, depth
        self._state = copy.deepcopy(source.get_state())
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self.depth == 0:
            item = self.produce(next(self.source))
            self._state = copy.deepcopy(self.source.get_state())
            return item
        if self._thread is None:
            self._start()
        got = self._queue.get()
        if isinstance(got, _End):
            self._done = True
            raise StopIteration
        if isinstance(got, _Failure):
            self._done = True
            raise got.error
        item, self._state = got
        return item

    def get_state(self) -> Any:
        return copy.deepcopy(self._state)

    def set_state(self, state: Any) -> None:
        self._halt()
        self.source.set_state(copy.deepcopy(state))
        self._state, self._done = copy.deepcopy(state), False

    def close(self) -> None:
        """Stop the thread (the source keeps the position of the producer, not the consumer)."""
        self._halt()

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self.produce(next(self.source))
                if not self._put((item, copy.deepcopy(self.source.get_state()))):
                    return
        except StopIteration:
            self._put(_End())
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None


# ---- the run's documents -----------------------------------------------------------------------


def run_documents(cfg, model=None, tok=None, progress: bool = True):
    """The documents of `cfg.data.sources`, concatenated: `rollouts` sources are generated with
    `model` (or reused), chats of a source with `loss_tokens` other than "all" are tagged for
    the loss mask."""
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


def split_run_documents(cfg, model=None, tok=None, progress: bool = True):
    """(training, held-out) documents of the run: `HELDOUT_FRACTION` held out by source with
    the data seed, as the trainer, the finetune stage and `evaluate --data` all split."""
    docs = run_documents(cfg, model, tok, progress=progress)
    return split_documents(docs, holdout=HELDOUT_FRACTION, seed=cfg.data.seed)


# ---- the pipeline --------------------------------------------------------------------------------


def packed_tokens(
    cfg, tok, docs, *, epochs: int | None, seed_offset: int = 0, shard=None, loss_mask=False
):
    """Packed windows of data shard `shard = (index, count)` (default: one per process);
    with `loss_mask`, `{"tokens", "loss_mask"}` batches (`PackedTokens`)."""
    index, count = shard or (jax.process_index(), jax.process_count())
    return PackedTokens(
        docs,
        tok,
        seq_len=cfg.data.seq_len,
        batch_size=max(1, cfg.data.batch_size // count),
        seed=cfg.data.seed + seed_offset,
        num_epochs=epochs,
        shard_index=index,
        shard_count=count,
        loss_mask=loss_mask,
    )


def uses_loss_mask(cfg) -> bool:
    """Whether a data source restricts the trained tokens (`loss_tokens` not "all")."""
    return any(getattr(s, "loss_tokens", "all") != "all" for s in cfg.data.sources)


def activation_stream(
    cfg, forward, tok, sites, docs, batch_tokens, *, epochs, seed_offset=0, shard=None, **kw
) -> ActivationStream:
    """The shuffled activations of data shard `shard` (default: one per process)."""
    shard = shard or (jax.process_index(), jax.process_count())
    tokens = packed_tokens(
        cfg,
        tok,
        docs,
        epochs=epochs,
        seed_offset=seed_offset,
        shard=shard,
        loss_mask=uses_loss_mask(cfg),
    )
    return ActivationStream(
        None,
        sites,
        tokens,
        batch_tokens=batch_tokens,
        buffer_tokens=max(cfg.data.shuffle_buffer_tokens // shard[1], batch_tokens),
        seed=cfg.data.seed + seed_offset,
        forward=forward,
        **kw,
    )


def norm_scalars_of(cfg, model, tok, sites, docs) -> dict[str, float]:
    """Per-site normalisation scalars of `docs` estimated as the first stage does without an
    activation cache (`ActivationPipeline.init_norm_scalars`: `data.norm_tokens` tokens of
    the live stream with seed offset 1, one data shard), e.g. to unfold exported
    dictionaries for a finetune."""
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


class ActivationPipeline(Iterator[Batch]):
    """Global, sharded, normalised training batches `{site: jax.Array [batch_tokens, d]}`.

    cfg: the `RunConfig` (data, train.batch_tokens, train.steps, cache_dir); step: the
    `TrainStep` (its batch shardings); forward: `sharded_forward(model, sites)` by default.
    Writes missing activation caches on construction. Call `init_norm_scalars()` (fresh run)
    or `set_state(extras)` (resume) before the first `next`.
    """

    def __init__(
        self,
        cfg,
        model,
        tok,
        sites: Sequence[str],
        docs,
        step,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        forward: Callable | None = None,
    ):
        self.cfg, self.model, self.tok, self.docs, self.step = cfg, model, tok, docs, step
        self.sites = tuple(sites)
        self.forward = forward or sharded_forward(model, self.sites)
        self.shards, self.count = local_shards(cfg.data.shards)
        self.batch_tokens = cfg.train.batch_tokens // self.count  # per data shard
        self.on_device = cfg.cache_dir is None and jax.process_count() == 1
        self.scalars: dict[str, float] | None = None
        self._write_caches()
        batches = ShardedBatches([self._shard_batches(i) for i in self.shards])
        self._batches = Prefetcher(batches, self._finish, depth=prefetch)
        self._normalize_on_device = None

    # -- batches ---------------------------------------------------------------------------

    def __iter__(self) -> ActivationPipeline:
        return self

    def __next__(self) -> Batch:
        if self.scalars is None:
            raise RuntimeError("call init_norm_scalars() or set_state() before the first batch")
        return next(self._batches)

    def _finish(self, batch: Batch) -> Batch:
        """This process's raw batch -> the normalised global batch in the step's shardings."""
        if not self.on_device:
            return global_batch(self.step, normalize(batch, self.scalars))
        if self._normalize_on_device is None:
            shardings = self.step.batch_shardings(batch)
            self._normalize_on_device = jax.jit(_divide, out_shardings=shardings)
        scalars = {k: np.float32(self.scalars[k]) for k in batch}
        return self._normalize_on_device(batch, scalars)

    def _shard_batches(self, shard: int, seed_offset: int = 0):
        """Shard `shard`'s batches: its activation cache (which must exist) when the run has
        one, else a live stream; `seed_offset` picks an independent order (1: the norm
        estimate, read on the host)."""
        cfg = self.cfg
        if cfg.cache_dir is None:
            on_device = self.on_device and seed_offset == 0
            sharding = None
            if on_device and self.count == 1:
                rows = jax.ShapeDtypeStruct((self.batch_tokens, 1), jnp.float32)
                sharding = self.step.batch_shardings({"rows": rows})["rows"]
            return self._stream(
                self.batch_tokens,
                seed_offset=seed_offset,
                shard=(shard, self.count),
                on_device=on_device,
                batch_sharding=sharding,
            )
        return ActivationCacheReader(
            self._shard_cache(shard),
            self.batch_tokens,
            seed=cfg.data.seed + seed_offset,
            num_epochs=None,
            sites=self.sites,
        )

    def _stream(self, batch_tokens, *, epochs=None, docs=None, **kw) -> ActivationStream:
        docs = self.docs if docs is None else docs
        return activation_stream(
            self.cfg, self.forward, self.tok, self.sites, docs, batch_tokens, epochs=epochs, **kw
        )

    # -- activation cache ------------------------------------------------------------------

    def _shard_cache(self, shard: int) -> Path:
        return self.cfg.cache_dir / f"shard_{shard}_of_{self.count}"

    def _write_caches(self) -> None:
        """Write each of this process's shard caches that is missing or too small."""
        cfg = self.cfg
        if cfg.cache_dir is None:
            return
        needed = math.ceil(cfg.train.steps * self.batch_tokens / cfg.data.epochs)
        for i in self.shards:
            cache = self._shard_cache(i)
            if cache_ok(cache, self.sites, needed):
                continue
            log.info("writing the activation cache (%d tokens) to %s", needed, cache)
            stream = self._stream(self.batch_tokens, shard=(i, self.count))
            write_activation_cache(
                cache,
                _progress(stream, needed // self.batch_tokens + 1, "activation cache"),
                model=self.model.cfg.name,
                seq_len=cfg.data.seq_len,
                max_tokens=needed,
                replace_ours=True,  # never a folder the user made (issue 14)
            )

    # -- normalisation and checkpoints -----------------------------------------------------

    def init_norm_scalars(self) -> dict[str, jax.Array]:
        """Estimate the per-site scalars s with E||x/s||^2 = 1 (or d: `data.normalization`)
        over all data shards (each shard's first `data.norm_tokens / shards` tokens of a
        separate stream or of its cache, combined over processes); returns the first
        normalised global batch of those streams (for the data-mean init of `b_dec`)."""
        n_batches = max(1, self.cfg.data.norm_tokens // (self.batch_tokens * self.count))
        per_shard, firsts = [], []
        for i in self.shards:
            stream = self._shard_batches(i, seed_offset=1)
            per_shard.append(estimate_norm_scalars(stream, n_batches, self.cfg.data.normalization))
            firsts.append(next(stream))
            getattr(stream, "close", lambda: None)()
        self.scalars = combine_norm_scalars(per_shard)
        return global_batch(self.step, normalize(concat_batches(firsts), self.scalars))

    def get_state(self) -> dict[str, Any]:
        """Checkpoint extras: the data position of the next batch and the scalars."""
        return {"data": self._batches.get_state(), "norm_scalars": dict(self.scalars)}

    def set_state(self, extras: dict[str, Any]) -> None:
        """Resume from checkpoint extras written by `get_state`."""
        self.scalars = {k: float(v) for k, v in extras["norm_scalars"].items()}
        self._batches.set_state(extras["data"])

    def calibration_batch(self, docs, batch_tokens: int, seed_offset: int) -> dict:
        """One host batch of raw activations of `docs` (e.g. held-out, to calibrate)."""
        return next(self._stream(batch_tokens, docs=docs, seed_offset=seed_offset))

    def close(self) -> None:
        self._batches.close()
        self._batches.source.close()


def _divide(batch: Batch, scalars: dict[str, jax.Array]) -> Batch:
    """`{site: x / scalars[site]}` rounded as numpy rounds it (`normalize`): XLA rewrites a
    division by a broadcast scalar into a multiplication by its reciprocal, which can differ
    in the last bit, unless the barrier hides the broadcast."""
    return {
        k: x / jax.lax.optimization_barrier(jnp.broadcast_to(scalars[k], x.shape))
        for k, x in batch.items()
    }


def cache_ok(path: Path, sites, needed: int) -> bool:
    """Whether `path` holds a complete cache with `sites` and at least `needed` tokens."""
    try:
        manifest = read_manifest(path)
    except (ValueError, OSError):
        return False
    return set(sites) <= set(manifest["sites"]) and manifest["n_tokens"] >= needed


def _progress(it, total: int, desc: str):
    yield from tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def global_batch(step, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's host batch -> the global batch in the train step's shardings."""
    if jax.process_count() == 1:
        return step.put_batch(batch)
    shardings = step.batch_shardings(
        {
            s: jax.ShapeDtypeStruct((a.shape[0] * jax.process_count(), *a.shape[1:]), a.dtype)
            for s, a in batch.items()
        }
    )
    return {s: jax.make_array_from_process_local_data(shardings[s], a) for s, a in batch.items()}
