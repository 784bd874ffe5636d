"""The quality card as people read it: `card.md` (`render_markdown`, each metric with how to
read it) and the PNG plots (`write_plots`: feature density, FVU per layer, absorption per
letter), from the card dict `evals.card.evaluate_card` computes; `json_safe` for `card.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


READ = {
    "kl_div_score": "1 = spliced model matches the original; 0 = as bad as zero ablation",
    "ce_loss_score": "1 = no CE loss increase; 0 = as bad as zero ablation",
    "explained_variance": "1 - FVU; 1 = perfect reconstruction",
    "mse": "mean squared error per token (summed over dimensions)",
    "cossim": "mean cosine(target, prediction); 1 is best",
    "l2_ratio": "mean ||prediction|| / ||target||; < 1 means shrinkage",
    "relative_reconstruction_bias": "E||x̂||² / E[x·x̂]; 1 = unbiased, < 1 shrinks",
    "l0": "active latents per token (summed over source layers)",
    "l1": "sum of latent activations per token",
    "frac_alive": "latents that fired at least once",
    "freq_over_1_percent": "latents firing on > 1% of tokens",
    "freq_over_10_percent": "latents firing on > 10% of tokens (dense; GS2 removes these)",
    "average_max_encoder_cosine_sim": "redundancy among encoder directions; lower is better",
    "average_max_decoder_cosine_sim": "redundancy among decoder directions; lower is better",
}


def render_markdown(card: dict[str, Any]) -> str:
    d, data = card["dictionary"], card["data"]
    lines = [
        f"# Quality card: {d['kind']} ({d['architecture']})",
        "",
        f"- sites: {', '.join(d['input_sites'])} -> {', '.join(d['output_sites'])}",
        f"- width {d['width']}, layers {d['layers']}, model {card['model']['name']}",
        f"- data: {data['description'] or 'given tokens'}; {data['tokens']} tokens "
        f"({data['sequences']} x {data['seq_len']}); token ids {data['ignored_token_ids']} "
        "(pad, eos, bos, start/end of turn) are neither spliced nor counted",
        "",
        "## SAEBench core metrics (sae-bench 0.6.0 names and definitions)",
        "",
        "| group | metric | value | how to read |",
        "|---|---|---|---|",
    ]
    for group, values in card["saebench_core"].items():
        if group == "saebench_0_6_0":
            continue
        for key, value in values.items():
            if isinstance(value, list):
                value = "[" + ", ".join(fmt(v) for v in value) + "]"
            lines.append(f"| {group} | `{key}` | {fmt(value)} | {READ.get(key, '')} |")
    lines += [
        "",
        "SAEBench 0.6.0's batch-dependent formulas on the same batches (docs/evaluate.md): "
        + ", ".join(f"`{k}` {fmt(v)}" for k, v in card["saebench_core"]["saebench_0_6_0"].items()),
        "",
        "## Gemma Scope 2 metrics",
        "",
    ]
    gs = card["gemma_scope"]
    for key in ("fvu", "fvu_per_layer", "l0", "dead_fraction", "dense_fraction", "delta_loss"):
        value = gs[key]
        if isinstance(value, list):
            value = "[" + ", ".join(fmt(v) for v in value) + "]"
        lines.append(f"- `{key}`: {fmt(value)}")
    lines += ["", "![feature density](frequency_histogram.png)", ""]
    if "fvu_per_layer.png" in card.get("plots", []):
        lines += ["![FVU per layer](fvu_per_layer.png)", ""]
    lines += ["## Feature absorption (first letter)", ""]
    ab = card["absorption"]
    if "skipped" in ab:
        lines.append(f"Not run: {ab['skipped']}.")
    else:
        lines += [
            f"- `mean_absorption_fraction_score`: {fmt(ab['mean_absorption_fraction_score'])} "
            "(0 = no absorption; lower is better)",
            f"- `mean_full_absorption_score`: {fmt(ab['mean_full_absorption_score'])}",
            f"- `mean_num_split_features`: {fmt(ab['mean_num_split_features'])}",
            f"- letters whose ground-truth probe reached F1 > 0.6: {ab['letters_evaluated']} of 26 "
            f"({ab['words']} words; SAEBench asks for at least 20)",
            "",
            "![absorption](absorption.png)",
        ]
    lines += ["", "## Attribution graphs (circuit-tracer's scores)", ""]
    gr = card.get("graph_scores", {"skipped": "not computed"})
    if "skipped" in gr:
        lines.append(f"Not run: {gr['skipped']}.")
    else:
        lines += [
            "| graphs | replacement (mean / min) | completeness (mean / min) |",
            "|---|---|---|",
        ]
        for kind in ("unpruned", "pruned"):
            rep, com = gr[kind]["replacement"], gr[kind]["completeness"]
            lines.append(
                f"| {kind} | {fmt(rep['mean'])} / {fmt(rep['min'])} | "
                f"{fmt(com['mean'])} / {fmt(com['min'])} |"
            )
        lines += ["", f"Over {gr['n_prompts']} fixed prompts (docs/graph_scores.md)."]
    lines += ["", f"Evaluated in {card['seconds']} s.", ""]
    return "\n".join(lines)


def write_plots(card: dict[str, Any], density: np.ndarray, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    hist = card["gemma_scope"]["histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    ax.axvline(-2, color="grey", ls=":", lw=1)
    ax.axvline(-1, color="red", ls="--", lw=1, label="10% (dense)")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density ({hist['dead']} dead of {density.size})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "frequency_histogram.png", dpi=100)
    plt.close(fig)
    made.append("frequency_histogram.png")
    fvu = card["gemma_scope"]["fvu_per_layer"]
    if len(fvu) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(card["dictionary"]["layers"], fvu, "o-")
        ax.set_xlabel("layer")
        ax.set_ylabel("FVU")
        ax.set_title("FVU per output layer")
        fig.tight_layout()
        fig.savefig(out_dir / "fvu_per_layer.png", dpi=100)
        plt.close(fig)
        made.append("fvu_per_layer.png")
    ab = card["absorption"]
    if "per_letter" in ab and ab["per_letter"]:
        rows = ab["per_letter"]
        x = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar(x - 0.2, [r["mean_absorption_fraction"] for r in rows], 0.4, label="absorption")
        ax.bar(x + 0.2, [r["full_absorption_rate"] for r in rows], 0.4, label="full absorption")
        ax.set_xticks(x, [r["letter"] for r in rows])
        ax.set_ylim(0, 1)
        ax.set_title("first-letter absorption per letter")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "absorption.png", dpi=100)
        plt.close(fig)
        made.append("absorption.png")
    return made


def json_safe(v):
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, float | np.floating):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v
