"""Compile the sparse decode's forward + backward for TPU chips (libtpu on this machine, no
TPU) and print a markdown table: compile time, per-chip memory, the Mosaic kernels present;
with `--xla`, the same for the XLA formulation (which XLA:TPU may refuse).

    JAX_PLATFORMS=cpu python scripts/tpu_compile_report.py [--xla] \
        [--cases 270m:bfloat16:v5e:2x2:1x1 ...]

Figures are what XLA:TPU's `memory_analysis()` says of the compiled program (per chip), not
measurements on TPU hardware. Results: docs/kernels.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pallas_kernels.aot import (  # noqa: E402
    CLT_SHAPES,
    compile_sparse_decode,
    compiled_kernels,
)

GIB = 1024**3
DEFAULT_CASES = (
    "270m:bfloat16:v5e:2x2:1x1",
    "270m:float32:v5e:2x2:1x1",
    "270m:bfloat16:v5p:2x2x1:1x1",
    "270m:float32:v5p:2x2x1:2x2",
    "1b:bfloat16:v5p:2x2x1:1x1",
    "1b:float32:v5p:2x2x1:1x1",
    "1b:bfloat16:v5p:2x2x1:1x4",
    "1b:float32:v5e:2x2:1x4",
    "1b:bfloat16:v6e:2x2:1x4",
)


def parse_case(case: str):
    """'1b:bfloat16:v5p:2x2x1:1x4' -> ('1b', 'bfloat16', 'v5p:2x2x1', (1, 4))."""
    name, dtype, chip, shape, mesh = case.split(":")
    data, model = (int(x) for x in mesh.split("x"))
    return name, dtype, f"{chip}:{shape}", (data, model)


def row(case: str, impl: str | None) -> str:
    name, dtype, topology, mesh_shape = parse_case(case)
    data, model = mesh_shape
    label = f"| {name} | {dtype} | {topology} | {data}x{model} | {impl or 'pallas_tpu'} |"
    try:
        compiled, seconds, _ = compile_sparse_decode(
            CLT_SHAPES[name], dtype, topology, mesh_shape, impl=impl
        )
    except Exception as e:  # XLA:TPU refusals are plain runtime errors
        first = " ".join(str(e).split())[:160]
        return f"{label} no | - | - | - | - | `{first}` |"
    mem = compiled.memory_analysis()
    gib = lambda b: f"{b / GIB:.2f}"
    kernels = ", ".join(k.removeprefix("sparse_decode_").removesuffix("_tpu") for k in
                        compiled_kernels(compiled.as_text())) or "none"  # fmt: skip
    return (
        f"{label} yes | {seconds:.0f} | {gib(mem.argument_size_in_bytes)} | "
        f"{gib(mem.temp_size_in_bytes)} | {gib(mem.output_size_in_bytes)} | {kernels} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--xla", action="store_true", help="also compile the XLA formulation")
    args = parser.parse_args(argv)
    print("| CLT | dtype | topology | mesh (data x model) | impl | compiles | compile s | "
          "arguments GiB/chip | temp GiB/chip | output GiB/chip | Mosaic kernels |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for impl in (None, "xla") if args.xla else (None,):
            print(row(case, impl), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
