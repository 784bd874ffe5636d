"""Static HTML feature dashboard: one page per latent and a searchable index, opened from disk.

    gemmascope-jax dashboard --dictionary runs/demo/export/resid_post_9_matryoshka/native \\
        --max-tokens 16384 --out runs/demo/dashboard

The site needs no server (it works from file://): every page is plain HTML written here, and
the index's search data is a JavaScript file loaded with a <script> tag (no fetch of JSON).

    out/index.html                 latents table + search by id (123, L9/123) or by token
    out/latents/<name>.html        density, histogram, logit lens, max-activating examples
    out/latents/<name>.png         activation histogram over the fixed log-spaced bins
    out/assets/                    style.css, dashboard.js, index_data.js
    out/max_examples/              the corpus scan (`MaxExamples.load` reads it back)

Which latents get a page: by default 200 — the 150 most frequent latents that fired on the
corpus, then 50 spread evenly over the remaining firing latents ranked by density (so rare
latents are seen too). `latents=N` keeps that 3:1 split for N pages; a list of ids (flat
indices, or names like `L9/123` for multi-layer dictionaries) gives exactly those.
Token search matches (case-insensitively, as a substring) the tokens where the latent's
examples peak, its logit-lens tokens, then the other tokens of its example windows.
"""

from __future__ import annotations

import html
import json
import shutil
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gemmascope_jax.analysis.common import checked_dictionary, token_strings
from gemmascope_jax.analysis.logit_lens import logit_lens_table
from gemmascope_jax.analysis.max_examples import MaxExamples
from gemmascope_jax.io.files import atomic_output_dir, read_json

DEFAULT_PAGES = 200
FREQUENT_SHARE = 0.75
LENS_K = 10
ASSETS = ("style.css", "dashboard.js")


def select_latents(ex: MaxExamples, latents: int | Sequence[int | str] | None = None) -> list[int]:
    """Flat latent indices that get a page (see the module doc for the rule)."""
    if latents is None or isinstance(latents, int):
        count = DEFAULT_PAGES if latents is None else latents
        if count < 1:
            raise ValueError(f"number of latents must be >= 1, got {count}")
        firing = np.flatnonzero(ex.fire_counts > 0)
        by_density = firing[np.argsort(-ex.fire_counts[firing], kind="stable")]
        if len(by_density) <= count:
            return by_density.tolist()
        frequent = max(1, int(round(count * FREQUENT_SHARE)))
        rest = by_density[frequent:]
        spread = np.linspace(0, len(rest) - 1, count - frequent).round().astype(int)
        return by_density[:frequent].tolist() + rest[np.unique(spread)].tolist()
    names = {ex.latent_name(i): i for i in range(ex.num_latents)}
    out = []
    for item in latents:
        key = str(item).strip()
        if key in names and (len(ex.layers) > 1 or key.isdigit()):
            out.append(names[key])
        elif key.isdigit() and int(key) < ex.num_latents:
            out.append(int(key))
        else:
            raise ValueError(
                f"latent {item!r} out of range: this dictionary has {ex.num_latents} latents "
                f"(ids 0..{ex.num_latents - 1}"
                + (", or L<layer>/<id>)" if len(ex.layers) > 1 else ")")
            )
    return list(dict.fromkeys(out))


def page_name(ex: MaxExamples, flat: int) -> str:
    return ex.latent_name(flat).replace("/", "_")


def build_dashboard(
    model,
    tokenizer,
    dictionary,
    ex: MaxExamples,
    out: str | Path,
    *,
    latents: int | Sequence[int | str] | None = None,
    progress: bool = True,
    force: bool = False,
    card: str | Path | None = None,
) -> Path:
    """Write the site for `dictionary` from the corpus scan `ex` into the folder `out`
    atomically; returns the path of `index.html`. An earlier dashboard in `out` is replaced;
    any other non-empty `out` raises FileExistsError unless `force`. `card`: the dictionary's
    quality card folder (`evaluate`, or a run's report/cards/NAME), copied into `out/card`
    and linked from the index with its headline numbers."""
    card_line = _card_line(card) if card is not None else ""
    d = checked_dictionary(model, dictionary)
    if ex.num_latents != d.cfg.total_width:
        raise ValueError(
            f"the max examples have {ex.num_latents} latents, the dictionary {d.cfg.total_width}"
        )
    chosen = select_latents(ex, latents)
    lens = logit_lens_table(model, d, chosen, k=LENS_K) if chosen else None
    text = dict(ex.token_text)
    if lens is not None:
        lens_ids = np.unique(np.concatenate([lens[0].ravel(), lens[2].ravel()]))
        missing = [i for i in lens_ids.tolist() if i not in text]
        text.update(zip(missing, token_strings(tokenizer, missing), strict=True))
    tok = lambda i: text.get(int(i), f"<id {int(i)}>")
    with atomic_output_dir(out, force=force, replace_ours=True) as tmp:
        (tmp / "latents").mkdir()
        (tmp / "assets").mkdir()
        for name in ASSETS:
            (tmp / "assets" / name).write_text(_template(name))
        ex.save(tmp / "max_examples")
        if card is not None:
            (tmp / "card").mkdir()
            for path in sorted(Path(card).iterdir()):
                if path.name in CARD_FILES or path.suffix == ".png":
                    shutil.copy2(path, tmp / "card" / path.name)
        entries, rows = [], []
        pages = _progress(chosen, progress)
        plotter = _HistogramPlotter(ex.hist_edges)
        for j, flat in enumerate(pages):
            name = page_name(ex, flat)
            plotter.save(ex.histograms[flat], tmp / "latents" / f"{name}.png")
            promoted = [tok(i) for i in lens[0][j]] if lens is not None else []
            page = _latent_page(ex, flat, chosen, j, lens, tok)
            (tmp / "latents" / f"{name}.html").write_text(page)
            entry = _index_entry(ex, flat, tok, promoted + [tok(i) for i in lens[2][j]])
            entries.append(entry)
            rows.append(_index_row(entry, promoted))
        plotter.close()
        data = {"dictionary": ex.dictionary, "latents": entries}
        (tmp / "assets" / "index_data.js").write_text(
            "window.GSJ_INDEX = " + json.dumps(data, ensure_ascii=True) + ";\n"
        )
        (tmp / "index.html").write_text(
            string.Template(_template("index.html")).substitute(
                title=html.escape(f"Feature dashboard: {ex.dictionary}"),
                summary=html.escape(
                    f"{ex.num_latents} latents; corpus of {ex.n_tokens} tokens; "
                    f"{int((ex.fire_counts > 0).sum())} latents fired; top {ex.values.shape[1]} "
                    f"examples each ({ex.left} tokens left, {ex.right} right)."
                ),
                selection=html.escape(_selection_note(latents, len(chosen))),
                card=card_line,
                rows="\n".join(rows),
            )
        )
    return Path(out) / "index.html"


CARD_FILES = ("card.json", "card.md")


def _card_line(card: str | Path) -> str:
    """The index's line for a quality card folder: a link and the headline numbers."""
    path = Path(card) / "card.json"
    try:
        data = read_json(path, error=ValueError)
        gs, core = data["gemma_scope"], data["saebench_core"]
        numbers = {
            "FVU": gs["fvu"],
            "L0": gs["l0"],
            "delta loss": gs.get("delta_loss"),
            "ce_loss_score": core["model_performance_preservation"].get("ce_loss_score"),
            "dead": gs.get("dead_fraction"),
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a quality card ({type(e).__name__}: {e})") from e
    shown = ", ".join(
        f"{name} {value:.3g}" for name, value in numbers.items() if isinstance(value, int | float)
    )
    tokens = data.get("data", {}).get("tokens")
    on = f" on {tokens} held-out tokens" if tokens else ""
    return (
        f'<p class="meta">Quality card: <a href="card/card.md">card.md</a> '
        f'(<a href="card/card.json">card.json</a>){html.escape(on)}: {html.escape(shown)}.</p>'
    )


def check_card(card: str | Path) -> None:
    """Raise `ValueError` unless `card` is a quality card folder (checked before a scan)."""
    _card_line(card)


def _selection_note(latents, n: int) -> str:
    if latents is None or isinstance(latents, int):
        return (
            f"{n} pages: the most frequent firing latents ({FREQUENT_SHARE:.0%}), then latents "
            "spread evenly over the rest by density."
        )
    return f"{n} pages for the requested latents."


def _index_entry(ex: MaxExamples, flat: int, tok, lens_tokens: list[str]) -> dict[str, Any]:
    valid = np.isfinite(ex.values[flat])
    peak = ex.context_ids[flat][valid, ex.left]
    window = ex.context_ids[flat][valid].ravel()
    top = list(dict.fromkeys(tok(i) for i in peak))
    context = [t for t in dict.fromkeys(tok(i) for i in window) if t not in top]
    source, latent = divmod(int(flat), ex.width)
    return {
        "name": ex.latent_name(flat),
        "flat": int(flat),
        "layer": int(ex.layers[source]),
        "id": latent,
        "href": f"latents/{page_name(ex, flat)}.html",
        "density": float(ex.density[flat]),
        "mean": float(ex.mean_active[flat]),
        "max": float(ex.values[flat][0]) if valid.any() else 0.0,
        "top": top,
        "lens": lens_tokens,
        "context": context,
    }


def _index_row(entry: dict[str, Any], promoted: list[str]) -> str:
    toks = lambda items: "".join(f'<span class="tok">{html.escape(t)}</span>' for t in items)
    return (
        f'<tr><td><a href="{entry["href"]}">{html.escape(entry["name"])}</a></td>'
        f'<td class="num">{entry["density"]:.2e}</td><td class="num">{entry["mean"]:.3g}</td>'
        f'<td class="num">{entry["max"]:.3g}</td><td>{toks(entry["top"][:8])}</td>'
        f"<td>{toks(promoted[:6])}</td></tr>"
    )


def _latent_page(ex: MaxExamples, flat: int, chosen: list[int], j: int, lens, tok) -> str:
    valid = np.isfinite(ex.values[flat])
    top = float(ex.values[flat][0]) if valid.any() else 0.0
    links = ['<a href="../index.html">index</a>']
    if j > 0:
        links.append(f'<a href="{page_name(ex, chosen[j - 1])}.html">previous</a>')
    if j + 1 < len(chosen):
        links.append(f'<a href="{page_name(ex, chosen[j + 1])}.html">next</a>')
    examples = [
        _example_html(ex.context_ids[flat, e], ex.context_values[flat, e], ex.left, top, tok)
        for e in np.flatnonzero(valid)
    ]
    lens_html = ""
    if lens is not None:
        ti, tv, bi, bv = (a[j] for a in lens)
        lens_html = _lens_table("promoted", ti, tv, tok) + _lens_table("suppressed", bi, bv, tok)
    name = page_name(ex, flat)
    fires = int(ex.fire_counts[flat])
    return string.Template(_template("latent.html")).substitute(
        name=html.escape(ex.latent_name(flat)),
        dictionary=html.escape(ex.dictionary),
        nav=" | ".join(links),
        density=f"{ex.density[flat]:.3e}",
        fires=fires,
        n_tokens=ex.n_tokens,
        mean=f"{ex.mean_active[flat]:.4g}",
        max=f"{top:.4g}",
        histogram=(
            f'<img class="hist" src="{name}.png" alt="activation histogram of latent {name}">'
            if fires
            else "<p>never fired on the corpus</p>"
        ),
        lens_note=html.escape(
            "logits the model would output if its last residual stream were the decoder "
            "direction alone (through the final RMSNorm, then the unembedding); top promoted "
            "and suppressed tokens"
        ),
        lens=lens_html,
        examples_note=html.escape(
            f"{len(examples)} examples; background = activation / max; hover a token for its "
            "value; the outlined token is the example."
        ),
        examples="\n".join(examples) or "<p>no examples: the latent never fired</p>",
    )


def _example_html(ids, values, center: int, top: float, tok) -> str:
    spans = []
    for pos, (i, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True)):
        alpha = 0.0 if top <= 0 else min(max(v / top, 0.0), 1.0)
        text = tok(i).replace("\n", "\u21b5")
        cls = "t max" if pos == center else "t"
        spans.append(
            f'<span class="{cls}" style="background: rgba(255, 120, 0, {alpha:.3f})" '
            f'title="{html.escape(repr(tok(i)))}: {v:.4g}">{html.escape(text)}</span>'
        )
    value = f'<span class="value">{values[center]:.4g}</span>'
    return f'<div class="example">{value}{"".join(spans)}</div>'


def _lens_table(title: str, ids, values, tok) -> str:
    rows = "".join(
        f'<tr><td><span class="tok">{html.escape(tok(i))}</span></td>'
        f'<td class="num">{v:+.4f}</td></tr>'
        for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    )
    return f"<table><tr><th>{title}</th><th>logit</th></tr>{rows}</table>"


class _HistogramPlotter:
    """One reused matplotlib figure; a step plot of counts over the log-spaced bins."""

    def __init__(self, edges: np.ndarray):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.edges = plt, edges
        self.fig, self.ax = plt.subplots(figsize=(5.5, 2.2), dpi=80)

    def save(self, counts: np.ndarray, path: Path) -> None:
        ax = self.ax
        ax.clear()
        nonzero = np.flatnonzero(counts)
        if len(nonzero):
            lo, hi = nonzero[0], nonzero[-1] + 1
            ax.stairs(counts[lo:hi], self.edges[lo : hi + 1], fill=True, color="#e67e22")
        ax.set_xscale("log")
        ax.set_xlabel("activation")
        ax.set_ylabel("tokens")
        self.fig.tight_layout()
        self.fig.savefig(path)

    def close(self) -> None:
        self.plt.close(self.fig)


def _template(name: str) -> str:
    return resources.files("gemmascope_jax.analysis").joinpath("templates", name).read_text()


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="dashboard pages", unit="page")
