"""Feature absorption: SAEBench 0.6.0's first-letter task, small, on the model's own vocabulary.

SAEBench (`sae_bench/evals/absorption`): for alphabetic vocabulary tokens ("words"), prompt

    {icl word} has the first letter: {L}      (10 in-context examples, one per line)
    {word} has the first letter:

and read the dictionary's input site at the word's position. Then

1. a ground-truth probe: 26 one-vs-rest logistic probes (BCE, positive weight neg/pos) on the
   activations of the training words (standardised per dimension here); `f1_probe` per
   letter on the test words;
2. k-sparse probing: an L1-penalised one-vs-rest probe on the dictionary's codes ranks latents
   per letter; for k = 1..`max_k` a logistic probe (balanced classes) on the top-k latents
   gives F1_k; the letter's main ("split") latents are the top-k of the last k whose F1 rose
   by more than `f1_jump_threshold` (0.03) over the previous best;
3. per test word of letter L that the ground-truth probe finds (logit > 0), with p the unit
   probe direction, a the activation, f the codes, c_i = cos(p, decoder row i), proj_i =
   f_i c_i, P = a·p:
       absorption_fraction: 0 if Σ_main proj >= P or the top-3 other latents with c_i >= 0.1
       and proj_i > 0 carry less than 40 % of P; 1 if Σ_main proj <= 0; otherwise
       A / (A + Σ_main proj), A = min(top-3 sum, P - Σ_main proj), clipped to [0, 1];
       full absorption: no main latent fires (f < 1e-8), the top-projecting latent has
       c >= 0.025, P > 0 and it carries >= 40 % of P;
4. per letter: Σ absorption_fraction / #probe true positives, #full / #probe true positives;
   the scores are means over letters whose `f1_probe` > 0.6 (`mean_absorption_fraction_score`,
   `mean_full_absorption_score`, `mean_num_split_features`).

Simplified here (docs/evaluate.md): at most `words_per_letter` words per letter (SAEBench uses
the whole alphabetic vocabulary), a 70/30 train/test split per letter, full-batch Adam instead
of SAEBench's minibatch schedules, the prompt assembled from token ids so that the word is one
vocabulary token whatever precedes it (Gemma's SentencePiece merges "\\n" + word otherwise),
and no minimum of 20 letters: the card reports how many letters passed the probe-F1 cut.
Defined for dictionaries that read and write the same site (SAEs; crosscoders at their first
layer); for transcoders the probe and the decoder live in different spaces.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

LETTERS = string.ascii_lowercase
TEMPLATE = " has the first letter:"
F1_JUMP_THRESHOLD = 0.03
MIN_GT_PROBE_F1 = 0.6
EPS = 1e-8
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS = 3
TOPK_FEATS = 10


def alpha_vocab(tokenizer) -> list[tuple[str, int]]:
    """(word, id) of the vocabulary tokens that are letters only, optionally after one leading
    space (SAEBench's `get_alpha_tokens`), from a Gemma 3 `Tokenizer` (or its `.hf`). Gemma's
    SentencePiece pieces are the text with "▁" for a space, so the piece itself is tested."""
    hf = getattr(tokenizer, "hf", tokenizer)
    alpha = re.compile(r" ?[A-Za-z]+")
    out = []
    for piece, i in hf.get_vocab().items():
        word = piece.replace("▁", " ")
        if alpha.fullmatch(word):
            out.append((word, int(i)))
    return sorted(out, key=lambda t: t[1])


def _choose(vocab, words_per_letter: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    by_letter: dict[str, list] = {}
    for w, i in vocab:
        by_letter.setdefault(w.strip()[0].lower(), []).append((w, i))
    out = []
    for letter in LETTERS:
        items = by_letter.get(letter, [])
        idx = rng.permutation(len(items))[:words_per_letter]
        out += [items[j] for j in sorted(idx)]
    return out


def build_prompts(
    words: Sequence[tuple[str, int]],
    encode: Callable[[str], list[int]],
    icl_pool: Sequence[tuple[str, int]],
    bos_id: int,
    n_icl: int = 10,
    seed: int = 0,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt and the word's position in it."""
    rng = np.random.default_rng(seed)
    tail = encode(TEMPLATE)
    prompts, positions = [], []
    for _, i in words:
        pool = [e for e in rng.permutation(len(icl_pool))[: n_icl + 1] if icl_pool[e][1] != i]
        lines = [
            f"{icl_pool[e][0].strip()}{TEMPLATE} {icl_pool[e][0].strip()[0].upper()}"
            for e in pool[:n_icl]
        ]
        ids = [bos_id, *encode("\n".join(lines) + "\n")]
        positions.append(len(ids))
        prompts.append([*ids, i, *tail])
    return prompts, positions


def word_activations(model, site: str, prompts, positions, batch_size: int = 16, pad_id: int = 0):
    """[n, D] activations of `site` at each prompt's word position (left-padded batches)."""
    forward = model.jitted(capture=(site,), logits=False)
    length = max(len(p) for p in prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        rows = rows + [rows[-1]] * (batch_size - len(rows))
        tokens = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for r, p in enumerate(rows):
            tokens[r, length - len(p) :], mask[r, length - len(p) :] = p, 1
        acts = np.asarray(
            forward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).sites[site]
        )
        for r, p in enumerate(rows[: min(batch_size, len(prompts) - start)]):
            out.append(acts[r, length - len(p) + positions[start + r]])
    return np.stack(out).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit(x, y, pos_weight, l1, lr, wd, steps: int):
    params = (jnp.zeros((x.shape[1], y.shape[1])), jnp.zeros(y.shape[1]))
    opt = optax.adamw(optax.exponential_decay(lr, steps, 1e-3), weight_decay=wd)

    def loss(p):
        logits = x @ p[0] + p[1]
        ll = pos_weight * y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
        return -jnp.mean(ll) + l1 * jnp.sum(jnp.abs(p[0])) / x.shape[0]

    def step(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p


def _fit_logistic(x, y, *, l1=0.0, balanced=True, steps=300, lr=1e-2, wd=1e-6):
    """One-vs-rest logistic probes: x [n, d], y [n, C] in {0, 1} -> (w [C, d], b [C])."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    pos = jnp.maximum(y.sum(0), 1.0)
    pos_weight = (y.shape[0] - pos) / pos if balanced else jnp.ones_like(pos)
    w, b = _fit(x, y, pos_weight, jnp.float32(l1), jnp.float32(lr), jnp.float32(wd), steps)
    return np.asarray(w).T, np.asarray(b)


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(y & pred))
    denom = float(np.sum(y) + np.sum(pred))
    return 2 * tp / denom if denom else 0.0


def absorption_fraction(P, main_proj, proj, cos, main_ids) -> float:
    """SAEBench's `absorption_fraction` of one word (see the module docstring)."""
    mask = np.ones(proj.shape[0], bool)
    mask[main_ids] = False
    mask &= (cos >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD) & (proj > 0)
    top = np.sort(proj[mask])[::-1][:ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS]
    total = float(top.sum())
    if main_proj >= P or total / P < ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD:
        return 0.0
    if main_proj <= 0.0:
        return 1.0
    a = min(total, P - main_proj)
    return float(np.clip(a / (a + main_proj), 0.0, 1.0))


def is_full_absorption(P, codes, proj, cos, main_ids) -> bool:
    if not all(codes[i] < EPS for i in main_ids):
        return False
    top = int(np.argsort(-proj, kind="stable")[0])
    if cos[top] < FULL_ABSORPTION_PROBE_COS_THRESHOLD or P < 0:
        return False
    return proj[top] / P >= ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD


def absorption_from_arrays(
    acts: np.ndarray,
    codes: np.ndarray,
    w_dec: np.ndarray,
    letters: np.ndarray,
    *,
    max_k: int = 10,
    seed: int = 0,
    train: np.ndarray | None = None,
) -> dict:
    """The whole task on activations [n, D], codes [n, F], decoder rows [F, D] and first-letter
    indices [n] (0..25); `train` [n] bool picks the probes' training words (default: 70 % of
    each letter at random). Returns the scores and a per-letter table."""
    if train is None:
        rng = np.random.default_rng(seed)
        train = np.zeros(len(letters), bool)
        for c in range(26):
            idx = np.flatnonzero(letters == c)
            train[rng.permutation(idx)[: int(round(0.7 * len(idx)))]] = True
    train = np.asarray(train, bool)
    test = ~train
    y = np.eye(26, dtype=np.float32)[letters]
    # standardised per dimension (residual streams have a few huge dimensions); the probe
    # direction in activation space is w / sd
    mu, sd = acts[train].mean(0), acts[train].std(0) + 1e-6
    z = (acts - mu) / sd
    w_z, b_probe = _fit_logistic(z[train], y[train])
    probe_logits = z @ w_z.T + b_probe
    w_probe = w_z / sd
    cscale = 1.0 / max(float(np.mean(np.abs(codes[train]).sum(-1))), 1e-12)
    w_l1, _ = _fit_logistic(codes[train] * cscale, y[train], l1=0.01)
    dec_unit = w_dec / np.maximum(np.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    rows = []
    for c, letter in enumerate(LETTERS):
        yt = letters[test] == c
        if not yt.any() or not (letters[train] == c).any():
            continue
        f1_probe = _f1(yt, probe_logits[test, c] > 0)
        prev, split = -100.0, []
        order = np.argsort(-w_l1[c], kind="stable")
        for k in range(1, max_k + 1):
            ids = order[:k]
            xk = np.zeros((len(codes), max_k), np.float32)  # padded: one compile for every k
            xk[:, :k] = codes[:, ids] * cscale
            wk, bk = _fit_logistic(xk[train], y[train][:, c : c + 1])
            f1k = _f1(yt, xk[test] @ wk[0] + bk[0] > 0)
            if f1k > prev + F1_JUMP_THRESHOLD:
                prev, split = f1k, ids.tolist()
            else:
                break
        p = w_probe[c] / max(np.linalg.norm(w_probe[c]), 1e-12)
        cos = dec_unit @ p
        found = np.flatnonzero(test & (letters == c) & (probe_logits[:, c] > 0))
        fracs, fulls = [], []
        for n in found:
            proj = codes[n] * cos
            P = float(acts[n] @ p)
            main_proj = float(proj[split].sum())
            fracs.append(absorption_fraction(P, main_proj, proj, cos, split))
            fulls.append(is_full_absorption(P, codes[n], proj, cos, split))
        rows.append(
            {
                "letter": letter,
                "f1_probe": f1_probe,
                "f1_sparse": prev,
                "split_feats": split,
                "num_split_features": max(len(split) - 1, 0),
                "num_probe_true_positives": len(found),
                "mean_absorption_fraction": float(np.sum(fracs) / len(found))
                if found.size
                else 0.0,
                "full_absorption_rate": float(np.sum(fulls) / len(found)) if found.size else 0.0,
                "num_full_absorption": int(np.sum(fulls)),
            }
        )
    good = [r for r in rows if r["f1_probe"] > MIN_GT_PROBE_F1 and r["num_probe_true_positives"]]
    mean = lambda key: float(np.mean([r[key] for r in good])) if good else float("nan")
    return {
        "mean_absorption_fraction_score": mean("mean_absorption_fraction"),
        "mean_full_absorption_score": mean("full_absorption_rate"),
        "mean_num_split_features": mean("num_split_features"),
        "letters_evaluated": len(good),
        "words": int(len(letters)),
        "per_letter": rows,
    }


def first_letter_absorption(
    model, tokenizer, dictionary, *, words_per_letter: int = 24, seed: int = 0, batch_size: int = 16
) -> dict:
    """The task for an SAE (or a crosscoder's first layer) on `model` with Gemma 3 `tokenizer`
    (or a transformers tokenizer)."""
    cfg = dictionary.cfg
    vocab = alpha_vocab(tokenizer)
    vocab = [(w, i) for w, i in vocab if i < model.cfg.vocab_size]
    words = _choose(vocab, words_per_letter, seed)
    hf = getattr(tokenizer, "hf", tokenizer)
    encode = lambda text: list(hf.encode(text, add_special_tokens=False))
    prompts, positions = build_prompts(words, encode, vocab, int(hf.bos_token_id), seed=seed)
    site = cfg.input_sites[0]
    acts = word_activations(model, site, prompts, positions, batch_size)
    x = acts if not cfg.multilayer else _first_layer_input(cfg, acts)
    codes = np.asarray(dictionary.encode(jnp.asarray(x)), np.float32)
    w_dec = np.asarray(dictionary.w_dec[...] if not cfg.multilayer else dictionary.w_dec[0][...])
    if cfg.multilayer:
        codes, w_dec = codes[:, 0], w_dec[:, 0]
    letters = np.array([LETTERS.index(w.strip()[0].lower()) for w, _ in words])
    out = absorption_from_arrays(acts, codes, w_dec, letters, seed=seed)
    out["site"] = site
    return out


def _first_layer_input(cfg, acts):
    """Crosscoder input [n, L, D] with only the first layer's site filled (the others 0)."""
    x = np.zeros((acts.shape[0], cfg.num_layers, acts.shape[1]), np.float32)
    x[:, 0] = acts
    return x
