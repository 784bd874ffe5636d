"""The train step on one device equals the same step on 8 simulated CPU devices (meshes
data=2 x model=4 and data=8 x model=1): parameters, optimizer state and metrics after two
steps of three dictionaries (Matryoshka JumpReLU SAE with grouped sparse decode, TopK CLT,
BatchTopK skip-transcoder).
Each configuration runs in its own subprocess so the device count does not leak."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from gemmascope_jax.dictionaries import DictionaryConfig
    from gemmascope_jax.sharding import make_mesh
    from gemmascope_jax.training import (
        DictionaryTraining, LossConfig, OptimizerConfig, make_train_step)

    out, devices, data, model = sys.argv[1], *map(int, sys.argv[2:5])
    assert jax.device_count() == devices, jax.devices()
    mesh = make_mesh(data=data, model=model)
    common = dict(d_in=16, d_out=16, width=32, model_num_layers=4)
    cfgs = [
        DictionaryConfig(kind="sae", architecture="jumprelu", layers=(1,), l0_target=4,
                         matryoshka_widths=(8, 32), **common),
        DictionaryConfig(kind="clt", architecture="topk", layers=(0, 1, 2), k=3, **common),
        DictionaryConfig(kind="skip_transcoder", architecture="batchtopk", layers=(2,), k=4,
                         **common),
    ]
    loss = LossConfig(sparsity_warmup_steps=0, bandwidth=0.05, dead_steps=1)
    # the SAE decodes its 8 largest codes, 2 from each quarter of its latents: on model=4
    # each device selects and decodes only its own quarter
    sparse = LossConfig(sparsity_warmup_steps=0, bandwidth=0.05, dead_steps=1, sparse_k=8,
                        sparse_groups=4)
    opt = OptimizerConfig(lr=1e-3, warmup_steps=1)
    losses = [sparse, loss, loss]
    ts = make_train_step([DictionaryTraining(c, l, opt) for c, l in zip(cfgs, losses)], mesh)
    state = ts.init(seed=0)
    init = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(0)
    metrics = []
    for step in range(2):
        batch = {s: rng.standard_normal((64, 16)).astype(np.float32) for s in ts.sites}
        state, m = ts(state, ts.put_batch(batch))
        metrics.append(m)
    if model > 1:  # latents really are split over `model`, tokens over `data`
        w_enc = state.params[0]["w_enc"]
        assert w_enc.sharding.spec == P(None, "model"), w_enc.sharding
        assert w_enc.addressable_shards[0].data.shape == (16, 32 // model)
        nu = state.opt_state[1][-2].nu["w_dec.0"]
        assert nu.sharding.spec[0] == "model", nu.sharding
    flat = jax.tree_util.tree_flatten_with_path((state, metrics, init))[0]
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    print("SHARDED_STEP_OK")
    """
)


def _run(tmp_path, devices, data, model) -> dict[str, np.ndarray]:
    out = tmp_path / f"run_{devices}_{data}x{model}.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(devices), str(data), str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_STEP_OK" in result.stdout
    with np.load(out) as f:
        return dict(f)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), 1, 1, 1)


@pytest.mark.parametrize("data,model", [(2, 4), (8, 1)])
def test_step_on_8_devices_equals_one_device(single_device, tmp_path, data, model):
    sharded = _run(tmp_path, 8, data, model)
    assert sharded.keys() == single_device.keys()

    def diff(k):  # absolute for O(1) values, relative for large sums (fvu_stats, losses)
        a, b = single_device[k].astype(np.float64), sharded[k].astype(np.float64)
        return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a)))) if a.size else 0.0

    state_keys = [k for k in sharded if k.startswith("[0]")]
    worst_state = max(diff(k) for k in state_keys)
    worst = max(diff(k) for k in sharded)
    print(f"mesh data={data} model={model}: max diff state {worst_state:.1e}, all {worst:.1e}")
    assert worst <= 1e-5
    # not vacuous: the two steps moved every dictionary's encoder ([0] state, [2] init)
    for i in range(3):
        after, before = f"[0].params[{i}]['w_enc']", f"[2][{i}]['w_enc']"
        assert np.abs(single_device[after] - single_device[before]).max() > 1e-4
