"""Verbs for a first look at the model: `demo` (chat, activations, a plot) and `sites`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gemmascope_jax.cli._common import add_model_argument

DEMO_CHAT = [{"role": "user", "content": "In one sentence, what does a microscope let you do?"}]
DEMO_PLAIN = "The Eiffel Tower is located in"
DEMO_TEXT = "The Eiffel Tower is in Paris, and the Colosseum is in Rome."
DEMO_SITES = ("resid_post.5", "model.layers.9.pre_feedforward_layernorm.output", "attn_z.12")
COMING = """\
Next: `make demo` now trains a Matryoshka JumpReLU SAE on resid_post.9 and a JumpReLU
skip-transcoder at layer 9 on these activations (configs/demo.yaml), then exports them in
the Gemma Scope 2, SAELens and native layouts and writes a feature dashboard. Then look
inside with `gemmascope-jax inspect / steer / refusal / jailbreak / cot / attribute`."""


def add_demo_parser(subparsers) -> None:
    """Register `demo`: load the model, chat, show activations, plot residual norms."""
    demo = subparsers.add_parser(
        "demo", help="load the embedded Gemma 3 270M, chat, show activations"
    )
    add_model_argument(demo)
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--top", type=int, default=4, help="activations shown per site")
    demo.add_argument("--out", default="out/demo", help="folder for the plot")
    demo.set_defaults(func=demo_command)


def add_sites_parser(subparsers) -> None:
    """Register `sites`: the accepted activation-site names of a preset."""
    sites = subparsers.add_parser("sites", help="list accepted activation-site names")
    sites.add_argument("--preset", default="270m")
    sites.set_defaults(func=sites_command)


def demo_command(args: argparse.Namespace) -> int:
    """Handler of `demo`."""
    import jax.numpy as jnp
    import numpy as np

    import gemmascope_jax as gsj
    from gemmascope_jax.gemma3.generate import generate

    t0 = time.perf_counter()
    model, tok = gsj.load_gemma3(args.model)
    cfg = model.cfg
    print(
        f"Loaded {cfg.name}: {cfg.num_layers} layers, d_model {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} in {time.perf_counter() - t0:.1f}s"
    )

    chat, plain = tok.chat(DEMO_CHAT), tok.encode(DEMO_PLAIN)
    t0 = time.perf_counter()
    chat_new, plain_new = generate(model, [chat, plain], max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    print("\n== Chat-formatted completion (greedy) ==")
    if args.model is None:
        print("(the embedded 270M is the pretrained model, 4-bit quantized: chat turns are out of")
        print(" its distribution; pass --model with an -it checkpoint for real chat answers)")
    print(tok.decode(chat), end="")
    print(tok.decode(chat_new, skip_special_tokens=True).strip())
    print("\n== Plain completion (greedy) ==")
    print(DEMO_PLAIN + tok.decode(plain_new, skip_special_tokens=True))
    print(f"[{len(chat_new) + len(plain_new)} tokens in {seconds:.1f}s]")

    ids = tok.encode(DEMO_TEXT)
    pieces = [tok.decode([i]) for i in ids]
    out = model(jnp.asarray([ids]), capture=DEMO_SITES, logits=False)
    print(f"\n== Top activations on {DEMO_TEXT!r} (BOS excluded) ==")
    for site in DEMO_SITES:
        acts = np.asarray(out.sites[site][0, 1:], np.float32)
        flat = np.argsort(-np.abs(acts), axis=None)[: args.top]
        print(f"{site}  [{acts.shape[0]} tokens x {acts.shape[1]} dims]")
        for pos, dim in zip(*np.unravel_index(flat, acts.shape), strict=True):
            print(f"    token {pieces[pos + 1]!r:>12}  dim {dim:5d}  value {acts[pos, dim]:+9.2f}")
    _plot_residual_norms(model, ids, pieces, Path(args.out))
    print("\n" + COMING)
    return 0


def _plot_residual_norms(model, ids, pieces, out_dir: Path) -> None:
    """Heatmap of ||resid_post|| per layer and token: where the residual stream grows."""
    import jax.numpy as jnp
    import numpy as np

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sites = [f"resid_post.{i}" for i in range(model.cfg.num_layers)]
    out = model(jnp.asarray([ids]), capture=sites, logits=False)
    norms = np.stack([np.linalg.norm(np.asarray(out.sites[s][0, 1:]), axis=-1) for s in sites])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(ids)), 5))
    im = ax.imshow(np.log10(norms), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(ids) - 1), [repr(p)[1:-1] for p in pieces[1:]], rotation=60)
    ax.set_ylabel("layer")
    ax.set_title("log10 ||resid_post|| per token (BOS excluded)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "resid_norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nSaved {path}")


def sites_command(args: argparse.Namespace) -> int:
    """Handler of `sites`: print the accepted forms for the preset's layer count."""
    from gemmascope_jax.gemma3.config import preset
    from gemmascope_jax.gemma3.sites import valid_forms

    print(valid_forms(preset(args.preset).num_layers))
    return 0
