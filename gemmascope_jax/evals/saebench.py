"""SAEBench 0.6.0 core metrics (`sae_bench/evals/core/main.py`), for every dictionary kind.

Names and groups are SAEBench's. With x the dictionary's target (the site an SAE reads, the
`mlp_out` a transcoder predicts; all L layers concatenated for multi-layer kinds), x̂ its
prediction, f the codes, n the kept tokens (see masking), per token unless said otherwise:

    model_behavior_preservation     kl_div_with_sae      mean KL(p_orig || p_spliced)
                                    kl_div_with_ablation mean KL(p_orig || p_zero-ablated)
                                    kl_div_score         (kl_abl - kl_sae) / kl_abl
    model_performance_preservation  ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation
                                    ce_loss_score        (ce_abl - ce_sae) / (ce_abl - ce_orig)
    reconstruction_quality          explained_variance   1 - Σ‖x - x̂‖² / Σ‖x - x̄‖² (= 1 - FVU)
                                    mse                  mean ‖x - x̂‖²
                                    cossim               mean cos(x, x̂) (0 where x̂ = 0)
    shrinkage                       l2_norm_in, l2_norm_out  mean ‖x‖, mean ‖x̂‖
                                    l2_ratio             mean ‖x̂‖ / ‖x‖ (‖x‖ < 1e-4 -> 1)
                                    relative_reconstruction_bias  E‖x̂‖² / E[x·x̂]
    sparsity                        l0 (#f != 0), l1 (Σ f: SAEBench sums, no abs)
    misc_metrics                    feature density = fraction of tokens with f_i > 0;
                                    frac_alive (density > 0), freq_over_1_percent,
                                    freq_over_10_percent, normalized_freq_over_*_percent (the
                                    share of total density in those latents),
                                    average_max_encoder_cosine_sim, average_max_decoder_cosine_sim
                                    (mean over latents of the largest cosine with another
                                    latent's encoder column / decoder row)

Splicing (the CE/KL groups): the model runs clean, with every output site replaced by the
prediction (at kept positions only: SAEBench's `exclude_special_tokens_from_reconstruction`),
and with every output site zeroed at *all* positions (SAEBench's zero-ablation hook zeroes
the whole sequence, BOS included). KL is averaged over kept positions t (all T of them), CE
over kept t < T - 1 (the loss of predicting t + 1), as SAEBench masks its per-token values by
the token at t.

Masking: a token is kept when its id is not special (`SPECIAL_IDS`: <pad>, <eos>, <bos>,
<start_of_turn>, <end_of_turn>; SAEBench passes pad/eos/bos, Gemma Scope 2 trains on neither
BOS nor the chat markers) and the attention mask is 1.

`core_metrics` (`evals.saebench_run`) runs the model and computes them all; this module holds
the definitions: targets and masking, the per-token and the weight-based metrics.

Where SAEBench 0.6.0's formula depends on its batching, the card holds the batch-independent
definition above under SAEBench's name, and `saebench_0_6_0` holds the value by SAEBench's own
formula over the same batches (equal when SAEBench is run with the same batches):
`relative_reconstruction_bias` (there: mean over batches of per-batch ratios), `mse` (there:
per-token ‖x - x̂‖² divided by the tokens of its batch, then averaged) and
`explained_variance` (there: 1 - E_b mean‖x - x̂‖² / (E_b mean‖x‖² - (mean_{b,d} E x_d²)²), which
subtracts the squared mean of x² rather than ‖E x‖²; docs/evaluate.md).

Multi-layer kinds (CLT, crosscoder) and transcoder sets: l0/l1 sum over source layers (GS2's
L0), per-token norms and cosines are over the concatenated layers, `explained_variance_per_layer`
and `l0_per_layer` keep the layers apart; max cosines are taken among the latents of one source
layer, a CLT latent's decoder vector being all its output layers together.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.evals.metrics import FVUAccumulator, FVUStats
from gemmascope_jax.gemma3.tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID, START_OF_TURN_ID

SPECIAL_IDS = (PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID)
TRANSCODER_SET = "transcoder_set"


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: one dictionary, or a transcoder set (one member per layer)."""

    members: tuple
    kind: str
    input_sites: tuple[str, ...]
    output_sites: tuple[str, ...]

    @property
    def multilayer(self) -> bool:
        return self.kind in ("clt", "crosscoder", TRANSCODER_SET)

    @property
    def num_layers(self) -> int:
        return len(self.output_sites)

    @property
    def widths(self) -> tuple[int, ...]:
        if self.kind == TRANSCODER_SET:
            return tuple(m.cfg.width for m in self.members)
        return (self.members[0].cfg.width,) * self.num_layers

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.input_sites, *self.output_sites)))


def as_target(obj) -> Target:
    """A `Target` from a `Dictionary` or a `TranscoderSet`."""
    from gemmascope_jax.dictionaries.sets import TranscoderSet

    if isinstance(obj, Target):
        return obj
    if isinstance(obj, TranscoderSet):
        members = tuple(obj.transcoders)
        return Target(
            members,
            TRANSCODER_SET,
            tuple(m.cfg.input_sites[0] for m in members),
            tuple(m.cfg.output_sites[0] for m in members),
        )
    cfg = obj.cfg
    return Target((obj,), cfg.kind, tuple(cfg.input_sites), tuple(cfg.output_sites))


def keep_mask(tokens, attention_mask=None, ignore_ids=SPECIAL_IDS) -> np.ndarray:
    """bool [B, T]: real tokens whose id is not in `ignore_ids`."""
    tokens = np.asarray(tokens)
    keep = ~np.isin(tokens, np.asarray(ignore_ids))
    if attention_mask is not None:
        keep &= np.asarray(attention_mask) != 0
    return keep


# ---- forward of a target ---------------------------------------------------------------------


def _encode_decode(members, kind: str, x):
    """(codes per layer [N, L, F] or list of [N, F_l], flat codes [N, ΣF], x̂ [N, (L,) D])."""
    x = x.astype(jnp.float32)
    if kind == TRANSCODER_SET:
        codes = [m.encode(x[:, j]) for j, m in enumerate(members)]
        y = jnp.stack(
            [m.decode(c, x[:, j]) for j, (m, c) in enumerate(zip(members, codes, strict=True))], 1
        )
        return codes, jnp.concatenate(codes, -1), y
    d = members[0]
    codes = d.encode(x)
    y = d.decode(codes, x)
    return codes, codes.reshape(codes.shape[0], -1), y


@functools.partial(jax.jit, static_argnames=("kind",))
def core_device(members, kind, x, mask):
    codes, flat, y_hat = _encode_decode(members, kind, x)
    w = mask.astype(jnp.float32)
    if kind == TRANSCODER_SET:
        l0_layers = jnp.stack([jnp.sum(c != 0, -1) for c in codes], -1)
    elif codes.ndim == 3:
        l0_layers = jnp.sum(codes != 0, -1)
    else:
        l0_layers = jnp.sum(codes != 0, -1)[:, None]
    return {
        "y_hat": y_hat,
        "l0": jnp.sum(flat != 0, -1).astype(jnp.float32),
        "l1": jnp.sum(flat, -1).astype(jnp.float32),
        "l0_layers": l0_layers.astype(jnp.float32),
        "fired": jnp.sum((flat > 0) * w[:, None], 0),
    }


# ---- reconstruction / sparsity metrics ------------------------------------------------------


def _np_fvu_stats(y: np.ndarray, y_hat: np.ndarray) -> FVUStats:
    mean = y.mean(0)
    return FVUStats(
        n=np.float64(y.shape[0]),
        sse=np.sum((y - y_hat) ** 2, axis=(0, -1)),
        shift=np.zeros_like(mean),
        mean=mean,
        m2=np.sum((y - mean) ** 2, axis=(0, -1)),
    )


class CoreAccumulator:
    """Sums for the reconstruction, shrinkage, sparsity and density metrics over batches."""

    def __init__(self, n_latents: int):
        self.fvu = FVUAccumulator()
        self.sums: dict[str, float] = {}
        self.fired = np.zeros(n_latents, np.float64)
        self.l0_layers = None
        self.n = 0
        self.per_batch: dict[str, list] = {
            "rrb": [],
            "mse": [],
            "mss": [],
            "ms_dim": [],
            "mres": [],
        }

    def _add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add(self, y, y_hat, keep, dev: dict[str, Any]) -> CoreAccumulator:
        """y, ŷ [N, (L,) D] and keep [N] for one batch of tokens; `dev` from `core_device`."""
        keep = np.asarray(keep, bool).reshape(-1)
        if not keep.any():
            return self
        y = np.asarray(y, np.float64)[keep]
        y_hat = np.asarray(y_hat, np.float64)[keep]
        self.fvu.add(_np_fvu_stats(y, y_hat))
        yf, hf = y.reshape(len(y), -1), y_hat.reshape(len(y), -1)
        n = len(yf)
        norm_in, norm_out = np.linalg.norm(yf, axis=-1), np.linalg.norm(hf, axis=-1)
        dot, sse = np.sum(yf * hf, -1), np.sum((yf - hf) ** 2, -1)
        denom = norm_in * norm_out
        self._add("l2_norm_in", norm_in.sum())
        self._add("l2_norm_out", norm_out.sum())
        self._add("l2_ratio", np.sum(norm_out / np.where(np.abs(norm_in) < 1e-4, 1.0, norm_in)))
        self._add("cossim", np.sum(np.where(denom > 0, dot / np.where(denom > 0, denom, 1), 0)))
        self._add("xhat_sq", np.sum(norm_out**2))
        self._add("x_dot_xhat", dot.sum())
        self._add("sse", sse.sum())
        self._add("l0", np.asarray(dev["l0"], np.float64)[keep].sum())
        self._add("l1", np.asarray(dev["l1"], np.float64)[keep].sum())
        layers = np.asarray(dev["l0_layers"], np.float64)[keep].sum(0)
        self.l0_layers = layers if self.l0_layers is None else self.l0_layers + layers
        self.fired += np.asarray(dev["fired"], np.float64)
        self.n += n
        b = self.per_batch  # SAEBench 0.6.0's batch-dependent formulas
        with np.errstate(divide="ignore", invalid="ignore"):
            b["rrb"].append(np.mean(norm_out**2) / np.mean(dot))
        b["mse"].append(np.sum(sse / n))
        b["mss"].append(np.mean(norm_in**2))
        b["ms_dim"].append(np.mean(yf**2, axis=0))
        b["mres"].append(np.mean(sse))
        return self

    def density(self) -> np.ndarray:
        return self.fired / max(self.n, 1)

    def summary(self) -> dict[str, dict[str, Any]]:
        n, s = max(self.n, 1), self.sums
        dens = self.density()
        total = dens.sum()
        per_layer = np.atleast_1d(self.fvu.per_group())
        b = self.per_batch
        ms_dim = float(np.mean(np.concatenate(b["ms_dim"]))) if b["ms_dim"] else float("nan")
        total_var = float(np.mean(b["mss"])) - ms_dim**2 if b["mss"] else float("nan")
        out = {
            "reconstruction_quality": {
                "explained_variance": 1.0 - self.fvu.value(),
                "mse": s["sse"] / n,
                "cossim": s["cossim"] / n,
                "explained_variance_per_layer": (1.0 - per_layer).tolist(),
            },
            "shrinkage": {
                "l2_norm_in": s["l2_norm_in"] / n,
                "l2_norm_out": s["l2_norm_out"] / n,
                "l2_ratio": s["l2_ratio"] / n,
                "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"]
                if s["x_dot_xhat"]
                else float("nan"),
            },
            "sparsity": {
                "l0": s["l0"] / n,
                "l1": s["l1"] / n,
                "l0_per_layer": (self.l0_layers / n).tolist(),
            },
            "misc_metrics": {
                "frac_alive": float(np.mean(dens > 0)),
                "freq_over_1_percent": float(np.mean(dens > 0.01)),
                "freq_over_10_percent": float(np.mean(dens > 0.1)),
                "normalized_freq_over_1_percent": float(dens[dens > 0.01].sum() / total)
                if total > 0
                else 0.0,
                "normalized_freq_over_10_percent": float(dens[dens > 0.1].sum() / total)
                if total > 0
                else 0.0,
            },
            "token_stats": {"total_tokens_eval_sparsity_variance": int(self.n)},
            "saebench_0_6_0": {
                "relative_reconstruction_bias": float(np.mean(b["rrb"])),
                "mse": float(np.sum(b["mse"]) / n),
                "explained_variance": 1.0 - float(np.mean(b["mres"])) / total_var,
            },
        }
        return out


# ---- weight-based metrics -------------------------------------------------------------------


@jax.jit
def _max_cos_chunk(w_unit, start, n_valid):
    chunk = jax.lax.dynamic_slice_in_dim(w_unit, start, 256, axis=0)
    sims = chunk @ w_unit.T
    rows = start + jnp.arange(chunk.shape[0])
    cols = jnp.arange(w_unit.shape[0])
    sims = jnp.where((rows[:, None] == cols[None, :]) | (cols[None, :] >= n_valid), -jnp.inf, sims)
    return jnp.max(sims, axis=1)


def max_cosine_sim(vectors) -> np.ndarray:
    """[F] largest cosine of each row of `vectors` [F, K] with any other row (SAEBench's
    `calculate_max_cosine_sim` on the transposed matrix; zero rows have cosine 0)."""
    w = jnp.asarray(vectors, jnp.float32)
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    f = w.shape[0]
    if f < 2:
        return np.full(f, np.nan)
    pad = -f % 256
    wp = jnp.concatenate([w, jnp.zeros((pad, w.shape[1]), w.dtype)]) if pad else w
    out = [np.asarray(_max_cos_chunk(wp, s, f)) for s in range(0, f, 256)]
    return np.concatenate(out)[:f]


def _encoder_decoder_vectors(target: Target) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per source layer: (encoder rows [F, D_in], decoder rows [F, K])."""
    out = []
    if target.kind == TRANSCODER_SET:
        for m in target.members:
            out.append((np.asarray(m.w_enc[...]).T, np.asarray(m.w_dec[...])))
        return out
    d = target.members[0]
    if not target.multilayer:
        return [(np.asarray(d.w_enc[...]).T, np.asarray(d.w_dec[...]))]
    w_enc = np.asarray(d.w_enc[...])
    for layer in range(d.cfg.num_layers):
        dec = np.asarray(d.w_dec[layer][...])
        out.append((w_enc[layer].T, dec.reshape(dec.shape[0], -1)))
    return out


def weight_metrics(target: Target) -> dict[str, float]:
    """`average_max_encoder_cosine_sim`, `average_max_decoder_cosine_sim`."""
    enc, dec = [], []
    for e, d in _encoder_decoder_vectors(target):
        enc.append(max_cosine_sim(e))
        dec.append(max_cosine_sim(d))
    return {
        "average_max_encoder_cosine_sim": float(np.nanmean(np.concatenate(enc))),
        "average_max_decoder_cosine_sim": float(np.nanmean(np.concatenate(dec))),
    }
