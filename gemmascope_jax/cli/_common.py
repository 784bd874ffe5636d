"""What every verb shares: the error convention (`run_verb`) and the model loading.

The convention: bad input -- a missing or malformed file, a bad config, an unknown site, a
dictionary that does not fit the model -- raises a `ValueError` or `OSError` (the project's
own errors subclass `ValueError`). `run_verb` prints it as one line, `gemmascope-jax VERB:
error: MESSAGE` on stderr (argparse's own format for usage errors), and returns 2. A missing
optional package (`ImportError`) returns 1 with the same line; a verb whose run fails for
another reason (a plan that does not fit) prints the line with `error_line` and returns 1.
`GEMMASCOPE_JAX_DEBUG=1` re-raises instead, for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

MODEL_HELP = "HF dir, hub id or .gguf (default: embedded)"


def error_line(verb: str, message: object) -> None:
    """Print the one error line of the CLI convention (module docstring) to stderr."""
    print(f"gemmascope-jax {verb}: error: {message}", file=sys.stderr)


def run_verb(verb: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a verb's handler under the CLI convention: bad input exits 2, a missing package 1."""
    try:
        return func(args)
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("GEMMASCOPE_JAX_DEBUG"):
            raise
        error_line(verb, e)
        return 1 if isinstance(e, ImportError) else 2


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """`--model`: the Gemma 3 checkpoint a verb loads (default: the embedded 270M)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)


def load_model(source: str | None):
    """(model, tokenizer) from `--model` (None: the embedded GGUF), without progress bars."""
    from gemmascope_jax.gemma3.loading import load_gemma3

    return load_gemma3(source, progress=False)
