"""End-to-end tokens/s of the main job's hot loop on the embedded Gemma 3 270M.

Measures, in one run on the real model and the embedded corpus, with the demo's two
dictionaries (Matryoshka JumpReLU SAE on resid_post.9 + skip-transcoder at layer 9, width
4096) or any `configs/*.yaml` given with --config:

  (1) activations: packed tokens -> jitted forward to the deepest site -> BOS dropped
      (tokens/s of `ActivationStream`, shuffle buffer of one batch so each batch pays for
      its own forward passes);
  (2) train step alone on ready batches (tokens/s of the sharded jitted step);
  (3) the live pipeline: (1) feeding (2) batch by batch, no activation cache.

    python scripts/bench_pipeline.py [--config configs/demo.yaml] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gemmascope_jax.data.activations import normalize  # noqa: E402
from gemmascope_jax.data.pipeline import (  # noqa: E402
    activation_stream,
    norm_scalars_of,
    sharded_forward,
    split_run_documents,
)
from gemmascope_jax.gemma3.loading import load_gemma3  # noqa: E402
from gemmascope_jax.training import make_train_step  # noqa: E402
from gemmascope_jax.training.config import dictionary_trainings, load_config  # noqa: E402


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    args = ap.parse_args()
    cfg = load_config(args.config, ["data.cache_dir=null", "data.epochs=1"])
    # A shuffle buffer of one batch: every batch then costs its own forward passes (a bigger
    # buffer makes most batches free slices and one in many expensive).
    cfg = load_config(
        args.config,
        [
            "data.cache_dir=null",
            "data.epochs=1",
            f"data.shuffle_buffer_tokens={cfg.train.batch_tokens}",
        ],
    )
    source = None if cfg.model.source == "embedded" else cfg.model.source
    model, tok = load_gemma3(source, dtype=cfg.model.dtype, progress=False)
    step = make_train_step(dictionary_trainings(cfg, model))
    docs, _ = split_run_documents(cfg)
    n_tok = cfg.train.batch_tokens

    forward = sharded_forward(model, step.sites)
    stream = activation_stream(cfg, forward, tok, step.sites, docs, n_tok, epochs=None)
    next(stream)  # compile + first buffer fill
    acts = timed(lambda: next(stream), args.steps)
    batches = [normalize(next(stream), {s: 1.0 for s in step.sites}) for _ in range(4)]
    scalars = norm_scalars_of(cfg, model, tok, step.sites, docs)
    batches = [normalize(b, scalars) for b in batches]
    state = step.init(seed=0)
    state, _ = step(state, step.put_batch(batches[0]))  # compile
    jax.block_until_ready(state)
    holder = {"state": state, "i": 0}

    def train_only():
        holder["i"] += 1
        b = step.put_batch(batches[holder["i"] % len(batches)])
        holder["state"], _ = step(holder["state"], b)
        jax.block_until_ready(holder["state"])

    def live():
        b = step.put_batch(normalize(next(stream), scalars))
        holder["state"], _ = step(holder["state"], b)
        jax.block_until_ready(holder["state"])

    train = timed(train_only, args.steps)
    pipe = timed(live, args.steps)
    print(f"jax {jax.__version__} ({jax.default_backend()}), {jax.device_count()} device(s)")
    print(f"{cfg.run.name}: {len(step.names)} dictionaries {step.names}, {n_tok} tokens/step")
    print("| stage | median s/batch | tokens/s |")
    print("|---|---:|---:|")
    for name, ts in (("activations", acts), ("train step", train), ("pipeline", pipe)):
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {n_tok / med:,.0f} |")
    print(
        "fraction of pipeline time in the model forward: "
        f"{statistics.median(acts) / statistics.median(pipe):.0%}"
    )


if __name__ == "__main__":
    main()
