"""Loading directly into shardings on 8 simulated CPU devices (run in a subprocess so the
device count does not leak into the rest of the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, sys
    from jax.sharding import PartitionSpec as P
    import gemmascope_jax as gsj
    assert jax.device_count() == 8, jax.devices()
    path, tokens = sys.argv[1], np.load(sys.argv[2])
    mesh = gsj.make_mesh(data=2, model=4)
    model, _ = gsj.load_gemma3(path, mesh=mesh, tokenizer=False, progress=False)
    specs = {
        "embed": (model.embed_tokens[...], P("model", None)),
        "q": (model.layers[0].self_attn.q_proj.kernel[...], P(None, "model")),
        "k": (model.layers[0].self_attn.k_proj.kernel[...], P()),
        "o": (model.layers[0].self_attn.o_proj.kernel[...], P("model", None)),
        "down": (model.layers[3].mlp.down_proj.kernel[...], P("model", None)),
        "norm": (model.norm.weight[...], P()),
    }
    for name, (arr, spec) in specs.items():
        got = arr.sharding.spec
        assert tuple(got) + (None,) * (arr.ndim - len(got)) == tuple(spec) + (None,) * (
            arr.ndim - len(spec)), (name, got, spec)
    q = specs["q"][0]
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4)
    unsharded, _ = gsj.load_gemma3(path, tokenizer=False, progress=False)
    a = model.jitted()(jnp.asarray(tokens)).logits
    b = unsharded(jnp.asarray(tokens)).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
    print("SHARDED_OK")
    """
)


def test_load_with_mesh_places_shards(hf_tiny_dir, tiny_tokens, tmp_path):
    np_path = tmp_path / "tokens.npy"
    import numpy as np

    np.save(np_path, tiny_tokens)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(hf_tiny_dir), str(np_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_OK" in result.stdout
