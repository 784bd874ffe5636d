"""Forward-pass throughput of our Gemma 3 (JAX) vs transformers (PyTorch), same run, same CPU.

Measures tokens/s (batch * seq / median wall time per forward) on the real Gemma 3 270M
(the embedded Q4_K_M GGUF, dequantized to --dtype) with the same random token ids, for:

  (a) full logits: ours `model.jitted()(tokens).logits` vs transformers
      `model(input_ids).logits` (sdpa attention, inference_mode, use_cache=False);
  (b) sites only up to --layer: ours `model.jitted(capture=("resid_post.L",), logits=False)`
      (stops after layer L, no unembedding) vs transformers with `model.model.layers`
      truncated to L+1 layers, calling `model.model(input_ids)` and hooking layer L's output.

Method: prefault ~3 GiB, set torch threads to os.cpu_count() (XLA uses all cores), compile
and warm up both sides (our compile time reported separately), check that both compute the
same thing (logits/hidden rel err, argmax agreement), then alternate ours/transformers runs
in one window and report medians, over all pairs and over the pairs during which other
processes used < --idle-below cores (on a shared machine it waits for such a moment first).

    python scripts/bench_forward.py [--batch 4 --seq 256 --repeats 5 --layer 9 --dtype float32]
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


def prefault(gib: float) -> None:
    """Touch every page of a large buffer once, so the first timed runs don't pay for the
    process's first page faults / heap growth."""
    buf = np.empty(int(gib * 2**30), np.uint8)
    buf[::4096] = 1
    del buf
    gc.collect()


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(cpu) if i not in (3, 4))  # all but idle, iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])


def others_load(seconds: float = 0.0, since=None) -> float:
    """CPU cores used by other processes, over `seconds` of sleep or since a `_cpu_ticks()`."""
    t0, start = (time.perf_counter(), _cpu_ticks()) if since is None else since
    time.sleep(seconds)
    (busy0, own0), (busy1, own1) = start, _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / hz / (time.perf_counter() - t0)


def wait_idle(threshold: float, max_wait: float) -> float:
    """Wait (at most max_wait s) until other processes use < threshold cores; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait and others_load(1.0) >= threshold:
        pass
    return time.perf_counter() - t0


def timed(fn, loads: list | None = None) -> float:
    since = (time.perf_counter(), _cpu_ticks())
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if loads is not None:
        loads.append(others_load(since=since))
    return dt


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def load_models(dtype_name: str):
    from transformers import AutoModelForCausalLM

    from gemmascope_jax.gemma3.loading import embedded_gguf_path, load_gemma3

    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    ours, _ = load_gemma3(None, dtype=jdtype, tokenizer=False, progress=False)
    t_ours = time.perf_counter() - t0
    path = Path(embedded_gguf_path())
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=tdtype)
    hf.eval()
    t_hf = time.perf_counter() - t0
    print(f"loaded ours in {t_ours:.1f} s, transformers in {t_hf:.1f} s ({path.name})")
    return ours, hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side and case")
    ap.add_argument("--layer", type=int, default=9, help="deepest layer for case (b)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefault-gib", type=float, default=3.0)
    ap.add_argument(
        "--idle-below",
        type=float,
        default=0.3,
        help="before each ours/peer pair, wait until other processes use fewer "
        "cores than this (shared machine); 0 disables",
    )
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds, per pair")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count())
    prefault(args.prefault_gib)
    ours, hf = load_models(args.dtype)
    cfg, L = ours.cfg, args.layer
    assert 0 <= L < cfg.num_layers - 1, f"--layer must be in [0, {cfg.num_layers - 2}]"
    ntok = args.batch * args.seq

    ids = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, (args.batch, args.seq))
    tokens = jax.device_put(jnp.asarray(ids, jnp.int32))
    input_ids = torch.from_numpy(ids.astype(np.int64))

    # --- ours -------------------------------------------------------------------------------
    fwd_full = ours.jitted()
    fwd_site = ours.jitted(capture=(f"resid_post.{L}",), logits=False)
    ours_a = lambda: fwd_full(tokens).logits.block_until_ready()  # noqa: E731
    ours_b = lambda: fwd_site(tokens).sites[f"resid_post.{L}"].block_until_ready()  # noqa: E731

    # --- transformers -----------------------------------------------------------------------
    all_layers = hf.model.layers
    short_layers = torch.nn.ModuleList(list(all_layers[: L + 1]))
    captured: dict[str, torch.Tensor] = {}
    short_layers[L].register_forward_hook(lambda mod, inp, out: captured.update(h=out))

    def hf_a():
        hf.model.layers = all_layers
        with torch.inference_mode():
            return hf(input_ids, use_cache=False).logits

    def hf_b():
        hf.model.layers = short_layers
        with torch.inference_mode():
            hf.model(input_ids, use_cache=False)
        hf.model.layers = all_layers
        return captured.pop("h")

    # --- compile / warm up, and check both do the same work ---------------------------------
    compile_a = timed(ours_a)
    compile_b = timed(ours_b)
    warm_hf = [timed(hf_a), timed(hf_b)]
    tol = 1e-3 if args.dtype == "float32" else 5e-2
    la = np.asarray(fwd_full(tokens).logits.astype(jnp.float32))
    lb = hf_a().float().numpy()
    err_a = rel_err(la, lb)
    agree = float((la.argmax(-1) == lb.argmax(-1)).mean())
    del la, lb
    ha = np.asarray(fwd_site(tokens).sites[f"resid_post.{L}"].astype(jnp.float32))
    hb = hf_b().float().numpy()
    err_b = rel_err(ha, hb)
    del ha, hb
    gc.collect()
    print(f"(a) logits rel err {err_a:.2e}, argmax agreement {agree:.4f}")
    print(f"(b) resid_post.{L} rel err {err_b:.2e}")
    assert err_a < tol and err_b < tol, f"outputs differ (tol {tol})"
    assert agree >= (0.99 if args.dtype == "float32" else 0.85), "argmax disagrees"

    # --- timed, alternating: ours, peer, ours, peer, ... -----------------------------------
    cases = {"ours_a": ours_a, "hf_a": hf_a, "ours_b": ours_b, "hf_b": hf_b}
    times: dict[str, list[float]] = {k: [] for k in cases}
    loads: dict[str, list[float]] = {k: [] for k in cases}
    prefault(args.prefault_gib)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            if args.idle_below > 0 and name.startswith("ours"):
                wait_idle(args.idle_below, args.max_wait)
            times[name].append(timed(fn, loads[name]))
            gc.collect()
    print(
        f"\njax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"batch {args.batch} x seq {args.seq} = {ntok} tokens, {args.dtype}, "
        f"{args.repeats} alternating repeats"
    )
    print(
        f"our compile + first run: (a) {compile_a:.2f} s, (b) {compile_b:.2f} s; "
        f"transformers first run: (a) {warm_hf[0]:.2f} s, (b) {warm_hf[1]:.2f} s"
    )
    print("\nall times in s [cores used by other processes meanwhile]:")
    for k, v in times.items():
        print(
            f"  {k:7s} " + " ".join(f"{x:.3f}[{c:.1f}]" for x, c in zip(v, loads[k], strict=True))
        )

    # A pair is "quiet" when other processes used < --idle-below cores during both runs.
    thr = args.idle_below if args.idle_below > 0 else float("inf")
    for title, quiet_only in (("all pairs", False), (f"quiet pairs (others < {thr} cores)", True)):
        med = {}
        for case in ("a", "b"):
            o, p = f"ours_{case}", f"hf_{case}"
            keep = [
                i
                for i in range(args.repeats)
                if not quiet_only or max(loads[o][i], loads[p][i]) < thr
            ]
            for k in (o, p):
                med[k] = statistics.median([times[k][i] for i in keep]) if keep else float("nan")
            med[f"n_{case}"] = len(keep)
        tps = {k: ntok / v for k, v in med.items() if not k.startswith("n_")}
        print(f"\nmedians over {title}:")
        print(
            "| case | pairs | ours s | transformers s | ours tok/s | transformers tok/s "
            "| ours/transformers |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for case, label in (("a", "(a) full logits"), ("b", f"(b) resid_post.{L} only")):
            o, p = f"ours_{case}", f"hf_{case}"
            print(
                f"| {label} | {med[f'n_{case}']} | {med[o]:.3f} | {med[p]:.3f} | "
                f"{tps[o]:,.0f} | {tps[p]:,.0f} | {tps[o] / tps[p]:.2f}x |"
            )
        print(
            f"ratio ours/transformers: (a) {tps['ours_a'] / tps['hf_a']:.2f}x, "
            f"(b) {tps['ours_b'] / tps['hf_b']:.2f}x; early-stop speedup (b) over (a): "
            f"ours {med['ours_a'] / med['ours_b']:.2f}x, "
            f"transformers {med['hf_a'] / med['hf_b']:.2f}x"
        )


if __name__ == "__main__":
    main()
