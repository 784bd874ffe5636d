"""The main job's input pipeline (`data.pipeline`): device-resident activations equal the host
stream bit for bit, the prefetch thread runs ahead yet checkpoints the consumer's position,
producer errors reach the consumer, the model is tensor-parallel on a (data=2, model=4) mesh,
1 device and 8 simulated devices train the same parameters, and a SIGKILLed run resumes
exactly (subprocesses, so the device count does not leak)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gemmascope_jax.data.activations import ActivationStream, normalize
from gemmascope_jax.data.pipeline import (
    ActivationPipeline,
    Prefetcher,
    activation_stream,
    sharded_forward,
)
from gemmascope_jax.data.shards import concat_batches
from gemmascope_jax.gemma3.loading import load_gemma3
from gemmascope_jax.sharding import make_mesh
from gemmascope_jax.training.config import RunConfig, dictionary_trainings
from gemmascope_jax.training.step import make_train_step
from tests.test_data_activations import SITES, model, small_docs, tokens  # noqa: F401
from tests.test_data_packing import StubTokenizer, as_source

ROOT = Path(__file__).resolve().parents[1]


def run_config(model_dir, tmp_path, **data) -> RunConfig:
    raw = {
        "run": {"name": "pipe", "dir": str(tmp_path / "run")},
        "model": {"source": str(model_dir)},
        "data": {"seq_len": 16, "batch_size": 4, "shuffle_buffer_tokens": 256,
                 "norm_tokens": 128, **data},
        "dictionary_defaults": {"width": 64, "l0_target": 8},
        "dictionaries": [
            {"name": "sae", "kind": "sae", "input_sites": "resid_post.3"},
            {"name": "skip", "kind": "skip_transcoder", "layers": [2]},
        ],
        "train": {"steps": 8, "batch_tokens": 64, "lr": 1e-3, "lr_warmup_steps": 2,
                  "sparsity_warmup_steps": 2, "dead_steps": 4},
    }  # fmt: skip
    return RunConfig.from_dict(raw, device_count=jax.device_count())


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for s in a:
        x, y = np.asarray(a[s]), np.asarray(b[s])
        assert x.dtype == y.dtype and x.shape == y.shape, s
        assert x.tobytes() == y.tobytes(), s


# ---- device-resident stream ----------------------------------------------------------------


def test_device_stream_equals_host_stream_bit_for_bit(model):  # noqa: F811
    """The device-resident stream with the explicitly sharded forward gives the bits of the
    host stream with `model.jitted` (what the job used before)."""
    kw = dict(batch_tokens=24, buffer_tokens=60, seed=7, drop_remainder=False)
    host = list(ActivationStream(model, SITES, tokens(), **kw))
    kw["forward"] = sharded_forward(model, SITES)
    device = list(ActivationStream(None, SITES, tokens(), on_device=True, **kw))
    assert len(host) == len(device) > 5  # several chunk boundaries and a partial last batch
    for h, d in zip(host, device, strict=True):
        assert all(isinstance(v, jax.Array) for v in d.values())
        assert_same_bits(h, d)
    # resume in device mode from a JSON state inside the second chunk
    stream = ActivationStream(None, SITES, tokens(), on_device=True, **kw)
    for _ in range(3):
        next(stream)
    fresh = ActivationStream(None, SITES, tokens(), on_device=True, **kw)
    fresh.set_state(stream.get_state())
    for want in host[3:]:
        assert_same_bits(next(fresh), want)


# ---- prefetch ------------------------------------------------------------------------------


class Counter:
    """0, 1, 2, ... (up to `n`), each after `delay` s; raises at `fail_at`."""

    def __init__(self, n=None, delay=0.0, fail_at=None):
        self.i, self.n, self.delay, self.fail_at = 0, n, delay, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad item {self.i}")
        if self.i == self.n:
            raise StopIteration
        time.sleep(self.delay)
        self.i += 1
        return self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_prefetch_runs_ahead_and_checkpoints_the_consumer():
    produced = {i: threading.Event() for i in range(10)}

    def produce(i):
        produced[i].set()
        return i

    source = Counter()
    p = Prefetcher(source, produce, depth=2)
    assert next(p) == 0
    # batch 2 is produced while batch 1 waits, unconsumed, in the queue
    assert produced[2].wait(timeout=10)
    assert p.get_state() == {"i": 1} and source.i >= 3
    assert next(p) == 1 and p.get_state() == {"i": 2}
    resumed = Prefetcher(Counter(), depth=2)
    resumed.set_state(p.get_state())
    assert [next(resumed) for _ in range(3)] == [2, 3, 4]
    p.close()
    resumed.close()
    assert p._thread is None


def test_prefetch_overlaps_producer_and_consumer():
    n, delay = 8, 0.1
    p = Prefetcher(Counter(n, delay=delay), depth=2)
    t0 = time.perf_counter()
    for _ in p:
        time.sleep(delay)  # the "device step"
    wall = time.perf_counter() - t0
    assert wall < 1.5 * n * delay, wall  # ~ max(produce, consume), not their sum (2 n delay)
    with pytest.raises(StopIteration):  # the end of a finite stream, no hang
        next(p)


def test_producer_error_reaches_the_consumer_with_its_traceback():
    p = Prefetcher(Counter(fail_at=3), depth=2)
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3") as info:
        next(p)
    names = [entry.name for entry in info.traceback]
    assert "_run" in names and names[-1] == "__next__"  # the producer thread's frames, kept
    inline = Prefetcher(Counter(fail_at=1), depth=0)
    next(inline)
    with pytest.raises(ValueError, match="bad item 1"):
        next(inline)


# ---- the whole pipeline, one device --------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_tiny(hf_tiny_dir):
    mesh = make_mesh(1, 1)
    lm, _ = load_gemma3(hf_tiny_dir, mesh=mesh, tokenizer=False, progress=False)
    return lm, mesh


def pipeline(cfg, sharded_tiny, prefetch=2):
    lm, mesh = sharded_tiny
    step = make_train_step(dictionary_trainings(cfg, lm), mesh)
    docs = as_source(small_docs(200))
    return ActivationPipeline(cfg, lm, StubTokenizer(), step.sites, docs, step, prefetch=prefetch)


@pytest.mark.parametrize("shards", [1, 2])
def test_pipeline_batches_are_the_host_streams_normalised(
    sharded_tiny, hf_tiny_dir, tmp_path, shards
):
    """Device batches (forward, drop, shuffle, shard concat, normalisation all on the device)
    equal the host streams of every data shard, concatenated and normalised by numpy."""
    cfg = run_config(hf_tiny_dir, tmp_path, shards=shards)
    pipe = pipeline(cfg, sharded_tiny)
    pipe.init_norm_scalars()
    got = [next(pipe) for _ in range(6)]
    docs, tok = as_source(small_docs(200)), StubTokenizer()
    host = [
        activation_stream(cfg, pipe.forward, tok, pipe.sites, docs, 64 // shards,
                          epochs=None, shard=(i, shards))
        for i in range(shards)
    ]  # fmt: skip
    for g in got:
        want = normalize(concat_batches([next(h) for h in host]), pipe.scalars)
        assert_same_bits(g, want)
        assert all(isinstance(v, jax.Array) for v in g.values())
    pipe.close()


@pytest.mark.parametrize("cache", [False, True])
def test_pipeline_resumes_exactly_with_prefetch(sharded_tiny, hf_tiny_dir, tmp_path, cache):
    cfg = run_config(hf_tiny_dir, tmp_path, **({"cache_dir": "cache"} if cache else {}))
    pipe = pipeline(cfg, sharded_tiny, prefetch=2)
    pipe.init_norm_scalars()
    for _ in range(3):
        next(pipe)
    time.sleep(0.5)  # let the producer run ahead
    extras = pipe.get_state()
    want = [next(pipe) for _ in range(5)]
    pipe.close()
    fresh = pipeline(cfg, sharded_tiny, prefetch=3)
    fresh.set_state(extras)
    for w in want:
        assert_same_bits(next(fresh), w)
    fresh.close()


# ---- 8 simulated devices, SIGKILL ----------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from gemmascope_jax.data.pipeline import ActivationPipeline, model_mesh
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.sharding import lm_rules, make_mesh
    from gemmascope_jax.training.checkpoint import Checkpointer
    from gemmascope_jax.training.step import make_train_step
    from gemmascope_jax.training.config import dictionary_trainings
    from tests.test_data_activations import small_docs
    from tests.test_data_packing import StubTokenizer, as_source
    from tests.test_pipeline import run_config

    out, model_dir, run_dir, mode = sys.argv[1:5]
    data, model_axis = map(int, sys.argv[5:7])
    assert jax.device_count() == data * model_axis, jax.devices()
    mesh = make_mesh(data, model_axis)
    fsdp = data > 1  # 8 devices: FSDP over `data` as well as tensor parallel over `model`
    model, _ = load_gemma3(model_dir, mesh=model_mesh(mesh), rules=lm_rules(fsdp),
                           tokenizer=False, progress=False)
    kernel = model.layers[0].mlp.gate_proj.kernel
    if model_axis > 1:  # the language model is sharded, no device holds a whole weight
        assert kernel.sharding.spec == P("data" if fsdp else None, "model"), kernel.sharding
        assert kernel.addressable_shards[0].data.shape == (64 // data, 96 // model_axis)
    from pathlib import Path
    cfg = run_config(model_dir, Path(run_dir))
    step = make_train_step(dictionary_trainings(cfg, model), mesh)
    pipe = ActivationPipeline(cfg, model, StubTokenizer(), step.sites,
                              as_source(small_docs(200)), step, prefetch=2)
    ckpt = Checkpointer(Path(run_dir) / "ckpt", keep=2, every_steps=2, handle_sigterm=False)
    restored = ckpt.restore(step.abstract_state())
    if restored is None:
        state, start = step.init(seed=0, mean_batch=pipe.init_norm_scalars()), 0
    else:
        state, start = restored.state, restored.step
        pipe.set_state(restored.extras)
    for i in range(start, cfg.train.steps):
        batch = next(pipe)
        if i == 0:
            first = {f"batch.{k}": np.asarray(v) for k, v in batch.items()}
        if data > 1:
            assert batch["resid_post.3"].sharding.spec[0] == "data", batch["resid_post.3"].sharding
        state, _ = step(state, batch)
        if ckpt.should_save(i + 1):
            ckpt.save(i + 1, state, extras=pipe.get_state())
        if mode == "kill" and i + 1 == 5:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.wait()
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    np.savez(out, **arrays, **(first if restored is None else {}))
    print("PIPELINE_OK", restored is not None)
    """
)


def _launch(tmp_path, name, model_dir, mode, data=1, model_axis=1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={data * model_axis}"
    run_dir = tmp_path / name
    args = [str(tmp_path / f"{name}.npz"), str(model_dir), str(run_dir), mode]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args, str(data), str(model_axis)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, ok=True) -> str:
    out = proc.communicate(timeout=600)[0]
    if ok:
        assert proc.returncode == 0 and "PIPELINE_OK" in out, out[-4000:]
    return out


def test_eight_devices_and_sigkill_resume_match_one_device(hf_tiny_dir, tmp_path):
    one = _launch(tmp_path, "one", hf_tiny_dir, "run")
    eight = _launch(tmp_path, "eight", hf_tiny_dir, "run", data=2, model_axis=4)
    killed = _launch(tmp_path, "killed", hf_tiny_dir, "kill")
    _finish(one)
    _finish(eight)
    _finish(killed, ok=False)
    assert killed.returncode == -9
    assert "PIPELINE_OK True" in _finish(_launch(tmp_path, "killed", hf_tiny_dir, "run"))
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "killed.npz") as b:
        params = [k for k in a if not k.startswith("batch.")]
        assert params and set(params) == set(b.keys())
        for k in params:  # resume after SIGKILL (prefetch 2) is exact
            assert a[k].tobytes() == b[k].tobytes(), k
    # 8 devices: the same batches and parameters up to float rounding (tensor-parallel matmuls
    # and data-parallel gradient sums add in another order; see test_training_sharded)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "eight.npz") as b:
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
