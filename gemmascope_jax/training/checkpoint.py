"""Orbax checkpoints of a training run: save every N steps and on SIGTERM, keep the last k,
restore the latest directly onto the mesh.

    ckpt = Checkpointer(cfg.checkpoint_dir, keep=3, every_steps=1000)
    if (restored := ckpt.restore(abstract_like(state))) is not None:
        state, extras, start = restored          # extras: the JSON dict given to save
    for step in range(start + 1, steps + 1):     # `step` = optimizer steps completed
        state = train_step(state, batch)
        if ckpt.should_save(step):               # every N steps, or SIGTERM was received
            ckpt.save(step, state, {"data": it_state, "norm": scalars, "config": cfg_dict})
        if ckpt.stop_requested(step):            # SIGTERM: saved above, leave the loop
            break
    ckpt.close()

`state` is any pytree of arrays (params, optimizer state, typed PRNG keys, which are stored
as their key data). Each process writes its own shards of `state` (orbax); `extras` is one
JSON document per process (`extras/process_{i}-of-{n}.json`, via grain's handler), so
per-host data-iterator states survive multi-host runs. `restore` takes an abstract target
(`jax.ShapeDtypeStruct`s with shardings, e.g. from `abstract_like` or `nnx.eval_shape`) and
places every restored array with that sharding, whatever mesh wrote it.

Atomicity: orbax writes `<step>.orbax-checkpoint-tmp-*`, writes `commit_success.txt`, then
renames. Opening a directory deletes leftover tmp dirs and renames step dirs lacking
`commit_success.txt` (a crash mid-save, a partial copy) to `<step>.incomplete-<time>`, so
they are never restored.

Corruption (a power cut or a bad disk after the commit): every save records a fingerprint of
each state array in the extras (an exact modular checksum of its bits, the same on any mesh),
and `restore` recomputes it. A newest step that fails to read or whose fingerprint differs
(truncated, zeroed, bit-flipped or missing files) is skipped with a warning naming the step;
once an older step restores, the bad ones are renamed to `<step>.corrupt-<time>` so the run
can write that step again. With several processes every process tries process 0's list of
steps in the same order, a step counts as good only when it restored on every process (one
vote per step tried: a shard one host cannot read sends all of them back a step), and only
process 0 renames the bad ones; every process thus resumes from the same step.
Saves are synchronous by default (on CPU the copy is the cost anyway); `async_save=True`
overlaps writing with training, and `close()`/`wait()` block until it is on disk.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)
COMMIT_FILE = "commit_success.txt"
FINGERPRINT_KEY = "_gemmascope_jax_state_fingerprint"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose restored arrays do not match the fingerprint saved with them."""


def _bits_u32(x):
    """The bits of `x` as uint32 elements (wider dtypes split in halves, narrower widened)."""
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")


@jax.jit
def _fingerprint_leaves(leaves):
    """Per leaf: sum_i bits[i] * (2 i + 1) mod 2**32. Integer sums wrap exactly, so the
    value does not depend on sharding or reduction order; any single changed bit changes it."""
    import jax.numpy as jnp

    out = []
    for leaf in leaves:
        bits = _bits_u32(leaf).reshape(-1)
        odd = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.sum(bits * odd, dtype=jnp.uint32))
    return out


def state_fingerprint(state) -> dict[str, int]:
    """{tree path: fingerprint} of a pytree of arrays (typed PRNG keys as their key data)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_keys_to_data(state))
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    values = _fingerprint_leaves([leaf for _, leaf in flat])
    return {n: int(v) for n, v in zip(names, values, strict=True)}


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (one small collective when there are several:
    call it at the same point on every process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _process_0_steps(steps: list[int]) -> list[int]:
    """Process 0's list of steps on every process (two small broadcasts when there are
    several), so all of them try the same steps in the same order."""
    if jax.process_count() == 1:
        return list(steps)
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.zeros(n, np.int64)
    mine[: min(n, len(steps))] = steps[:n]
    return [int(x) for x in multihost_utils.broadcast_one_to_all(mine)]


class Restored(NamedTuple):
    state: Any
    extras: dict
    step: int


def abstract_like(tree):
    """`jax.ShapeDtypeStruct`s (with each array's sharding) for a pytree of arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(x):
    """The abstract key data of an abstract typed key, sharded like the key (+ None dims)."""
    out = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        extra = (None,) * (out.ndim - len(x.shape))
        spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec, *extra))
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)


def _to_json(x):
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"extras must be JSON-serialisable, got {type(x).__name__}: {x!r}")


class _JsonItem:
    """A JSON document behind grain's per-process checkpoint handler (get/set_state)."""

    def __init__(self, value=None):
        self.value = value

    def get_state(self) -> bytes:
        return json.dumps(self.value, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.value = json.loads(state)

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Save / restore a training state with orbax (see the module docstring).

    directory: where step folders live (created). keep: newest checkpoints kept.
    every_steps: `should_save` period (0: only on request). async_save: background writes.
    handle_sigterm: install the SIGTERM handler (main thread only; restored by `close`).
    """

    def __init__(
        self,
        directory,
        *,
        keep: int = 3,
        every_steps: int = 1000,
        async_save: bool = False,
        handle_sigterm: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.every_steps = every_steps
        self._stop = threading.Event()
        self._stop_checked: tuple[int | None, bool] = (None, False)
        self._previous_handler = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._quarantine_incomplete()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if handle_sigterm:
            self.install_signal_handler()

    @classmethod
    def from_config(cls, cfg, **kw) -> Checkpointer:
        """From a `RunConfig` (its `checkpoint` section and `checkpoint_dir`)."""
        c = cfg.checkpoint
        kw = {"keep": c.keep, "every_steps": c.every_steps, "async_save": c.async_save, **kw}
        return cls(cfg.checkpoint_dir, **kw)

    # ---- stop requests (SIGTERM) -----------------------------------------------------------

    def install_signal_handler(self, signum: int = signal.SIGTERM) -> bool:
        """Make `signum` request a save-and-stop at the next step boundary; a second signal
        goes to the previous handler (by default: terminate). False off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: no %s handler installed", signum)
            return False
        self._signum = signum
        self._previous_handler = signal.signal(signum, self._on_signal)
        return True

    def _on_signal(self, signum, frame):
        if self._stop.is_set() and callable(self._previous_handler):
            return self._previous_handler(signum, frame)
        if self._stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            return signal.raise_signal(signum)
        log.warning(
            "signal %d: saving a checkpoint at the next step boundary, then stopping", signum
        )
        self._stop.set()

    def request_stop(self) -> None:
        """What the signal handler does: ask the loop to save and stop."""
        self._stop.set()

    def stop_requested(self, step: int | None = None) -> bool:
        """Whether to save and stop now. With several processes the answer is agreed (any
        process's request counts; a small collective, cached per `step`): call it at the same
        steps on every process."""
        if jax.process_count() == 1:
            return self._stop.is_set()
        if step is not None and self._stop_checked[0] == step:
            return self._stop_checked[1]
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self._stop.is_set()))
        result = bool(np.max(flags))
        self._stop_checked = (step, result)
        return result

    def should_save(self, step: int) -> bool:
        """True every `every_steps` steps and when a stop was requested."""
        periodic = self.every_steps > 0 and step % self.every_steps == 0
        return periodic or self.stop_requested(step)

    # ---- save / restore --------------------------------------------------------------------

    def save(self, step: int, state, extras: dict | None = None) -> bool:
        """Write `state` (pytree of arrays) and `extras` (JSON dict) as checkpoint `step`.
        False if `step` is already saved. Call on every process."""
        if step in self.all_steps():
            return False
        doc = json.loads(json.dumps(extras or {}, default=_to_json))
        if FINGERPRINT_KEY in doc:
            raise ValueError(f"extras key {FINGERPRINT_KEY!r} is reserved")
        doc[FINGERPRINT_KEY] = state_fingerprint(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            extras=grain_ckpt.CheckpointSave(_JsonItem(doc)),
        )
        saved = self.manager.save(step, args=args, force=True)
        log.info("checkpoint %d -> %s", step, self.directory)
        return bool(saved)

    def restore(self, abstract_state=None, step: int | None = None) -> Restored | None:
        """(state, extras, step) of checkpoint `step` (default: the newest readable one), the
        arrays placed with the shardings of `abstract_state`; None when there is none."""
        steps = [step] if step is not None else _process_0_steps(self.all_steps())[::-1]
        first_error, bad = None, []
        for s in steps:
            try:
                restored, error = self._restore(abstract_state, s), None
            except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
                restored, error = None, e
            if step is None and not _on_every_process(error is None):
                # Every process votes, so all of them skip the same steps and stop at the
                # same one, even when only one host's shards of this step are damaged.
                e = error or CorruptCheckpointError(
                    f"checkpoint step {s} in {self.directory} failed to restore on another process"
                )
                first_error = first_error or e
                bad.append(s)
                log.warning(
                    "checkpoint step %d in %s is unreadable or corrupt (%s: %s); trying the "
                    "previous step",
                    s,
                    self.directory,
                    type(e).__name__,
                    str(e)[:500],
                )
                continue
            if error is not None:
                raise error
            if bad:
                self._quarantine(bad)
                log.warning(
                    "resuming from checkpoint step %d: newer step(s) %s were corrupt", s, bad
                )
            return restored
        if first_error is not None:
            raise first_error
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Rename corrupt step dirs (process 0) so they are neither listed nor in the way of
        saving that step again; kept on disk for inspection."""
        if jax.process_index() == 0:
            for s in steps:
                path = self.directory / str(s)
                target = path.with_name(f"{s}.corrupt-{int(time.time())}")
                log.warning("checkpoint step %d is corrupt; moved to %s", s, target.name)
                path.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gemmascope_jax.checkpoint.quarantine")
        self.manager.reload()

    def _restore(self, abstract_state, step: int) -> Restored:
        target = None
        if abstract_state is not None:
            target = jax.tree.map(
                lambda x: _abstract_key_data(x) if _is_key(x) else x, abstract_state
            )
        item = _JsonItem()
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                extras=grain_ckpt.CheckpointRestore(item),
            ),
        )
        state = restored.state
        extras = dict(item.value or {})
        expected = extras.pop(FINGERPRINT_KEY, None)
        if expected is not None:
            got = state_fingerprint(state)
            if bad := sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k)):
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory}: restored array(s) {bad[:5]} "
                    "do not match the fingerprint saved with them (corrupt data files)"
                )
        if abstract_state is not None:
            state = jax.tree.map(
                lambda a, x: (
                    jax.random.wrap_key_data(x, impl=a.dtype._impl.name) if _is_key(a) else x
                ),
                abstract_state,
                state,
            )
        return Restored(state, extras, int(step))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return max(steps) if steps else None

    def all_steps(self) -> list[int]:
        """Steps with a complete (committed) checkpoint, ascending."""
        self.manager.reload()
        done = (self.directory / str(s) / COMMIT_FILE for s in self.manager.all_steps())
        return sorted(s for s, f in zip(self.manager.all_steps(), done, strict=True) if f.exists())

    def wait(self) -> None:
        """Block until an async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(self._signum, self._previous_handler)
            self._previous_handler = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _quarantine_incomplete(self) -> None:
        """Rename step dirs without a commit marker (process 0), so orbax never lists them."""
        if jax.process_index() == 0:
            for path in self.directory.iterdir():
                if path.is_dir() and path.name.isdigit() and not (path / COMMIT_FILE).exists():
                    target = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
                    log.warning("checkpoint %s is incomplete; moved to %s", path, target.name)
                    path.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gemmascope_jax.checkpoint.scan")
