"""Native TPU compiles of the Pallas kernels and of whole train steps, on this CPU machine.

libtpu's XLA:TPU and Mosaic compilers (the `jax[tpu]` test dependency) compile for abstract
TPU devices from `jax.experimental.topologies` (`JAX_PLATFORMS=cpu`: nothing runs on a TPU).
Unlike interpret mode, this checks what only the real compilers see: Mosaic's tiling and
alignment rules, scoped-VMEM and SMEM limits, and XLA:TPU's fusions around the kernels. A
kernel that stops compiling fails here.

- `sparse_decode` forward + backward (`value_and_grad`) at the Gemma Scope 2 CLT shapes
  (270M: T 1024, L 18, K 64, F 14560, D 640; 1B: T 2048, L 26, K 64, F 10080, D 1152), bf16
  and float32, on a v5e and a v5p slice, on one chip and latent-sharded over `model` (each
  chip compiles only its own decoder rows): one compile per case, 25-70 s each on 2 cores.
- The whole train step (Gemma 3 270M forward to the sites + every dictionary's update) of a
  CLT (sparse decode), a skip-transcoder set (TopK) and a Matryoshka SAE on a (data 2,
  model 2) v5e mesh, through `gemmascope-jax plan`'s `make_plan`: one compile per module.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest

from gemmascope_jax.training.config import load_config
from gemmascope_jax.training.plan import CHIPS, make_plan
from pallas_kernels.aot import (
    CLT_SHAPES,
    DECODE_KERNELS,
    bytes_per_chip,
    compile_sparse_decode,
    compiled_kernels,
    decoder_bytes,
)

GIB = 1024**3
NO_FALLBACK = ".*Pallas TPU kernel skipped"  # the XLA fallback's warning, made an error


@pytest.mark.parametrize(
    "name, dtype, topology, mesh_shape",
    [
        ("270m", "bfloat16", "v5e:2x2", (1, 1)),
        ("270m", "float32", "v5p:2x2x1", (2, 2)),
        ("1b", "bfloat16", "v5p:2x2x1", (1, 4)),
        ("1b", "float32", "v5e:2x2", (1, 4)),
    ],
)
def test_sparse_decode_forward_and_backward_compile(name, dtype, topology, mesh_shape):
    """`value_and_grad` of the decode compiles natively with all three Mosaic kernels (no
    fallback to XLA), within the chip's HBM; on a latent-sharded mesh each chip's arguments
    hold its 1/model share of the decoder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=NO_FALLBACK)
        compiled, _, args = compile_sparse_decode(CLT_SHAPES[name], dtype, topology, mesh_shape)
    assert compiled_kernels(compiled.as_text()) == DECODE_KERNELS
    mem = compiled.memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    chip = CHIPS[topology.split(":")[0]]
    assert total < chip.hbm_bytes, f"{total / GIB:.1f} GiB per chip"
    # per chip: the 1/model share of the decoder plus the chip's token shard of values,
    # indices and the cotangent (within 1% for TPU layout padding)
    share = decoder_bytes(CLT_SHAPES[name], jnp.dtype(dtype)) / mesh_shape[1]
    expected = sum(bytes_per_chip(a) for a in jax.tree.leaves(args))
    assert share < expected and abs(mem.argument_size_in_bytes / expected - 1) < 0.01


@pytest.fixture(scope="module")
def three_kinds_plan(tmp_path_factory):
    """`make_plan` of a Gemma 3 270M run (4 x 128 tokens) training a 4-layer JumpReLU CLT with
    sparse decode, two TopK skip-transcoders and a Matryoshka SAE, on v5e:2x2 as data 2 x
    model 2 (d_model 640: lane-aligned kernel windows)."""
    path = tmp_path_factory.mktemp("tpu_compile") / "three_kinds.yaml"
    path.write_text(
        "model: {source: google/gemma-3-270m, preset: 270m, dtype: bfloat16}\n"
        "data: {seq_len: 128, batch_size: 4}\n"
        "train: {batch_tokens: 508}\n"
        "mesh: {data: 2, model: 2}\n"
        "dictionaries:\n"
        "  - {name: clt, kind: clt, layers: [4, 5, 6, 7], width: 2048, l0_target: 40,"
        " sparse_k: 32, matryoshka: true}\n"
        "  - {name: skip_5, kind: skip_transcoder, architecture: topk, k: 32, width: 4096,"
        " input_sites: mlp_in.5, output_sites: mlp_out.5}\n"
        "  - {name: skip_9, kind: skip_transcoder, architecture: topk, k: 32, width: 4096,"
        " input_sites: mlp_in.9, output_sites: mlp_out.9}\n"
        "  - {name: sae_6, layers: 6, width: 8192, l0_target: 40, matryoshka: true}\n"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=NO_FALLBACK)
        return make_plan(load_config(path), "v5e:2x2")


def test_train_step_of_clt_skip_transcoders_and_matryoshka_sae_compiles(three_kinds_plan):
    plan = three_kinds_plan
    assert plan.compile_error is None and plan.fits
    assert plan.mesh == {"data": 2, "model": 2} and plan.chip == CHIPS["v5e"]
    assert plan.pallas_kernels == DECODE_KERNELS  # CLT and TopK decode on Mosaic
    assert set(plan.argument_breakdown) >= {
        "dictionary clt",
        "dictionary skip_5",
        "dictionary skip_9",
        "dictionary sae_6",
    }
    assert plan.flops_per_step > 0 and plan.per_device_bytes["temp"] > 0
