"""The corpus scan (max-activating examples + statistics) on 8 simulated devices equals the
single-device scan: buffers sharded over latents (`model`), token batches over `data`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from flax import nnx
    from gemmascope_jax.analysis.max_examples import scan_corpus
    from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
    from gemmascope_jax.gemma3.config import preset
    from gemmascope_jax.gemma3.model import Gemma3
    from gemmascope_jax.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    cfg = preset("tiny")
    model = Gemma3(cfg, rngs=nnx.Rngs(0))
    d = random_dictionary(
        DictionaryConfig(kind="sae", architecture="relu", d_in=cfg.hidden_size,
                         d_out=cfg.hidden_size, width=64, layers=(1,)), 1)
    rng = np.random.RandomState(0)
    batches = [rng.randint(4, cfg.vocab_size, size=(4, 16)).astype(np.int32) for _ in range(3)]
    for b in batches:
        b[:, 0] = 2
    out = {}
    for name, mesh in (("one", make_mesh(1, 1, jax.devices()[:1])),
                       ("sharded", make_mesh(data=2, model=4))):
        ex = scan_corpus(model, d, batches, top_n=4, left=3, right=1, mesh=mesh, progress=False)
        for field in ("values", "rows", "positions", "context_ids", "fire_counts",
                      "activation_sums", "histograms"):
            out[f"{name}.{field}"] = np.asarray(getattr(ex, field))
    np.savez(sys.argv[1], **out)
    """
)


def test_scan_corpus_on_8_devices_equals_one_device(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    result = tmp_path / "scan.npz"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(result)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(result)
    assert np.isfinite(got["one.values"]).any(), "no latent fired: the test checks nothing"
    for field in ("rows", "positions", "context_ids", "fire_counts", "histograms"):
        np.testing.assert_array_equal(got[f"sharded.{field}"], got[f"one.{field}"], err_msg=field)
    # Sharded matmuls round differently: activations agree to float32 precision.
    for field in ("values", "activation_sums"):
        np.testing.assert_allclose(got[f"sharded.{field}"], got[f"one.{field}"], rtol=1e-5)
