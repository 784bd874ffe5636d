"""Orbax checkpointer: exact round trip, keep-last-k, incomplete checkpoints ignored, restore
onto a 2x4 mesh of 8 simulated devices (subprocess), SIGTERM requests a save-and-stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.training.checkpoint import COMMIT_FILE, Checkpointer, abstract_like

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _state(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "params": {
            "w_enc": jnp.asarray(rng.randn(16, 32), jnp.float32),
            "threshold": jnp.asarray(rng.rand(32), jnp.bfloat16),
            "nested": {"b_dec": jnp.asarray(rng.randn(16), jnp.bfloat16)},
        },
        "opt": [jnp.asarray(rng.randn(16, 32), jnp.float32), jnp.int32(seed)],
        "rng": jax.random.key(seed),
        "step": jnp.int32(100 + seed),
    }


def _bits(x):
    """Raw bytes of an array (typed PRNG keys as their key data), for exact comparison."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.dtype.str, x.shape, x.tobytes()


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        assert _bits(x) == _bits(y)


@pytest.fixture
def ckpt(tmp_path):
    c = Checkpointer(tmp_path / "ckpt", keep=3, every_steps=10, handle_sigterm=False)
    yield c
    c.close()


def test_round_trip_is_exact(ckpt):
    state = _state(1)
    extras = {
        "data": {"position": 1234, "files": ["a", "b"]},
        "norm": {"resid_post.9": np.float32(0.0421), "mlp_in.9": 1.5},
        "config": {"train": {"steps": 7}},
    }
    assert ckpt.restore(abstract_like(state)) is None  # empty directory
    assert ckpt.save(10, state, extras)
    assert not ckpt.save(10, _state(2), extras)  # a step is written once
    got, got_extras, step = ckpt.restore(abstract_like(_state(5)))
    assert step == 10
    _assert_identical(got, state)
    assert got["params"]["threshold"].dtype == jnp.bfloat16
    norm = {"resid_post.9": float(np.float32(0.0421)), "mlp_in.9": 1.5}
    assert got_extras == {**extras, "norm": norm}


def test_missing_directory_gives_none(tmp_path):
    with Checkpointer(tmp_path / "new" / "dir", handle_sigterm=False) as c:
        assert c.restore(abstract_like(_state())) is None
        assert c.latest_step() is None and c.all_steps() == []


def test_from_run_config(tmp_path):
    from gemmascope_jax.training.config import load_config

    cfg = load_config(
        os.path.join(CONFIGS, "demo.yaml"),
        [f"run.dir={tmp_path}", "checkpoint.keep=1", "checkpoint.every_steps=5"],
    )
    with Checkpointer.from_config(cfg, handle_sigterm=False) as c:
        assert c.directory == tmp_path / "checkpoints" and c.every_steps == 5
        c.save(5, _state(5))
        c.save(10, _state(10))
        assert c.all_steps() == [10]


def test_keeps_the_last_k_and_restores_the_latest(ckpt):
    for step in range(10, 60, 10):
        ckpt.save(step, _state(step), {"step": step})
    assert ckpt.all_steps() == [30, 40, 50]
    on_disk = sorted(int(p.name) for p in ckpt.directory.iterdir() if p.name.isdigit())
    assert on_disk == [30, 40, 50]
    state, extras, step = ckpt.restore(abstract_like(_state()))
    assert (step, extras) == (50, {"step": 50})
    _assert_identical(state, _state(50))
    _assert_identical(ckpt.restore(abstract_like(_state()), step=40).state, _state(40))


def test_incomplete_checkpoints_are_never_restored(tmp_path):
    root = tmp_path / "ckpt"
    with Checkpointer(root, handle_sigterm=False) as c:
        c.save(10, _state(10), {"step": 10})
        c.save(20, _state(20), {"step": 20})
    # A crash mid-save leaves orbax's tmp dir, or (a copy, a non-atomic filesystem) a step
    # dir without the commit marker; both hold readable data here, and as newer steps they
    # would win if they were not rejected.
    shutil.copytree(root / "20", root / "30.orbax-checkpoint-tmp-1700000000000000")
    shutil.copytree(root / "20", root / "40")
    (root / "40" / COMMIT_FILE).unlink()
    # the newest complete checkpoint is damaged (array data gone): fall back to the one before
    shutil.copytree(root / "20", root / "50")
    for p in (root / "50" / "state").rglob("*"):
        if p.is_file() and "metadata" not in p.name:
            p.write_bytes(b"")
    with Checkpointer(root, handle_sigterm=False) as c:
        assert c.all_steps() == [10, 20, 50]
        state, extras, step = c.restore(abstract_like(_state()))
        assert step == 20 and extras == {"step": 20}
        _assert_identical(state, _state(20))
    names = sorted(p.name for p in root.iterdir())
    assert not any("orbax-checkpoint-tmp" in n for n in names)  # leftover tmp dir removed
    assert any(n.startswith("40.incomplete-") for n in names) and "40" not in names


def test_bad_extras_fail_before_writing(ckpt):
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(10, _state(), {"bad": object()})
    assert ckpt.all_steps() == []


def test_async_save(tmp_path):
    with Checkpointer(tmp_path, async_save=True, handle_sigterm=False) as c:
        c.save(3, _state(3), {"a": 1})
        c.wait()
        _assert_identical(c.restore(abstract_like(_state())).state, _state(3))


def test_nnx_state_round_trip(tmp_path):
    import optax
    from flax import nnx

    from gemmascope_jax.dictionaries import DictionaryConfig, make_dictionary

    cfg = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=8, d_out=8, width=16, layers=(3,), l0_target=2
    )

    def build(seed):
        d = make_dictionary(cfg, nnx.Rngs(seed))
        return d, nnx.Optimizer(d, optax.adam(1e-3, b1=0.0), wrt=nnx.Param)

    saved = build(0)
    with Checkpointer(tmp_path, handle_sigterm=False) as c:
        c.save(1, nnx.state(saved))
        target = build(1)
        nnx.update(target, c.restore(abstract_like(nnx.state(target))).state)
    _assert_identical(nnx.state(target), nnx.state(saved))


def test_sigterm_requests_a_save_and_stop(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a[0]))
    try:
        c = Checkpointer(tmp_path, every_steps=10)
        assert not c.stop_requested(3) and not c.should_save(3) and c.should_save(20)
        os.kill(os.getpid(), signal.SIGTERM)
        assert c.stop_requested(3) and c.should_save(3)
        assert calls == []  # handled by the checkpointer, the process lives on
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal goes to the previous handler
        assert calls == [signal.SIGTERM]
        c.save(3, _state(), {"stopped": True})
        c.close()
        assert signal.getsignal(signal.SIGTERM) is not c._on_signal  # handler restored
        with Checkpointer(tmp_path, handle_sigterm=False) as again:
            assert again.restore(abstract_like(_state())).extras == {"stopped": True}
    finally:
        signal.signal(signal.SIGTERM, previous)


SHARDED = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gemmascope_jax.sharding import make_mesh
    from gemmascope_jax.training.checkpoint import Checkpointer, abstract_like
    sys.path.insert(0, sys.argv[2])
    from tests.test_checkpoint import _state, _assert_identical
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=2, model=4)
    specs = {
        "params": {"w_enc": P(None, "model"), "threshold": P("model"),
                   "nested": {"b_dec": P("data")}},
        "opt": [P("data", "model"), P()],
        "rng": P(),
        "step": P(),
    }
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        jax.eval_shape(lambda: _state(0)), specs)
    with Checkpointer(sys.argv[1], handle_sigterm=False) as c:
        state, extras, step = c.restore(target)
        assert step == 7 and extras == {"where": "single device"}, (step, extras)
        _assert_identical(jax.device_get(state), _state(7))
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want)
        w = state["params"]["w_enc"]
        assert {s.data.shape for s in w.addressable_shards} == {(16, 8)}
        assert {s.data.shape for s in state["opt"][0].addressable_shards} == {(8, 8)}
        # save from the mesh: each device writes its shards
        c.save(8, jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state),
               {"where": "mesh"})
    print("SHARDED_OK")
    """
)


def test_restore_onto_a_2x4_mesh_and_back(tmp_path):
    root = tmp_path / "ckpt"
    with Checkpointer(root, handle_sigterm=False) as c:
        c.save(7, _state(7), {"where": "single device"})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    repo = str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(root), repo],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_OK" in result.stdout
    # and the mesh-written checkpoint restores onto this single device
    with Checkpointer(root, handle_sigterm=False) as c:
        state, extras, step = c.restore(abstract_like(_state()))
    assert (step, extras) == (8, {"where": "mesh"})
    want = _state(7)
    want["params"]["w_enc"] = want["params"]["w_enc"] + 1
    want["opt"][0] = want["opt"][0] + 1
    _assert_identical(state, want)
