"""A corrupted newest checkpoint (issue 14, part 4): the restore falls back to the previous
good step with a warning naming the bad one, moves the bad one aside, and never returns
wrong numbers. Every file of the newest step is truncated, zeroed, bit-flipped or deleted.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gemmascope_jax.training.checkpoint import (
    FINGERPRINT_KEY,
    Checkpointer,
    CorruptCheckpointError,
    abstract_like,
    state_fingerprint,
)
from tests.test_trainer import tiny_dir  # noqa: F401 - the tiny model fixture

STEPS = (2, 4, 6)


def _state(step: int):
    rng = np.random.RandomState(step)
    return {
        "w": jnp.asarray(rng.randn(24, 40), jnp.float32),
        "b": jnp.asarray(rng.randn(40), jnp.bfloat16),
        "opt": [jnp.asarray(rng.randn(24, 40), jnp.float32), jnp.int32(step)],
        "rng": jax.random.key(step),
    }


def _same(a, b) -> bool:
    la = jax.tree.leaves({**a, "rng": jax.random.key_data(a["rng"])})
    lb = jax.tree.leaves({**b, "rng": jax.random.key_data(b["rng"])})
    return all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        for step in STEPS:
            c.save(step, _state(step), {"data": {"position": step}})
    return root


def _copy(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "checkpoints"))


def _files(root: Path) -> list[str]:
    newest = root / str(STEPS[-1])
    return sorted(str(p.relative_to(root)) for p in newest.rglob("*") if p.is_file())


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "zeros":
        path.write_bytes(b"\0" * len(raw))
    elif how == "flip":
        mid = bytearray(raw)
        if mid:
            mid[len(mid) // 2] ^= 0x10
        path.write_bytes(bytes(mid))
    else:
        path.unlink()


def test_fingerprint_is_exact_and_sharding_free():
    s = _state(3)
    fp = state_fingerprint(s)
    assert fp == state_fingerprint(jax.tree.map(lambda x: x, s))
    w = np.asarray(s["w"]).copy()
    w.view(np.uint32)[5, 7] ^= 1 << 31  # one bit
    assert state_fingerprint({**s, "w": jnp.asarray(w)})["['w']"] != fp["['w']"]


def test_every_damaged_file_of_the_newest_step(pristine, tmp_path, caplog):
    """Each file x each damage: the newest step restores with identical numbers (the file
    was not needed), or the restore falls back to step 4, warns naming step 6 and moves
    step 6 aside; never different numbers, never an exception."""
    outcomes = {}
    for i, rel in enumerate(_files(pristine)):
        for how in ("truncate", "zeros", "flip", "delete"):
            root = _copy(pristine, tmp_path / f"{i}_{how}")
            _damage(root / rel, how)
            caplog.clear()
            with (
                caplog.at_level(logging.WARNING, "gemmascope_jax.training.checkpoint"),
                Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c,
            ):
                restored = c.restore(abstract_like(_state(0)))
                assert restored is not None, (rel, how)
                assert restored.step in (4, 6), (rel, how, restored.step)
                assert _same(_state(restored.step), restored.state), (rel, how)
                assert restored.extras == {"data": {"position": restored.step}}
                if restored.step == 4:
                    text = caplog.text
                    assert ("checkpoint step 6" in text and "corrupt" in text) or (
                        "/6 is incomplete" in text  # no commit marker: never listed
                    ), text
                    assert c.all_steps() == [2, 4]
                    assert list(root.glob("6.corrupt-*")) or list(root.glob("6.incomplete-*"))
            outcomes[(rel, how)] = restored.step
            shutil.rmtree(root.parent)
    fell_back = {k for k, v in outcomes.items() if v == 4}
    assert any(how == "flip" for _, how in fell_back)  # bit flips inside array data caught
    assert any(how == "truncate" for _, how in fell_back)


def test_bad_step_moved_aside_then_saved_again(pristine, tmp_path):
    root = _copy(pristine, tmp_path)
    for data in (root / "6" / "state").rglob("*"):
        if data.is_file() and "/d/" in str(data):
            _damage(data, "zeros")
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        assert c.restore(abstract_like(_state(0))).step == 4
        assert c.save(6, _state(6), {"data": {"position": 6}})  # step 6 can be written again
        again = c.restore(abstract_like(_state(0)))
        assert again.step == 6 and _same(_state(6), again.state)


def test_all_steps_corrupt_raises(pristine, tmp_path):
    root = _copy(pristine, tmp_path)
    for step in STEPS:
        (root / str(step) / "state" / "manifest.ocdbt").unlink()
    with (
        Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c,
        pytest.raises(Exception),  # noqa: B017 - whatever orbax raises, not a silent None
    ):
        c.restore(abstract_like(_state(0)))
    assert sorted(p.name for p in root.iterdir()) == ["2", "4", "6"]  # nothing moved


def test_asking_for_a_corrupt_step_raises(pristine, tmp_path):
    root = _copy(pristine, tmp_path)
    for data in (root / "6" / "state").rglob("*"):
        if data.is_file() and "/d/" in str(data):
            _damage(data, "flip")
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        with pytest.raises(Exception):  # noqa: B017 - orbax's read error or ours
            c.restore(abstract_like(_state(0)), step=6)
        assert c.all_steps() == [2, 4, 6]  # an explicit step is never moved aside


def test_fingerprint_mismatch_is_corruption(pristine, tmp_path, monkeypatch):
    """Array data that still decodes but holds other numbers (no checksum in the chunk
    format catches it) is refused by the fingerprint."""
    import gemmascope_jax.training.checkpoint as ck

    root = _copy(pristine, tmp_path)
    real = ck.state_fingerprint
    calls = []

    def lying(state):
        fp = real(state)
        calls.append(1)
        return {k: v + 1 for k, v in fp.items()} if len(calls) == 1 else fp

    monkeypatch.setattr(ck, "state_fingerprint", lying)
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        with pytest.raises(CorruptCheckpointError, match=r"step 6 .*fingerprint"):
            c.restore(abstract_like(_state(0)), step=6)
        restored = c.restore(abstract_like(_state(0)))  # the newest is fine once not lied to
        assert restored.step == 6 and _same(_state(6), restored.state)


def test_reserved_extras_key(tmp_path):
    with (
        Checkpointer(tmp_path / "c", keep=1, every_steps=1, handle_sigterm=False) as c,
        pytest.raises(ValueError, match="reserved"),
    ):
        c.save(1, _state(1), {FINGERPRINT_KEY: 1})


# ---- `train` itself ---------------------------------------------------------------------------


def test_train_resumes_from_the_previous_step_when_the_newest_is_corrupt(
    tiny_dir,  # noqa: F811 - the fixture imported above
    tmp_path,
    caplog,
):
    """A finished 4-step run (checkpoints 2 and 4 kept); the data files of step 4 are then
    damaged, as a power cut during the write would. Running `train` again resumes from
    step 2 with a warning naming step 4, and, resume being exact, exports the same numbers."""
    from gemmascope_jax.formats import load_dictionary
    from gemmascope_jax.training.config import load_config
    from gemmascope_jax.training.trainer import run_training
    from tests.test_trainer import write_config

    overrides = ["export.formats=[native]", "dictionaries=[{name: sae, kind: sae, "
                 "input_sites: resid_post.3}]"]  # fmt: skip
    cfg = load_config(write_config(tmp_path, tiny_dir, steps=4), overrides)
    first = run_training(cfg)
    export = Path(first.exports["sae"]["native"])
    before = {k: np.asarray(v) for k, v in load_dictionary(export).arrays().items()}
    ckpts = cfg.checkpoint_dir
    assert (ckpts / "4").is_dir() and (ckpts / "2").is_dir()
    damaged = [p for p in (ckpts / "4" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    for p in damaged:
        _damage(p, "truncate")

    with caplog.at_level(logging.WARNING, "gemmascope_jax.training.checkpoint"):
        second = run_training(cfg)
    assert "checkpoint step 4" in caplog.text and "resuming from checkpoint step 2" in caplog.text
    assert second.steps == 4 and list(ckpts.glob("4.corrupt-*"))
    after = {k: np.asarray(v) for k, v in load_dictionary(export).arrays().items()}
    assert before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# ---- several processes: one vote per step, only process 0 moves files -------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _zero_array_data(root: Path, step: int) -> None:
    for data in (root / str(step) / "state").rglob("*"):
        if data.is_file() and "/d/" in str(data):
            _damage(data, "zeros")


def test_non_primary_process_leaves_the_files_and_picks_the_same_step(
    pristine, tmp_path, monkeypatch, caplog
):
    """Process 0 and a process with `jax.process_index() == 1` see the same corrupt step 6:
    both resume from step 4; only process 0 moves step 6 aside, the other touches nothing."""
    primary, other = _copy(pristine, tmp_path / "p0"), _copy(pristine, tmp_path / "p1")
    for root in (primary, other):
        _zero_array_data(root, 6)
    with Checkpointer(primary, keep=3, every_steps=2, handle_sigterm=False) as c:
        assert c.restore(abstract_like(_state(0))).step == 4
    assert list(primary.glob("6.corrupt-*")) and not (primary / "6").exists()

    for extras in other.glob("*/extras"):  # what process 1 wrote beside process 0's JSON
        shutil.copy(extras / "process_0-of-1.json", extras / "process_1-of-1.json")
    before = _snapshot(other)
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    with (
        caplog.at_level(logging.WARNING, "gemmascope_jax.training.checkpoint"),
        Checkpointer(other, keep=3, every_steps=2, handle_sigterm=False) as c,
    ):
        restored = c.restore(abstract_like(_state(0)))
    assert restored.step == 4 and _same(_state(4), restored.state)
    assert "checkpoint step 6" in caplog.text and "resuming from checkpoint step 4" in caplog.text
    assert sorted(p.name for p in other.iterdir()) == ["2", "4", "6"]  # nothing renamed
    assert _snapshot(other) == before  # nor written


class _Process1Of2:
    """`jax` as the checkpoint module sees it on process 1 of 2 (everything else is jax's)."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def process_index(*a, **k):
        return 1

    @staticmethod
    def process_count(*a, **k):
        return 2


def test_processes_vote_so_all_resume_from_the_same_step(pristine, tmp_path, monkeypatch):
    """Process 1 of 2 reads step 6 fine, but process 0 could not (its shards are damaged):
    the vote sends process 1 back to step 4 as well, and it leaves the files to process 0.
    The steps tried are process 0's list, in the same order on every process."""
    import jax.experimental.multihost_utils as mhu

    import gemmascope_jax.training.checkpoint as ck

    root = _copy(pristine, tmp_path)
    before = _snapshot(root)
    votes, barriers = [], []

    def allgather(x, tiled=False):  # process 0 failed on the first step tried (6)
        votes.append(int(x))
        return np.array([int(len(votes) > 1), int(x)], np.int32)

    def broadcast(x, is_source=None):  # process 1 receives process 0's value
        return x

    monkeypatch.setattr(ck, "jax", _Process1Of2())
    monkeypatch.setattr(mhu, "process_allgather", allgather)
    monkeypatch.setattr(mhu, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(mhu, "sync_global_devices", barriers.append)
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        restored = c.restore(abstract_like(_state(0)))
        assert restored.step == 4 and _same(_state(4), restored.state)
        assert votes == [1, 1]  # step 6 read fine here, step 4 too
        assert "gemmascope_jax.checkpoint.quarantine" in barriers  # waited for process 0
    assert _snapshot(root) == before  # process 1 renamed nothing

    # Process 0 lists only steps 2 and 4 (step 6 not visible to it yet): process 1 never
    # tries step 6 although it sees it, so both agree on step 4 without a failed vote.
    votes.clear()
    monkeypatch.setattr(mhu, "process_allgather", lambda x, tiled=False: np.array([1, int(x)]))
    monkeypatch.setattr(
        mhu, "broadcast_one_to_all", lambda x, is_source=None: x if np.ndim(x) else np.int32(2)
    )
    with Checkpointer(root, keep=3, every_steps=2, handle_sigterm=False) as c:
        assert c.restore(abstract_like(_state(0))).step == 4
    assert _snapshot(root) == before


# ---- SIGKILL, then the newest step corrupted, then the same command again ---------------------


def _committed(ckpts: Path) -> list[int]:
    if not ckpts.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in ckpts.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def test_sigkill_then_corrupt_newest_step_then_resume_equals_uninterrupted_run(
    tiny_dir,  # noqa: F811 - the fixture imported above
    tmp_path,
    request,
):
    """`train` in a subprocess is SIGKILLed once two checkpoints are committed; the newest
    step's array data files are then truncated and garbled. The same command again resumes
    from the step before it (a warning names the bad step, which is moved aside), finishes,
    and exports exactly the numbers of an uninterrupted run."""
    from tests.test_trainer import _params, _run_cli, write_config

    configs = {}
    for name in ("straight", "killed"):
        path = write_config(tmp_path / name, tiny_dir, steps=12)
        raw = yaml.safe_load(path.read_text())
        raw["dictionaries"] = raw["dictionaries"][:1]  # the sae: one dictionary is enough
        raw["export"]["formats"] = ["native"]
        path.write_text(yaml.safe_dump(raw))
        configs[name] = path

    straight = _run_cli(configs["straight"])  # alongside the killed and resumed runs
    request.addfinalizer(lambda: straight.poll() is None and straight.kill())
    run = tmp_path / "killed" / "run"
    ckpts = run / "checkpoints"
    proc = _run_cli(configs["killed"])
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(_committed(ckpts)) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (run / "export").exists()

    steps = _committed(ckpts)
    assert len(steps) >= 2 and steps[-1] < 12, steps
    bad, good = steps[-1], steps[-2]
    data = sorted(
        p for p in (ckpts / str(bad) / "state").rglob("*") if p.is_file() and "/d/" in str(p)
    )
    assert data, sorted((ckpts / str(bad)).rglob("*"))
    for i, p in enumerate(data):
        _damage(p, "truncate" if i % 2 == 0 else "flip")

    resumed = _run_cli(configs["killed"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"checkpoint step {bad} in " in out and "corrupt" in out, out[-3000:]
    assert f"resuming from checkpoint step {good}" in out, out[-3000:]
    assert list(ckpts.glob(f"{bad}.corrupt-*")), sorted(p.name for p in ckpts.iterdir())
    assert _committed(ckpts)[-1] == 12
    out = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, out[-3000:]
    a, b = _params(tmp_path / "straight" / "run", "sae"), _params(run, "sae")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
