"""`gemmascope-jax convert IN OUT --to FORMAT [--from FORMAT] [--force]`.

Loads the dictionary folder IN (format detected unless `--from` names it) and writes it to
the folder OUT in FORMAT (`gemma-scope-2`, `saelens`, `circuit-tracer`, `native`, or an alias
such as `gs2`). OUT is written atomically: an existing OUT is refused unless `--force`, and a
failed conversion leaves no OUT behind. Exit status 0 on success, 1 on a bad input or an
existing output (the message names the file and tensor), 2 on bad arguments.

The library calls behind it: `formats.load_dictionary` and `formats.save_dictionary`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gemmascope_jax.formats import (
    FORMAT_NAMES,
    canonical_format,
    detect_format,
    load_dictionary,
    save_dictionary,
)
from gemmascope_jax.formats.io import FormatError


def _format_arg(value: str) -> str:
    try:
        return canonical_format(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` on an `argparse` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert a dictionary folder between formats",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="dictionary folder to read")
    p.add_argument("output", help="folder to write (must not exist unless --force)")
    names = ", ".join(FORMAT_NAMES)
    p.add_argument(
        "--to", required=True, type=_format_arg, metavar="FORMAT", help=f"output format: {names}"
    )
    p.add_argument(
        "--from",
        dest="from_format",
        metavar="FORMAT",
        default=None,
        type=_format_arg,
        help="input format (default: detected)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=convert_command)
    return p


def convert_command(args: argparse.Namespace) -> int:
    """Handler of `convert`; prints one summary line (errors: `cli._common.run_verb`)."""
    src, out = Path(args.input), Path(args.output)
    progress = not getattr(args, "no_progress", False)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise FormatError(f"{out}: the output must not be the input folder or inside it")
    t0 = time.perf_counter()
    source_format = args.from_format or detect_format(src)
    try:
        d = load_dictionary(src, source_format, progress=progress)
    except TypeError as e:  # a wrong-typed field that a reader did not catch: still bad input
        raise FormatError(f"{src}: {e}") from e
    save_dictionary(d, out, args.to, force=args.force, progress=progress)
    cfg = getattr(d, "cfg", None)
    what = (
        f"{cfg.kind} ({cfg.architecture}, {cfg.num_layers} layer(s) x {cfg.width} latents, "
        f"{cfg.dtype})"
        if cfg is not None
        else type(d).__name__
    )
    print(
        f"converted {src} [{source_format}] -> {out} [{args.to}]: {what} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0
