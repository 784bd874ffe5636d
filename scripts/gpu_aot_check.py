"""Deviceless AOT compile of the sparse decode for NVIDIA GPUs (H100 / H200) on a CPU host.

No GPU is used or needed. jax 0.10.2's CUDA PJRT plugin (`jax-cuda13-pjrt`) creates a GPU
topology from a `GpuTargetConfigProto` (text proto: the device's compute capability, SM
count, shared memory, ...) with `jax.experimental.topologies.get_topology_desc(
platform="cuda", target_config=..., topology="1x1xN")`; its compile-only devices make
`jax.jit(f).lower(ShapeDtypeStructs).compile()` run the real XLA:GPU pipeline, as libtpu does
for abstract TPU topologies: HLO passes, LLVM -> PTX for sm_90a, the Pallas Triton kernels
through XLA's Triton pipeline, then `ptxas` to SASS. No CUDA driver, cuDNN or GPU is loaded.

Needs, besides jax/jaxlib 0.10.2 (see docs/gpu_compile.md for sizes and times):

    pip install --no-deps jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2   # ~130 MB down
    # ptxas + libdevice: a CUDA toolkit (/usr/local/cuda, as on this project's machines), or
    pip install --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88

Run with JAX_PLATFORMS=cpu (set below by default): with the platform list empty the CUDA
plugin validates a local CUDA install (cuDNN, ...) and fails to register.

    python scripts/gpu_aot_check.py                       # 270M CLT shape, both impls, H100
    python scripts/gpu_aot_check.py --gpu h200 --data 2 --model 4 --impls pallas_gpu
    python scripts/gpu_aot_check.py --selftest            # the suite's checks, one JSON line

`--selftest` is what tests/test_gpu_compile.py runs, with `.venv-gpu-aot/bin/python` (the
Makefile's venv holding the plugin): four checks (see SELFTESTS), each reported as
{"ok": bool, "error": str | None, ...facts}, each in its own child process (a Triton compile
error can abort the process); exit 0 when all pass, 1 when one fails, 2 (and
{"missing": reason}) when the plugin or the CUDA toolchain is not there. Only jax, numpy and
this repository's `pallas_kernels` are imported.

For each implementation it prints lower and compile times, the number of Triton kernels in
the compiled program and `memory_analysis()` (argument / output / temp bytes).
`compiled.cost_analysis()` is unimplemented for deviceless GPU executables (None), so the
flops / bytes shown are XLA's HLO cost analysis of the optimized GPU module (run on the
host): it counts the Triton custom calls as zero and each while-loop body once, so it is a
rough relative figure, not the op's FLOP count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import sparse_decode  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"
CLT_270M = dict(tokens=1024, layers=18, k=64, latents=14560, d_model=640)  # issue 12 shape

# GpuTargetConfigProto text for the SXM parts, from NVIDIA's published specifications
# (Hopper, compute capability 9.0 -> XLA emits sm_90a; memory sizes nominal). Fields not
# given keep XLA's defaults.
# XLA ships complete ones (xla/backends/gpu/target_config/specs/*.txtpb): pass such a file
# with --target-config.
_DEVICE_INFO = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  memory_bandwidth: {bandwidth}
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
    "h100": _DEVICE_INFO.format(
        name="NVIDIA H100 80GB HBM3", memory=80 * 1024**3, bandwidth=3_350_000_000_000
    ),
    "h200": _DEVICE_INFO.format(
        name="NVIDIA H200", memory=143_771 * 1024**2, bandwidth=4_800_000_000_000
    ),
}


# ---- requirements -----------------------------------------------------------------------------


def cuda_plugin() -> str | None:
    """The installed jax CUDA PJRT plugin module (`jax_plugins.xla_cuda13` / `_cuda12`)."""
    for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            pass
    return None


def cuda_toolchain() -> tuple[str | None, str | None]:
    """(ptxas, libdevice directory) where XLA:GPU will look for them: jax's CUDA path
    (CUDA_ROOT, or the pip `nvidia-cuda-nvcc` / `nvidia-nvvm` packages), PATH for ptxas,
    then /usr/local/cuda. (None, None) parts are missing."""
    from jax._src import lib

    roots = [Path(p) for p in (lib.cuda_path, "/usr/local/cuda") if p]
    ptxas = next((r / "bin" / "ptxas" for r in roots if (r / "bin" / "ptxas").exists()), None)
    ptxas = str(ptxas) if ptxas else shutil.which("ptxas")
    libdevice = next(
        (
            r / "nvvm" / "libdevice"
            for r in roots
            if (r / "nvvm/libdevice/libdevice.10.bc").exists()
        ),
        None,
    )
    return ptxas, str(libdevice) if libdevice else None


def missing_requirements() -> str | None:
    """Why a deviceless GPU compile cannot run here, or None when it can."""
    if cuda_plugin() is None:
        return (
            "the jax CUDA PJRT plugin is not installed "
            "(pip install --no-deps jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2)"
        )
    ptxas, libdevice = cuda_toolchain()
    if ptxas is None or libdevice is None:
        return (
            "no CUDA toolchain for XLA:GPU (ptxas and nvvm/libdevice: /usr/local/cuda, or "
            "pip install --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88)"
        )
    return None


# ---- topology and compile ---------------------------------------------------------------------


def target_config(gpu: str = "h100", path: str | None = None) -> str:
    return Path(path).read_text() if path else GPU_TARGETS[gpu]


def gpu_devices(gpu: str = "h100", n_devices: int = 1, config_path: str | None = None):
    """`n_devices` compile-only devices of one host of `gpu`s (no GPU needed)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="cuda",
        target_config=target_config(gpu, config_path),
        topology=f"1x1x{n_devices}",
    )
    return topo.devices


def gpu_mesh(gpu: str = "h100", data: int = 1, model: int = 1, config_path: str | None = None):
    devices = gpu_devices(gpu, data * model, config_path)
    return jax.sharding.Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def decode_args(mesh, tokens, layers, k, latents, d_model, dtype=jnp.bfloat16):
    """ShapeDtypeStructs of (values, indices, blocks): tokens over `data`, latents over
    `model` (the latent-sharded decode when model > 1)."""
    P, sharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    codes, rows = sharding(mesh, P("data")), sharding(mesh, P("model"))
    values = jax.ShapeDtypeStruct((tokens, layers, k), dtype, sharding=codes)
    indices = jax.ShapeDtypeStruct((tokens, layers, k), jnp.int32, sharding=codes)
    blocks = tuple(
        jax.ShapeDtypeStruct((latents, layers - layer, d_model), dtype, sharding=rows)
        for layer in range(layers)
    )
    return values, indices, blocks


def decode_fns(impl: str, mesh):
    """The forward and the forward+backward (grads of values and blocks) of the decode."""

    def forward(values, indices, blocks):
        return sparse_decode(values, indices, blocks, impl=impl, mesh=mesh)

    def loss(values, indices, blocks):
        return jnp.sum(jnp.square(forward(values, indices, blocks).astype(jnp.float32)))

    return forward, jax.grad(loss, argnums=(0, 2))


def hlo_cost(compiled) -> dict:
    """XLA's HLO cost analysis of the optimized module (Triton calls count as zero, loop
    bodies once); {} when unavailable (private jaxlib API)."""
    try:
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
    except Exception:  # noqa: BLE001 - a report, not a requirement
        return {}


def compile_report(fn, args) -> dict:
    """Lower and compile `fn` for the args' (GPU) shardings; times, kernels and memory."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    cost = hlo_cost(compiled)
    return dict(
        lower_s=lowered_at - start,
        compile_s=done - lowered_at,
        triton_kernels=text.count(TRITON_CALL),
        all_reduces=text.count(" all-reduce(") + text.count(" all-reduce-start("),
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        text=text,
        compiled=compiled,
    )


# ---- self-test (tests/test_gpu_compile.py) ----------------------------------------------------

SMALL = dict(tokens=40, layers=3, k=5, latents=96, d_model=72)  # ragged tiles, K not pow2


def _expect(facts: dict, name: str, ok: bool) -> None:
    if not ok:
        raise AssertionError(f"{name}: {facts}")


def check_native_triton_kernel() -> dict:
    """An H100 topology device is a "gpu": `Kernel.for_target` picks the native Triton
    kernel (not interpret mode), for pallas_gpu and as the GPU default."""
    from pallas_kernels.decode import Kernel

    mesh = gpu_mesh("h100")
    device = mesh.devices.flat[0]
    kernel = Kernel.for_target("pallas_gpu", mesh)
    facts = dict(
        platform=device.platform,
        device_kind=device.device_kind,
        impl=kernel.impl,
        interpret=bool(kernel.interpret),
        default_impl=Kernel.for_target(None, mesh).impl,
    )
    _expect(facts, "platform", facts["platform"] == "gpu")
    _expect(facts, "device_kind", facts["device_kind"] == "NVIDIA H100 80GB HBM3")
    _expect(facts, "native pallas_gpu", facts["impl"] == "pallas_gpu" and not facts["interpret"])
    _expect(facts, "GPU default", facts["default_impl"] == "pallas_gpu")
    return facts


def check_small_forward_and_backward() -> dict:
    """A ragged small decode on one H100: one Triton kernel per source layer in the forward
    and in the forward+backward (the backward is plain XLA), gradient shapes as the args."""
    mesh = gpu_mesh("h100")
    args = decode_args(mesh, **SMALL)
    forward, backward = decode_fns("pallas_gpu", mesh)
    fwd = compile_report(forward, args)
    bwd = compile_report(backward, args)
    d_values, d_blocks = bwd["compiled"].out_info
    facts = dict(
        layers=SMALL["layers"],
        fwd_triton_kernels=fwd["triton_kernels"],
        fwd_names_kernel="sparse_decode_rows_gpu" in fwd["text"],
        bwd_triton_kernels=bwd["triton_kernels"],
        d_values_shape_ok=d_values.shape == args[0].shape,
        d_blocks_shapes_ok=[b.shape for b in d_blocks] == [b.shape for b in args[2]],
        fwd_compile_s=fwd["compile_s"],
        bwd_compile_s=bwd["compile_s"],
    )
    _expect(facts, "fwd kernels", facts["fwd_triton_kernels"] == SMALL["layers"])
    _expect(facts, "fwd kernel name", facts["fwd_names_kernel"])
    _expect(facts, "bwd kernels", facts["bwd_triton_kernels"] == SMALL["layers"])
    _expect(facts, "gradient shapes", facts["d_values_shape_ok"] and facts["d_blocks_shapes_ok"])
    return facts


def check_clt_270m_forward_h100() -> dict:
    """The issue's shape (1024 tokens, 18 layers, K = 64, F = 14560, d = 640, bf16) on one
    H100: 18 Triton kernels, the whole decoder (2.97 GiB) as arguments."""
    mesh = gpu_mesh("h100")
    forward, _ = decode_fns("pallas_gpu", mesh)
    report = compile_report(forward, decode_args(mesh, **CLT_270M))
    facts = dict(
        layers=CLT_270M["layers"],
        triton_kernels=report["triton_kernels"],
        argument_gib=report["argument_bytes"] / 2**30,
        compile_s=report["compile_s"],
    )
    _expect(facts, "kernels", facts["triton_kernels"] == CLT_270M["layers"])
    _expect(facts, "argument size", 2.9 < facts["argument_gib"] < 3.0)
    return facts


def check_latent_sharded_eight_h200() -> dict:
    """data=2 x model=4 H200s, the latent-sharded decode (shard_map: Triton kernels on the
    local rows, a psum over `model` as an all-reduce), forward+backward."""
    mesh = gpu_mesh("h200", data=2, model=4)
    _, backward = decode_fns("pallas_gpu", mesh)
    report = compile_report(backward, decode_args(mesh, **{**SMALL, "latents": 128}))
    facts = dict(
        devices=int(mesh.devices.size),
        device_kind=mesh.devices.flat[0].device_kind,
        layers=SMALL["layers"],
        triton_kernels=report["triton_kernels"],
        all_reduces=report["all_reduces"],
        compile_s=report["compile_s"],
    )
    _expect(facts, "devices", facts["devices"] == 8 and facts["device_kind"] == "NVIDIA H200")
    _expect(facts, "kernels", facts["triton_kernels"] == SMALL["layers"])
    _expect(facts, "all-reduce", facts["all_reduces"] >= 1)
    return facts


SELFTESTS = {
    "native_triton_kernel": check_native_triton_kernel,
    "small_forward_and_backward": check_small_forward_and_backward,
    "clt_270m_forward_h100": check_clt_270m_forward_h100,
    "latent_sharded_eight_h200": check_latent_sharded_eight_h200,
}


def run_check(name: str) -> dict:
    """One of SELFTESTS in this process: {"ok", "error", "seconds", ...facts}."""
    start = time.perf_counter()
    try:
        result = dict(ok=True, error=None, **SELFTESTS[name]())
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        result = dict(ok=False, error=f"{type(err).__name__}: {err}"[:4000])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def selftest() -> int:
    """Run each of SELFTESTS in a child process (an XLA/Triton compile error can abort the
    process: `LLVM Fatal Error while compiling Triton kernel`, then exit, taking the other
    checks' results with it); print one JSON line: {"checks": {name: {"ok", "error", ...}},
    "env": ...}. Exit 0 when all pass, 1 when one fails, 2 when a requirement is missing."""
    if why := missing_requirements():
        print(json.dumps({"missing": why}))
        print(f"cannot compile for a GPU here: {why}", file=sys.stderr)
        return 2
    import subprocess

    checks = {}
    for name in SELFTESTS:
        start = time.perf_counter()
        argv = [sys.executable, str(Path(__file__).resolve()), "--selftest-check", name]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        sys.stderr.write(proc.stderr)
        lines = proc.stdout.strip().splitlines()
        try:
            checks[name] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            skip = ("", "*** Begin stack trace ***", "*** End stack trace ***")
            lines = [line for line in proc.stderr.splitlines() if line.strip() not in skip]
            tail = "\n".join(lines[-10:])
            checks[name] = dict(
                ok=False,
                error=f"the check's process died (exit {proc.returncode}):\n{tail}",
                seconds=round(time.perf_counter() - start, 2),
            )
    ptxas, libdevice = cuda_toolchain()
    env = dict(jax=jax.__version__, plugin=cuda_plugin(), ptxas=ptxas, libdevice=libdevice)
    print(json.dumps({"checks": checks, "env": env}))
    return 0 if all(c["ok"] for c in checks.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPU_TARGETS), default="h100")
    parser.add_argument("--target-config", help="a GpuTargetConfigProto text file instead")
    parser.add_argument("--impls", default="pallas_gpu,xla")
    parser.add_argument("--data", type=int, default=1, help="devices on the token axis")
    parser.add_argument("--model", type=int, default=1, help="devices on the latent axis")
    parser.add_argument("--forward-only", action="store_true")
    for name, value in CLT_270M.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--selftest", action="store_true", help="the suite's checks; one JSON line of results"
    )
    parser.add_argument("--selftest-check", choices=list(SELFTESTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.selftest:
        return selftest()
    if args.selftest_check:  # one check, for selftest(): its JSON line
        print(json.dumps(run_check(args.selftest_check)))
        return 0

    if why := missing_requirements():
        print(f"cannot compile for a GPU here: {why}", file=sys.stderr)
        return 2
    ptxas, libdevice = cuda_toolchain()
    mesh = gpu_mesh(args.gpu, args.data, args.model, args.target_config)
    device = mesh.devices.flat[0]
    shape = {name: getattr(args, name) for name in CLT_270M}
    print(
        f"# {device.device_kind} x {mesh.devices.size} (mesh {dict(mesh.shape)}), deviceless; "
        f"plugin {cuda_plugin()}, jax {jax.__version__}, ptxas {ptxas}, libdevice {libdevice}"
    )
    print(f"# shape {shape}, {args.dtype}\n")
    print(
        "| impl | pass | lower s | compile s | Triton kernels | all-reduces | args GiB "
        "| out GiB | temp GiB | HLO GFLOP | HLO GB accessed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gib = lambda b: f"{b / 2**30:.2f}"
    giga = lambda x: "-" if x is None else f"{x / 1e9:.1f}"
    decode = decode_args(mesh, **shape, dtype=jnp.dtype(args.dtype))
    failed = False
    for impl in args.impls.split(","):
        forward, backward = decode_fns(impl, mesh)
        passes = [("fwd", forward)] + ([] if args.forward_only else [("fwd+bwd", backward)])
        for name, fn in passes:
            try:
                r = compile_report(fn, decode)
            except Exception as err:  # noqa: BLE001 - report every failure, then exit 1
                failed = True
                print(f"| {impl} | {name} | FAILED: {type(err).__name__}: {err} |")
                continue
            print(
                f"| {impl} | {name} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
                f"| {r['triton_kernels']} | {r['all_reduces']} | {gib(r['argument_bytes'])} "
                f"| {gib(r['output_bytes'])} | {gib(r['temp_bytes'])} | {giga(r['flops'])} "
                f"| {giga(r['bytes_accessed'])} |",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
