"""Train-step throughput of our JumpReLU / TopK SAE training (JAX) vs SAELens (PyTorch).

Same run, same shapes (d_in 640, width 16384, batch 4096 tokens, float32), same random batch,
torch threads = os.cpu_count() (XLA uses all cores). One step is a full optimizer step:

  ours:    `make_train_step([DictionaryTraining(cfg, LossConfig(...), OptimizerConfig(...))])`
           (jitted forward + loss + grad + Adam(b1=0, b2=0.999)), blocked on the new state;
  SAELens: `{JumpReLU,TopK}TrainingSAE.training_forward_pass(TrainStepInput(...))`, the
           trainer's firing statistics, `loss.backward()`, `clip_grad_norm_(1.0)`,
           `Adam(betas=(0, 0.999)).step()`, `zero_grad()` -- as `SAETrainer._train_step`
           in sae-lens 6.x (minus the lr / coefficient schedulers' bookkeeping).

JumpReLU: SAELens uses its GS2 "quadratic" sparsity loss with target_l0 = 32; ours the
quadratic L0 penalty with l0_target 32. TopK: k = 32; SAELens gets an all-False dead-neuron
mask (fresh dictionaries have no dead latents, so neither side's aux-k loss does real work).

Method: prefault ~2 GiB, compile + warm up both sides, then alternate ours/SAELens steps in
one window (--pairs per architecture) and report medians, tokens/s and ours/SAELens ratios.
Also reports ours' achieved FLOP/s against a measured float32 matmul peak: dense FLOPs per
step = 10 * T * D * F: five [T,D]x[D,F]-sized matmuls of 2TDF each -- forward x @ W_enc and
f @ W_dec, backward dW_dec = f^T dy, df = dy W_dec^T, dW_enc = x^T dpre (no dx: x is data).
The common "6 * tokens * params" rule would give 12TDF; elementwise work is not counted.

    python scripts/bench_train.py [--pairs 7 --warmup 3 --batch 4096 --width 16384]

On a GPU host, `--device cuda` puts SAELens (and its batch) on the GPU and ends each of its
steps with `torch.cuda.synchronize()`; ours runs on jax's default backend. float32 matmuls
are then exact float32 on both sides (`jax_default_matmul_precision="highest"`, torch's
`allow_tf32=False`, its default), or TF32 on both with `--tf32`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gemmascope_jax.dictionaries import DictionaryConfig  # noqa: E402
from gemmascope_jax.training import (  # noqa: E402
    DictionaryTraining,
    LossConfig,
    OptimizerConfig,
    make_train_step,
)

L0 = 32
LR = 1e-4


def prefault(gib: float) -> None:
    """Touch a large buffer once so first timed steps don't pay for heap growth."""
    buf = np.empty(int(gib * 2**30), np.uint8)
    buf[::4096] = 1
    del buf
    gc.collect()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_ours(arch: str, d: int, width: int, x: np.ndarray):
    extra = {"k": L0} if arch == "topk" else {"l0_target": L0}
    cfg = DictionaryConfig(
        kind="sae", architecture=arch, d_in=d, d_out=d, width=width, layers=(9,), **extra
    )
    step = make_train_step(
        [DictionaryTraining(cfg, LossConfig(sparsity_warmup_steps=100), OptimizerConfig(lr=LR))]
    )
    box = {"state": step.init(seed=0)}
    batch = step.put_batch({cfg.input_sites[0]: x})

    def run():
        box["state"], _ = step(box["state"], batch)
        jax.block_until_ready(box["state"])

    return run


def make_saelens(arch: str, d: int, width: int, x: np.ndarray, device: str = "cpu"):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    if arch == "jumprelu":
        cfg = JumpReLUTrainingSAEConfig(
            d_in=d,
            d_sae=width,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=float(L0),
            l0_warm_up_steps=100,
        )
        sae = JumpReLUTrainingSAE(cfg)
        coeffs = {"l0": 1.0}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=L0))
        coeffs = {}
    sae.to(device)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999))
    sae_in = torch.from_numpy(x).to(device)
    dead = torch.zeros(width, dtype=torch.bool, device=device)
    fired_since = torch.zeros(width, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    box = {"n": 0}

    def run():
        out = sae.training_forward_pass(
            step_input=TrainStepInput(
                sae_in=sae_in,
                coefficients=coeffs,
                dead_neuron_mask=dead,
                n_training_steps=box["n"],
                is_logging_step=False,
            )
        )
        with torch.no_grad():  # SAETrainer's firing statistics
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            fired_since.add_(1)
            fired_since[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        box["n"] += 1
        sync()

    return run


def matmul_peak(t: int, d: int, f: int, reps: int) -> float:
    """Best float32 FLOP/s of a jitted [t, d] x [d, f] matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (t, d), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (d, f), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    best = min(timed(lambda: jax.block_until_ready(mm(a, b))) for _ in range(reps))
    return 2 * t * d * f / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--archs", default="jumprelu,topk")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="SAELens' device")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls on both sides (GPU)")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    t, d, f = args.batch, args.d, args.width
    torch_device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({torch_device}), threads {threads}; T={t} D={d} F={f} "
        f"float32, {'TF32' if args.tf32 else 'full float32'} matmuls"
    )
    prefault(2.0)
    x = np.random.default_rng(0).standard_normal((t, d), dtype=np.float32)

    rows, flops_rows = [], []
    for arch in args.archs.split(","):
        ours, theirs = make_ours(arch, d, f, x), make_saelens(arch, d, f, x, args.device)
        compile_s = timed(ours)
        for _ in range(args.warmup):
            ours()
            theirs()
        t_ours, t_theirs = [], []
        for _ in range(args.pairs):  # alternate in one window
            t_ours.append(timed(ours))
            t_theirs.append(timed(theirs))
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        rows.append((arch, mo, mt, t / mo, t / mt, mt / mo, compile_s))
        flops_rows.append((arch, 10 * t * d * f / mo))
        print(
            f"  {arch}: ours {[f'{s * 1e3:.0f}' for s in t_ours]} ms, "
            f"SAELens {[f'{s * 1e3:.0f}' for s in t_theirs]} ms"
        )
        del ours, theirs
        gc.collect()

    print(
        "\n| architecture | ours ms/step | SAELens ms/step | ours tok/s | SAELens tok/s "
        "| ours/SAELens (speed) | ours compile+1st s |"
    )
    print("|---|---|---|---|---|---|---|")
    for arch, mo, mt, so, st, r, c in rows:
        print(
            f"| {arch} | {mo * 1e3:.1f} | {mt * 1e3:.1f} | {so:,.0f} | {st:,.0f} "
            f"| {r:.2f}x | {c:.1f} |"
        )
    print(
        "\nratios ours/SAELens (tokens/s): " + ", ".join(f"{a} {r:.2f}x" for a, *_, r, _c in rows)
    )

    peak = matmul_peak(t, d, f, reps=max(5, args.pairs))
    print(
        f"\nmeasured float32 matmul peak ([{t},{d}]x[{d},{f}] jnp, "
        f"{'TF32' if args.tf32 else 'full float32'}): {peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"dense FLOPs/step = 10*T*D*F = {10 * t * d * f / 1e9:.1f} GFLOP (5 matmuls of 2TDF: "
        "fwd x@W_enc, f@W_dec; bwd dW_dec, df, dW_enc)"
    )
    for arch, fl in flops_rows:
        print(f"  {arch}: {fl / 1e9:.1f} GFLOP/s achieved = {100 * fl / peak:.0f}% of peak")


if __name__ == "__main__":
    main()
