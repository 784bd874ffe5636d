"""Run `gemmascope-jax plan` over recipes x TPU topologies and print the markdown tables of
docs/scaling.md.

    JAX_PLATFORMS=cpu .venv/bin/python scripts/scaling_table.py \\
        --cache out/plans --jobs 2 > scaling_tables.md

Each plan is one `gemmascope-jax plan CONFIG --topology T --json` subprocess (bounded by
`--timeout`); its JSON is kept in `--cache`, so a rerun only compiles what is missing. The
figures are compile-time ones from XLA:TPU (libtpu) on a CPU machine, not TPU measurements.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
# Recipes x topologies of the main table; every recipe also gets its named slice (`SLICES`).
TABLE_RECIPES = (
    "resid_post_270m_16k",
    "resid_post_1b_262k",
    "transcoder_1b",
    "crosscoder_1b",
    "resid_post_4b_262k",
    "resid_post_12b_262k",
    "resid_post_27b_262k",
)
TABLE_TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
# The slice each recipe's header comment names.
SLICES = {
    "clt_1b": "v5p:2x2x1",
    "clt_270m": "v5p:2x2x1",
    "crosscoder_1b": "v5p:2x2x1",
    "resid_post_12b_262k": "v5p:2x2x1",
    "resid_post_1b_16k": "v5e:2x2",
    "resid_post_1b_262k": "v5p:2x2x1",
    "resid_post_1b_65k": "v5e:2x2",
    "resid_post_270m_16k": "v5e:2x2",
    "resid_post_270m_16k_it": "v5e:2x2",
    "resid_post_270m_262k": "v5p:2x2x1",
    "resid_post_270m_65k": "v5e:2x2",
    "resid_post_27b_262k": "v5p:2x2x1",
    "resid_post_4b_262k": "v5p:2x2x1",
    "skip_transcoder_1b": "v5e:2x2",
    "skip_transcoder_270m": "v5e:2x2",
    "transcoder_1b": "v5e:2x2",
    "transcoder_270m": "v5e:2x2",
    "transcoder_all_270m": "v5e:2x2",
}
# FSDP of the LM weights: Gemma 3 27B with four 16k SAEs on 16 v5e chips (data 4 x model 4),
# tensor parallelism alone (13.5 GiB of weights per chip) vs FSDP over data as well.
FSDP_RECIPE, FSDP_TOPOLOGY = "resid_post_27b_262k", "v5e:4x4"
FSDP_OVERRIDES = ("mesh.data=4", "mesh.model=4") + tuple(
    f"dictionaries.{i}.width=16384" for i in range(4)
)
FSDP_MODES = ("--fsdp=off", "--fsdp=on")
SWEEP_TOPOLOGY = "v5p:2x2x2"  # 8 chips: mesh.model 1, 2, 4, 8 with data = 8 / model
SWEEP_MODELS = (1, 2, 4, 8)


def _cache_key(recipe: str, topology: str, overrides) -> str:
    return "_".join([recipe, topology.replace(":", "-"), *overrides]).replace("=", "-")


def plan_json(recipe: str, topology: str, overrides: list[str], cache: Path, timeout: int):
    """The plan's JSON (cached), or {"error": ...} when it failed or timed out."""
    path = cache / f"{_cache_key(recipe, topology, overrides)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = ROOT / "configs" / "gs2" / f"{recipe}.yaml"
    cmd = [sys.executable, "-m", "gemmascope_jax.cli", "plan", str(config)]
    cmd += ["--topology", topology, "--json", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"compile over {timeout} s"}
    lines = run.stdout.strip().splitlines()
    if run.returncode not in (0, 1) or not lines:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {run.returncode}: {tail[:200]}"}
    result = json.loads(lines[-1])
    path.write_text(json.dumps(result))
    return result


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def _rate(plan) -> str:
    rate = plan.get("est_tokens_per_s_per_chip")
    return f"{rate:,.0f}" if rate else "-"


def _cell(plan) -> str:
    if "error" in plan:
        return f"error: {plan['error']}"
    fits = "yes" if plan["fits"] else "**no**"
    if plan.get("compile_error"):  # >= this: XLA refused it, or its arguments exceed HBM
        fits = "**no** (refused)" if "HLO temporaries" in plan["compile_error"] else "**no** (args)"
    mesh = plan["mesh"]
    return (
        f"{_gib(plan['per_device_bytes']['total'])} GiB, {fits}, {_rate(plan)} tok/s "
        f"({mesh['data']}x{mesh['model']})"
    )


def main_table(results) -> str:
    head = "| recipe | " + " | ".join(TABLE_TOPOLOGIES) + " |"
    rows = [head, "|" + "---|" * (len(TABLE_TOPOLOGIES) + 1)]
    for recipe in TABLE_RECIPES:
        cells = [_cell(results[(recipe, t, ())]) for t in TABLE_TOPOLOGIES]
        rows.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def slice_table(results) -> str:
    rows = [
        "| recipe | slice | mesh (data x model) | per-device GiB | HBM GiB | fits "
        "| FLOPs/step/chip | est. tokens/s/chip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, topology in sorted(SLICES.items()):
        p = results[(recipe, topology, ())]
        if "error" in p:
            rows.append(f"| {recipe} | {topology} | - | - | - | error: {p['error']} | - | - |")
            continue
        rows.append(
            f"| {recipe} | {topology} | {p['mesh']['data']}x{p['mesh']['model']} "
            f"| {_gib(p['per_device_bytes']['total'])} | {_gib(p['hbm_bytes'])} "
            f"| {'yes' if p['fits'] else '**no**'} | {p['flops_per_step'] or 0:.3g} "
            f"| {_rate(p)} |"
        )
    return "\n".join(rows)


def sweep_table(results, recipe: str) -> str:
    rows = [
        f"| {recipe} on {SWEEP_TOPOLOGY} | dictionary state GiB/chip | x model | "
        "per-device total GiB | fits |",
        "|---|---|---|---|---|",
    ]
    for m in SWEEP_MODELS:
        p = results[(recipe, SWEEP_TOPOLOGY, _sweep_overrides(m))]
        if "error" in p:
            rows.append(f"| mesh.model={m} | error: {p['error']} | | | |")
            continue
        dicts = sum(v for k, v in p["argument_breakdown"].items() if k.startswith("dictionary"))
        rows.append(
            f"| mesh.model={m} (data {p['mesh']['data']}) | {_gib(dicts)} "
            f"| {_gib(dicts * m)} | {_gib(p['per_device_bytes']['total'])} "
            f"| {'yes' if p['fits'] else 'no'} |"
        )
    return "\n".join(rows)


def fsdp_table(results) -> str:
    rows = [
        f"| {FSDP_RECIPE} at width 16k on {FSDP_TOPOLOGY} (4x4) | LM params GiB/chip "
        "| per-device total GiB | fits | est. tokens/s/chip |",
        "|---|---|---|---|---|",
    ]
    for mode in FSDP_MODES:
        p = results[(FSDP_RECIPE, FSDP_TOPOLOGY, (*FSDP_OVERRIDES, mode))]
        if "error" in p:
            rows.append(f"| {mode} | error: {p['error']} | | | |")
            continue
        rows.append(
            f"| {mode} | {_gib(p['argument_breakdown']['model params'])} "
            f"| {_gib(p['per_device_bytes']['total'])} | {'yes' if p['fits'] else 'no'} "
            f"| {_rate(p)} |"
        )
    return "\n".join(rows)


def _sweep_overrides(model: int) -> tuple[str, ...]:
    return ("mesh.data=-1", f"mesh.model={model}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="out/plans", help="folder for each plan's JSON")
    parser.add_argument("--jobs", type=int, default=1, help="plans compiled at once")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per plan")
    parser.add_argument("--sweep", default="clt_1b", help="recipe of the mesh.model sweep")
    parser.add_argument(
        "--cached-only", action="store_true", help="print from --cache, compile nothing"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="recipes left out (e.g. clt_1b)")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(r, t, ()) for r, t in SLICES.items()]
    jobs += [(r, t, ()) for r in TABLE_RECIPES for t in TABLE_TOPOLOGIES]
    jobs += [(args.sweep, SWEEP_TOPOLOGY, _sweep_overrides(m)) for m in SWEEP_MODELS]
    jobs += [(FSDP_RECIPE, FSDP_TOPOLOGY, (*FSDP_OVERRIDES, mode)) for mode in FSDP_MODES]
    big = ("resid_post_27b_262k", "resid_post_12b_262k", "resid_post_4b_262k")
    jobs = [j for j in dict.fromkeys(jobs) if j[0] not in args.skip]
    if args.cached_only:
        jobs = [j for j in jobs if (cache / f"{_cache_key(*j)}.json").is_file()]
    # the recipes' own slices first, the FSDP comparison next, slow CLT compiles, the sweep last
    jobs.sort(
        key=lambda j: (
            j[1] == SWEEP_TOPOLOGY,
            j[0].startswith("clt"),
            FSDP_MODES[0][:6] in str(j[2]),
            j[0] not in big,
        )
    )
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(plan_json, *job[:2], list(job[2]), cache, args.timeout): job
                   for job in jobs}  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            results[job] = future.result()
            print(f"done {job}: {_cell(results[job])}", file=sys.stderr)
    skipped = {"error": "not run (--skip / --cached-only)"}
    for job in [(r, t, ()) for r, t in SLICES.items()] + [
        (r, t, ()) for r in TABLE_RECIPES for t in TABLE_TOPOLOGIES
    ]:
        results.setdefault(job, skipped)
    for m in SWEEP_MODELS:
        results.setdefault((args.sweep, SWEEP_TOPOLOGY, _sweep_overrides(m)), skipped)
    for mode in FSDP_MODES:
        results.setdefault((FSDP_RECIPE, FSDP_TOPOLOGY, (*FSDP_OVERRIDES, mode)), skipped)
    print("## Each recipe on its named slice\n")
    print(slice_table(results))
    print("\n## Recipes x topologies (per-device GiB, fits, est. tokens/s per chip, mesh)\n")
    print(main_table(results))
    print(f"\n## mesh.model sweep: {args.sweep}\n")
    print(sweep_table(results, args.sweep))
    print("\n## FSDP of the LM weights\n")
    print(fsdp_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
