"""Data shards independent of the process count.

The corpus is split into `count` shards (documents `i::count`); process p of P reads shards
`p*count/P .. (p+1)*count/P - 1` and its local batch is their batches concatenated in shard
order. The global batch is therefore the same for every process count that divides `count`:
one process with `data.shards=2` trains on exactly what two processes read together, which is
what makes a multi-host run reproducible on one machine (and resumable on another host count
with the same shards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, np.ndarray]


def local_shards(count: int | None) -> tuple[list[int], int]:
    """(this process's shard indices, total shard count); `count=None` means one shard per
    process."""
    processes, index = jax.process_count(), jax.process_index()
    count = processes if count is None else int(count)
    if count < 1 or count % processes:
        raise ValueError(
            f"data.shards = {count} must be a positive multiple of the process count "
            f"({processes}): every process reads the same number of shards"
        )
    per = count // processes
    return list(range(index * per, (index + 1) * per)), count


def concat_batches(parts: Sequence[Batch]) -> Batch:
    """Shard batches `{site: [tokens, ...]}` joined along tokens, in the given order; device
    arrays (`jax.Array`) are joined on the device."""
    if len(parts) == 1:
        return parts[0]
    on_device = isinstance(next(iter(parts[0].values())), jax.Array)
    concat = jnp.concatenate if on_device else np.concatenate
    return {site: concat([p[site] for p in parts]) for site in parts[0]}


class ShardedBatches(Iterator[Batch]):
    """Batches of several shard iterators concatenated along tokens, in shard order.

    Each shard iterator yields `{site: [tokens, ...]}` dicts and may have
    `get_state`/`set_state` (the cache reader, the activation stream); the state of this
    object is the list of their states, for checkpoints.
    """

    def __init__(self, shards: Sequence[Iterator[Batch]]):
        if not shards:
            raise ValueError("ShardedBatches needs at least one shard iterator")
        self.shards = list(shards)

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> Batch:
        return concat_batches([next(it) for it in self.shards])

    def get_state(self) -> dict[str, Any]:
        return {"shards": [it.get_state() for it in self.shards]}

    def set_state(self, state: dict[str, Any]) -> None:
        states = state.get("shards")
        if not isinstance(states, list) or len(states) != len(self.shards):
            found = len(states) if isinstance(states, list) else "no"
            raise ValueError(
                f"checkpointed data state has {found} shard states, this run reads "
                f"{len(self.shards)} shards (data.shards or the process count changed?)"
            )
        for it, s in zip(self.shards, states, strict=True):
            it.set_state(s)

    def close(self) -> None:
        """Close the shard iterators that hold resources (the cache reader's thread)."""
        for it in self.shards:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def combine_norm_scalars(per_shard: Sequence[dict[str, float]]) -> dict[str, float]:
    """Global per-site scalars from this process's per-shard scalars, gathered over processes.

    Each shard measured `s_i = sqrt(mean ||x||^2)` on the same number of tokens, so the global
    scalar is `sqrt(mean_i s_i^2)`, summed in shard order (identical for any process count)."""
    sites = sorted(per_shard[0])
    local = np.array([[s[site] for site in sites] for s in per_shard], np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Gather the float64 bits as uint32 pairs: JAX would round float64 to float32.
        bits = multihost_utils.process_allgather(local.view(np.uint32))
        local = np.asarray(bits, np.uint32).view(np.float64).reshape(-1, len(sites))
    return {site: float(np.sqrt(np.mean(local[:, j] ** 2))) for j, site in enumerate(sites)}
