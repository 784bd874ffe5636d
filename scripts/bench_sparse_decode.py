"""Benchmark the causal sparse decode of cross-layer transcoders (issue 5).

    .venv/bin/python scripts/bench_sparse_decode.py            # full run
    .venv/bin/python scripts/bench_sparse_decode.py --quick    # smoke run, small shapes

Prints markdown tables, in one run:

1. Accelerator section (GPU / TPU only; skipped on CPU, where Pallas only runs in interpret
   mode): L = 6, 12, 18, 26, F = 10080 latents per layer, d = 1152, K = 64, 4096 tokens,
   bfloat16 weights and codes: dense causal decode (`causal_decode`, einsum over the
   L(L+1)/2 blocks), the XLA sparse path and the backend's Pallas kernel (`pallas_gpu`:
   Triton; `pallas_tpu`: Mosaic), forward and forward+backward, with achieved bandwidth.
   The script detects the backend and runs as is on a GPU or TPU host.
2. CPU section (always, on the CPU device): L = 6, 12, 18, d = 640, F = 2048, K = 32, 1024
   tokens, float32: dense vs XLA sparse vs PyTorch `embedding_bag` (mode="sum",
   per_sample_weights, one call over all blocks: the blocks concatenated into one
   [L·F, L·D] table, zeros upstream), with ratios; torch uses as many threads as XLA's CPU
   client has devices' worth of cores (`os.cpu_count()` unless `--threads`).
3. Scaling: sparse decode time from L = 13 to L = 26 (fixed K, F; target <= 4.4x) and a full
   TopK CLT train step (`gemmascope_jax.training.step`; target <= 2.3x) at two shapes: the
   CPU table's (F = 2048, K = 32, d = 640, 1024 tokens) and the issue's F = 10080, K = 64
   with d scaled down to 64 (2048 tokens) to fit in memory. The step's encoder:decoder FLOP
   ratio is 2F / (K (L + 1)), independent of d and tokens, so the second shape keeps the
   full-size balance (encoders dominate: 22:1 at L = 13) while the first has 9:1.

Timing: every function is jitted and warmed up; a few GiB of memory are touched first
(`--prefault-gib`) so page faults do not land in the timed region; implementations are timed
in alternation (one call each per round) and the median of the rounds is reported.
Bandwidth counts the bytes an implementation must move: sparse = gathered decoder rows
(T·K·D·L(L+1)/2 elements) + values/indices + output; dense = the decoder blocks
(F·D·L(L+1)/2) + dense codes (T·L·F) + output. Backward passes are counted as 2x forward.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemmascope_jax.dictionaries import DictionaryConfig  # noqa: E402
from gemmascope_jax.dictionaries.multilayer import causal_decode  # noqa: E402
from gemmascope_jax.training import DictionaryTraining, LossConfig, make_train_step  # noqa: E402
from pallas_kernels import sparse_decode  # noqa: E402

PALLAS_FOR_BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


# ---- timing -----------------------------------------------------------------------------------


def prefault(gib: float) -> None:
    """Touch `gib` GiB of fresh memory (then free it) before timing."""
    if gib > 0:
        block = np.ones(int(gib * 2**30) // 8, np.float64)
        block[:: 4096 // 8] += 1.0
        del block


def time_alternating(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, one call of each per round, after a warmup."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def _ready(x):
    return jax.block_until_ready(x)


# ---- problems ---------------------------------------------------------------------------------


def make_problem(n_layers, width, d_model, k, n_tokens, dtype, device, seed=0):
    """Random blocks, sparse codes (distinct indices per row), their dense form, a cotangent.

    Drawn with `jax.random` on `device`: host numpy would spend minutes drawing the 4e9
    decoder weights of the L = 26 accelerator shape.
    """
    with jax.default_device(device):
        keys = jax.random.split(jax.random.PRNGKey(seed), n_layers + 4)
        blocks = tuple(
            (
                jax.random.normal(keys[layer], (width, n_layers - layer, d_model), jnp.float32) / 30
            ).astype(dtype)
            for layer in range(n_layers)
        )
        # Distinct per row: a random start plus K fixed distinct offsets, mod F.
        offsets = jax.random.choice(keys[-1], width, (k,), replace=False)
        start = jax.random.randint(keys[-2], (n_tokens, n_layers, 1), 0, width)
        indices = ((start + offsets) % width).astype(jnp.int32)
        values = jax.random.uniform(keys[-3], (n_tokens, n_layers, k), jnp.float32)
        token = jnp.arange(n_tokens)[:, None, None]
        layer = jnp.arange(n_layers)[None, :, None]
        dense = (
            jnp.zeros((n_tokens, n_layers, width), dtype)
            .at[token, layer, indices]
            .set(values.astype(dtype))
        )
        cot = jax.random.normal(keys[-4], (n_tokens, n_layers, d_model), jnp.float32)
        return _ready(
            {
                "blocks": blocks,
                "values": values.astype(dtype),
                "indices": indices,
                "dense": dense,
                "cot": cot.astype(dtype),
            }
        )


def bytes_moved(n_layers, width, d_model, k, n_tokens, itemsize):
    blocks = n_layers * (n_layers + 1) // 2
    out = n_tokens * n_layers * d_model * itemsize
    sparse = n_tokens * k * blocks * d_model * itemsize + n_tokens * n_layers * k * 8 + out
    dense = width * blocks * d_model * itemsize + n_tokens * n_layers * width * itemsize + out
    return {"sparse": sparse, "dense": dense}


def jax_fns(p, impls):
    """name -> (forward thunk, forward+backward thunk) for dense and each sparse impl."""
    dense_fwd = jax.jit(lambda c, b: causal_decode(c, b))
    dense_grad = jax.jit(jax.grad(lambda c, b, g: jnp.sum(causal_decode(c, b) * g), argnums=(0, 1)))
    fns = {
        "dense": (
            lambda: _ready(dense_fwd(p["dense"], p["blocks"])),
            lambda: _ready(dense_grad(p["dense"], p["blocks"], p["cot"])),
        )
    }
    for impl in impls:
        fwd = jax.jit(lambda v, i, b, impl=impl: sparse_decode(v, i, b, impl=impl))
        loss = lambda v, i, b, g, impl=impl: jnp.sum(sparse_decode(v, i, b, impl=impl) * g)
        grad = jax.jit(jax.grad(loss, argnums=(0, 2)))
        fns[impl] = (
            lambda fwd=fwd: _ready(fwd(p["values"], p["indices"], p["blocks"])),
            lambda grad=grad: _ready(grad(p["values"], p["indices"], p["blocks"], p["cot"])),
        )
    return fns


def torch_fns(p, threads, cuda=False):
    """PyTorch `embedding_bag` over one [L·F, L·D] table (blocks padded to full rows).

    On CPU the arrays go through numpy; with `cuda` they stay on the GPU (DLPack) and each
    call ends with `torch.cuda.synchronize()`.
    """
    import torch
    import torch.nn.functional as tf

    if cuda:
        convert = torch.from_dlpack
        sync = torch.cuda.synchronize
    else:
        torch.set_num_threads(threads)
        convert = lambda a: torch.from_numpy(np.array(a))
        sync = lambda: None
    blocks = [convert(b) for b in p["blocks"]]
    n_layers, width = len(blocks), blocks[0].shape[0]
    n_tokens = p["values"].shape[0]
    full = [tf.pad(b, (0, 0, layer, 0)) for layer, b in enumerate(blocks)]
    table = torch.cat([b.reshape(width, -1) for b in full])
    del blocks, full
    offsets = (torch.arange(n_layers, device=table.device) * width)[None, :, None]
    ids = (convert(p["indices"]).long() + offsets).reshape(n_tokens, -1)
    weights = convert(p["values"]).reshape(n_tokens, -1).clone()
    cot = convert(p["cot"]).reshape(n_tokens, -1)
    table_g = table.clone().requires_grad_(True)
    weights_g = weights.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            out = tf.embedding_bag(ids, table, mode="sum", per_sample_weights=weights)
        sync()
        return out

    def fwd_bwd():
        table_g.grad, weights_g.grad = None, None
        out = tf.embedding_bag(ids, table_g, mode="sum", per_sample_weights=weights_g)
        out.backward(cot)
        sync()

    return fwd, fwd_bwd


# ---- sections ---------------------------------------------------------------------------------


def _compiles(fn: Callable[[], object], what: str) -> bool:
    """Run `fn` once (compile and warm up); on failure say why and return False."""
    try:
        fn()
    except Exception as err:
        print(f"({what} failed: {type(err).__name__}: {str(err)[:300]})")
        return False
    return True


def run_table(
    title, layers, width, d_model, k, n_tokens, dtype, device, impls, rounds, threads, peer
):
    """One table over depths L; `peer` is "cpu", "cuda" (torch `embedding_bag` there) or None."""
    print(f"\n### {title}\n")
    print(f"F = {width} per layer, d = {d_model}, K = {k}, {n_tokens} tokens, {dtype.__name__}\n")
    print("| L | impl | fwd ms | fwd GB/s | fwd+bwd ms | dense/impl fwd | dense/impl fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    itemsize = jnp.dtype(dtype).itemsize
    for n_layers in layers:
        p = make_problem(n_layers, width, d_model, k, n_tokens, dtype, device)
        fns = jax_fns(p, impls)
        if peer:
            try:
                fns["torch_embedding_bag"] = torch_fns(p, threads, cuda=peer == "cuda")
            except Exception as err:  # the peer is optional: report why it is missing
                print(f"(torch embedding_bag unavailable at L = {n_layers}: {err!r})")
        for name, (fwd_fn, both_fn) in list(fns.items()):  # a failure drops that part only
            if not _compiles(fwd_fn, f"{name} forward at L = {n_layers}"):
                del fns[name]
            elif not _compiles(both_fn, f"{name} forward+backward at L = {n_layers}"):
                fns[name] = (fwd_fn, None)
        fwd = time_alternating({n: f[0] for n, f in fns.items()}, rounds)
        both = time_alternating(
            {n: f[1] for n, f in fns.items() if f[1] is not None}, max(rounds // 2, 2)
        )
        fwd, both = defaultdict(lambda: math.nan, fwd), defaultdict(lambda: math.nan, both)
        moved = bytes_moved(n_layers, width, d_model, k, n_tokens, itemsize)
        for name in fns:
            kind = "dense" if name == "dense" else "sparse"
            print(
                f"| {n_layers} | {name} | {fwd[name] * 1e3:.2f} | "
                f"{moved[kind] / fwd[name] / 1e9:.1f} | {both[name] * 1e3:.2f} | "
                f"{fwd['dense'] / fwd[name]:.2f}x | {both['dense'] / both[name]:.2f}x |"
            )
        results[n_layers] = (fwd, both)
        del p, fns
    print()
    for n_layers, (fwd, both) in results.items():
        speedup = fwd["dense"] / fwd["xla"]
        line = f"- L = {n_layers}: xla sparse forward {speedup:.1f}x faster than dense"
        for impl in [name for name in fwd if name.startswith("pallas")]:
            line += (
                f"; {impl} {fwd['xla'] / fwd[impl]:.2f}x as fast as xla forward, "
                f"{both['xla'] / both[impl]:.2f}x fwd+bwd"
            )
        if "torch_embedding_bag" in fwd:
            for impl in [name for name in fwd if name == "xla" or name.startswith("pallas")]:
                line += (
                    f"; {impl} {fwd['torch_embedding_bag'] / fwd[impl]:.2f}x as fast as torch "
                    f"embedding_bag forward, {both['torch_embedding_bag'] / both[impl]:.2f}x "
                    "fwd+bwd"
                )
        print(line + " (targets: >= 5x, >= 1x)" if peer == "cpu" else line, flush=True)
    return results


def clt_step_fn(n_layers, width, d_model, k, n_tokens):
    """A timed callable: one TopK CLT train step (`training.step`, sparse decode path)."""
    cfg = DictionaryConfig(
        kind="clt",
        architecture="topk",
        d_in=d_model,
        d_out=d_model,
        width=width,
        k=k,
        layers=tuple(range(n_layers)),
        model_num_layers=n_layers,
    )
    step = make_train_step([DictionaryTraining(cfg, LossConfig())], donate=True)
    rng = np.random.default_rng(0)
    batch = step.put_batch(
        {s: rng.standard_normal((n_tokens, d_model), np.float32) for s in step.sites}
    )
    holder = [step.init(seed=0)]

    def one():
        holder[0], metrics = step(holder[0], batch)
        _ready(metrics)

    return one


def scaling(width, d_model, k, n_tokens, step_shapes, rounds, device, impls=("xla",)):
    """L = 13 vs 26, the two depths timed in alternation so machine load hits both alike."""
    print(f"\n### Scaling L = 13 -> 26 (fixed K and F), {device.platform}\n")
    for impl in impls:
        fns = {}
        for n_layers in (13, 26):
            p = make_problem(n_layers, width, d_model, k, n_tokens, jnp.float32, device)
            fns[n_layers] = jax_fns(p, [impl])[impl][0]
        times = time_alternating(fns, rounds)
        ratio = times[26] / times[13]
        print(
            f"- sparse decode ({impl}, F = {width}, d = {d_model}, K = {k}, {n_tokens} tokens, "
            f"float32): {times[13] * 1e3:.2f} ms -> {times[26] * 1e3:.2f} ms, **{ratio:.2f}x** "
            f"(target <= 4.4x; FLOPs grow 3.86x)",
            flush=True,
        )
        del fns, p
    for s_width, s_d, s_k, s_tokens in step_shapes:
        with jax.default_device(device):
            steps = time_alternating(
                {n: clt_step_fn(n, s_width, s_d, s_k, s_tokens) for n in (13, 26)}, rounds
            )
        ratio = steps[26] / steps[13]
        balance = 2 * s_width / (s_k * 14)  # encoder : decoder FLOPs at L = 13
        print(
            f"- TopK CLT train step (F = {s_width}, d = {s_d}, K = {s_k}, {s_tokens} tokens; "
            f"encoder:decoder FLOPs {balance:.0f}:1 at L = 13): {steps[13] * 1e3:.1f} ms -> "
            f"{steps[26] * 1e3:.1f} ms, **{ratio:.2f}x** (target <= 2.3x; "
            f"{s_tokens / steps[13]:,.0f} -> {s_tokens / steps[26]:,.0f} tokens/s)",
            flush=True,
        )
        del steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per impl")
    parser.add_argument("--prefault-gib", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--only-scaling", action="store_true", help="just the L=13 -> 26 part")
    parser.add_argument(
        "--skip-cpu", action="store_true", help="accelerator host: skip the CPU table and scaling"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    backend = jax.default_backend()
    cpu = jax.devices("cpu")[0]
    threads = args.threads or os.cpu_count() or 1
    print(
        f"## Sparse decode benchmark: jax {jax.__version__}, backend {backend}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs"
    )
    prefault(args.prefault_gib)

    if backend in PALLAS_FOR_BACKEND and not args.only_scaling:
        acc = jax.devices()[0]
        layers = (6, 12) if args.quick else (6, 12, 18, 26)
        tokens = 512 if args.quick else 4096
        run_table(
            f"{backend} (device {acc.device_kind})",
            layers,
            10080,
            1152,
            64,
            tokens,
            jnp.bfloat16,
            acc,
            ["xla", PALLAS_FOR_BACKEND[backend]],
            rounds,
            0,
            "cuda" if backend == "gpu" else None,
        )
    else:
        print(
            "\n(accelerator section skipped: no GPU/TPU; Pallas runs only in interpret mode "
            "on CPU, see tests/test_pallas_sparse.py)"
        )

    layers = (6,) if args.quick else (6, 12, 18)
    tokens = 256 if args.quick else 1024
    if backend in PALLAS_FOR_BACKEND and not args.skip_scaling:
        # The full shape on the accelerator: F = 10080, K = 64, 4096 tokens; d = 1152
        # for the decode, 640 for the train step (Adam state of the L = 26 decoder: 36 GB).
        acc = jax.devices()[0]
        shape = (2048, 640, 32, 512) if args.quick else (10080, 1152, 64, 4096)
        steps = [(2048, 640, 32, 512)] if args.quick else [(10080, 640, 64, 4096)]
        scaling(*shape, steps, rounds, acc, impls=("xla", PALLAS_FOR_BACKEND[backend]))
    if args.skip_cpu:
        return
    if not args.only_scaling:
        run_table(
            "CPU", layers, 2048, 640, 32, tokens, jnp.float32, cpu, ["xla"], rounds, threads, "cpu"
        )
    if not args.skip_scaling:
        if args.quick:
            scaling(512, 64, 8, 256, [(512, 32, 4, 256)], rounds, cpu)
        else:
            steps = [(2048, 640, 32, 1024), (10080, 64, 64, 2048)]
            scaling(2048, 640, 32, 1024, steps, rounds, cpu)


if __name__ == "__main__":
    main()
