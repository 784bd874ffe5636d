"""Deviceless AOT compiles of the sparse decode for NVIDIA H100 / H200 on the CPU host
(`scripts/gpu_aot_check.py`): the CUDA PJRT plugin's topology from a GPU target config, the
real XLA:GPU pipeline, the Pallas Triton kernels compiled to PTX and `ptxas` SASS for
sm_90a. Nothing runs on a GPU. Skipped when the jax CUDA plugin or a CUDA toolchain (ptxas,
libdevice) is missing; see docs/gpu_compile.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_aot_check.py"
_spec = importlib.util.spec_from_file_location("gpu_aot_check", _SCRIPT)
gac = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_aot_check", gac)
_spec.loader.exec_module(gac)

_MISSING = gac.missing_requirements()
pytestmark = pytest.mark.skipif(
    _MISSING is not None, reason=f"deviceless GPU compile unavailable: {_MISSING}"
)

SMALL = dict(tokens=40, layers=3, k=5, latents=96, d_model=72)  # ragged tiles, K not pow2


@pytest.fixture(scope="module")
def h100():
    return gac.gpu_mesh("h100")


def test_topology_devices_pick_the_native_triton_kernel(h100):
    from pallas_kernels.decode import Kernel

    device = h100.devices.flat[0]
    assert device.platform == "gpu" and device.device_kind == "NVIDIA H100 80GB HBM3"
    kernel = Kernel.for_target("pallas_gpu", h100)
    assert kernel.impl == "pallas_gpu" and not kernel.interpret  # native, not interpreted
    assert Kernel.for_target(None, h100).impl == "pallas_gpu"  # the GPU default


def test_pallas_gpu_forward_and_backward_compile(h100):
    """One Triton kernel per source layer; the backward (plain XLA) compiles beside it."""
    args = gac.decode_args(h100, **SMALL)
    forward, backward = gac.decode_fns("pallas_gpu", h100)
    fwd = gac.compile_report(forward, args)
    assert fwd["triton_kernels"] == SMALL["layers"]
    assert "sparse_decode_rows_gpu" in fwd["text"]
    bwd = gac.compile_report(backward, args)
    assert bwd["triton_kernels"] == SMALL["layers"]
    d_values, d_blocks = bwd["compiled"].out_info
    assert d_values.shape == args[0].shape
    assert [b.shape for b in d_blocks] == [b.shape for b in args[2]]


def test_clt_270m_forward_compiles_for_h100(h100):
    """The issue's shape (1024 tokens, 18 layers, K = 64, F = 14560, d = 640, bf16): 18
    Triton kernels of up to 11520 columns, and the whole decoder (2.97 GiB) as arguments."""
    args = gac.decode_args(h100, **gac.CLT_270M)
    forward, _ = gac.decode_fns("pallas_gpu", h100)
    report = gac.compile_report(forward, args)
    assert report["triton_kernels"] == gac.CLT_270M["layers"]
    assert 2.9 * 2**30 < report["argument_bytes"] < 3.0 * 2**30


def test_latent_sharded_decode_compiles_for_eight_h200():
    """data=2 x model=4 H200s: the decode runs per latent shard in shard_map (Triton kernels
    on the local rows, a psum over `model` as an all-reduce), forward and backward."""
    mesh = gac.gpu_mesh("h200", data=2, model=4)
    assert mesh.devices.size == 8 and mesh.devices.flat[0].device_kind == "NVIDIA H200"
    args = gac.decode_args(mesh, **{**SMALL, "latents": 128})
    _, backward = gac.decode_fns("pallas_gpu", mesh)
    report = gac.compile_report(backward, args)
    assert report["triton_kernels"] == SMALL["layers"] and report["all_reduces"] >= 1
