"""Training losses of every dictionary kind and architecture (docs/recipe.md).

Shapes: N tokens; x [N, d_in], y [N, d_out] (single-layer) or x [N, L, d_in], y [N, L, d_out]
(CLT, crosscoder); codes [N, F] or [N, L, F]. `‖·‖²` sums over every axis but the token
axis (for multi-layer kinds: all layers together); `mean_n` averages over tokens.

    recon     = Σ_k w_k · mean_n ‖y - ŷ_k‖²      ŷ_k from the first n_k latents (Matryoshka
                                                 prefixes n_1 < ... < n_K = F; K = 1 and
                                                 ŷ_1 = ŷ without Matryoshka); w_k = 1 each
                                                 by default, i.e. the levels are *summed*
                                                 (SAELens `matryoshka_batchtopk`), so one
                                                 level weighs as much as a plain dictionary.

JumpReLU (rectangle STE with bandwidth ε, `activations.jumprelu_ste`; codes
`f = JumpReLU_θ(pre)`), with `L0_n = Σ_i H(pre_ni - θ_i)` through `heaviside_ste` so that θ
gets the L0 gradient:

    sparsity  = λ(t) · (2 / L0*) · (mean_n L0_n - L0*)²        l0_penalty="batch" (default)
              = λ(t) · (2 / L0*) · mean_n (L0_n - L0*)²        l0_penalty="token"
    freq      = c_freq · Σ_i relu(p_i - p_max)²,  p_i = mean_n H(pre_ni - θ_i)  (optional)
    loss      = recon + sparsity + freq

The quadratic L0 penalty is TR eq. 5 (docs/recipe.md: `λ·(2/L0*)·(‖f‖₀-L0*)²`);
whether GS2 squares the per-token or the batch-mean L0 is not stated, and the batch form
is the default because it pulls the *average* L0 to the target without also forcing every
token to the same L0. λ(t) warms up linearly from 0 (`sparsity_warmup_steps`); L0*(t) may
decay from `l0_target_init` (CLTs and crosscoders, TR §3.3). The high-frequency penalty's
GS2 form is unknown; this one punishes latents firing on more than `freq_penalty_max` of the
batch (TR §4.2 uses 10 %). Its step function (`freq_step`) passes the STE gradient to θ and
to the pre-activations: through θ alone the encoder bias rises with θ and a dense latent
stays dense. The recipe's default (`TrainConfig.freq_penalty_coeff` 3) leaves no latent
above 10 % (tests/test_freq_penalty.py); `LossConfig` itself defaults to off.

TopK / BatchTopK (codes from `Dictionary.activate`; gradients flow through the kept values),
with the auxiliary-k loss of Gao et al. (as sparsify / dictionary_learning) for dead
latents, i.e. latents that have not fired for `dead_steps` steps:

    e     = stop_grad(y - ŷ)                             residual of the full dictionary
    ê     = topk_{k_aux}(relu(pre) on dead latents) @ W_dec   (no bias, no skip; a
                                                             gather of k_aux rows)
    aux   = c_aux · min(n_dead / k_aux, 1) · Σ_n ‖e - ê‖² / Σ_n ‖e - mean_n e‖²
    loss  = recon + aux

k_aux defaults to d_out // 2 per source layer; c_aux to 1/32.

Sparse decode (issue 5, `pallas_kernels.sparse_decode`): TopK codes are built directly in
sparse form (`topk_codes`: values/indices [N, (L,) k], optionally `lax.approx_max_k` at
`topk_recall`) and every reconstruction is a sparse decode, so the decoder's forward and
backward cost O(N·k·d) (CLT: O(N·k·d·L(L+1)/2)) instead of O(N·F·d·...). JumpReLU takes the
same path when `sparse_k` bounds the active latents per token (and source layer): the K
largest codes are decoded, the rest dropped (`overflow` metric counts them; L0 and the
penalties still see all of them). BatchTopK takes it the same way: its per-batch threshold
gives each token a variable number of latents (k on average), so it stays dense unless
`sparse_k` is set; with `sparse_k` >= the largest per-token count (e.g. 4k; watch `overflow`)
nothing is dropped and the objective is unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemmascope_jax.dictionaries import activations as act_lib
from gemmascope_jax.dictionaries.base import Dictionary
from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.dictionaries.multilayer import causal_decode, causal_decode_sparse
from gemmascope_jax.dictionaries.sparse import (
    SparseCodes,
    decode_rows,
    fire_counts,
    sparsify,
    topk_codes,
)
from gemmascope_jax.evals.metrics import fvu_stats
from gemmascope_jax.training.schedules import linear_interpolate, linear_warmup

TRAINABLE_ARCHITECTURES = ("jumprelu", "topk", "batchtopk")


# Architectures whose codes have no fixed K per token: `sparse_k` bounds them (the K largest
# codes per token and source layer are decoded sparsely; the rest count in `overflow`).
BOUNDED_SPARSE = ("jumprelu", "batchtopk")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss settings of one dictionary (formulas in the module docstring).

    Fields:
        bandwidth: JumpReLU STE bandwidth ε in normalised units (GS2 0.001).
        threshold_init: JumpReLU θ of a fresh dictionary (None: the GS2 init, 0.001).
        sparsity_coeff: λ of the quadratic L0 penalty (GS2 value not published).
        sparsity_warmup_steps: linear λ warmup from 0 (GS2 50,000).
        l0_target: L0* (summed over source layers); None takes `DictionaryConfig.l0_target`.
        l0_target_init, l0_target_decay_steps: optional linear decay of L0* from
            `l0_target_init` to `l0_target` (TR §3.3: 50,000 steps for CLTs/crosscoders).
        l0_penalty: "batch" squares the batch-mean L0, "token" each token's L0.
        freq_penalty_coeff, freq_penalty_max: high-frequency penalty (0 = off).
        matryoshka_weights: one weight per prefix level (None: 1 each).
        aux_k, aux_coeff: auxiliary-k loss (TopK/BatchTopK); aux_k None -> d_out // 2.
        dead_steps: a latent that has not fired for this many steps is dead (aux-k loss and
            the `dead_fraction` metric).
        sparse_topk: TopK decodes from sparse codes (module docstring); False = dense.
        topk_recall: recall target of `lax.approx_max_k` for sparse TopK (None = exact).
        sparse_k: JumpReLU only: decode the `sparse_k` largest codes per token (and source
            layer) with the sparse op (None = dense decode).
        sparse_groups: with `sparse_k`, keep the sparse_k/G largest of each of G contiguous
            latent ranges (TR App. B.2; `dictionaries.sparse.sparsify`). With G a multiple
            of the mesh's `model` size, each device selects and decodes only its own
            latents; the result does not depend on the mesh.
    """

    bandwidth: float = 0.001
    threshold_init: float | None = None
    sparsity_coeff: float = 1.0
    sparsity_warmup_steps: int = 50_000
    l0_target: float | None = None
    l0_target_init: float | None = None
    l0_target_decay_steps: int = 50_000
    l0_penalty: str = "batch"
    freq_penalty_coeff: float = 0.0
    freq_penalty_max: float = 0.1
    matryoshka_weights: tuple[float, ...] | None = None
    aux_k: int | None = None
    aux_coeff: float = 1 / 32
    dead_steps: int = 1000
    sparse_topk: bool = True
    topk_recall: float | None = None
    sparse_k: int | None = None
    sparse_groups: int = 1

    def check(self, cfg: DictionaryConfig) -> None:
        """Raise a ValueError naming every field that does not fit the dictionary `cfg`."""
        problems = []
        if cfg.architecture not in TRAINABLE_ARCHITECTURES:
            problems.append(
                f"architecture {cfg.architecture!r} cannot be trained; "
                f"expected one of {TRAINABLE_ARCHITECTURES}"
            )
        if cfg.architecture == "jumprelu":
            target = self.target(cfg)
            if target is None or target <= 0:
                problems.append("jumprelu training needs l0_target > 0 (loss or dictionary)")
            if self.bandwidth <= 0:
                problems.append(f"bandwidth must be > 0, got {self.bandwidth}")
            if self.threshold_init is not None and self.threshold_init < 0:
                problems.append(f"threshold_init must be >= 0, got {self.threshold_init}")
        if self.l0_penalty not in ("batch", "token"):
            problems.append(f"l0_penalty must be 'batch' or 'token', got {self.l0_penalty!r}")
        levels = len(cfg.matryoshka_widths or (cfg.width,))
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != levels:
            problems.append(
                f"matryoshka_weights has {len(self.matryoshka_weights)} entries for {levels} "
                f"prefix levels {cfg.matryoshka_widths}"
            )
        if self.aux_k is not None and not 1 <= self.aux_k <= cfg.width:
            problems.append(f"aux_k must be in 1..{cfg.width}, got {self.aux_k}")
        if self.dead_steps < 1:
            problems.append(f"dead_steps must be >= 1, got {self.dead_steps}")
        if self.sparse_k is not None:
            if cfg.architecture not in BOUNDED_SPARSE:
                problems.append(
                    f"sparse_k bounds JumpReLU / BatchTopK codes; {cfg.architecture} "
                    + ("uses its k" if cfg.architecture == "topk" else "trains dense")
                )
            elif not 1 <= self.sparse_k <= cfg.width:
                problems.append(f"sparse_k must be in 1..{cfg.width}, got {self.sparse_k}")
            elif self.sparse_k % self.sparse_groups or cfg.width % self.sparse_groups:
                problems.append(
                    f"sparse_groups {self.sparse_groups} must divide sparse_k "
                    f"({self.sparse_k}) and the width ({cfg.width})"
                )
        if self.sparse_groups < 1:
            problems.append(f"sparse_groups must be >= 1, got {self.sparse_groups}")
        if self.topk_recall is not None and not 0 < self.topk_recall <= 1:
            problems.append(f"topk_recall must be in (0, 1], got {self.topk_recall}")
        if problems:
            raise ValueError(f"invalid LossConfig for {cfg.kind}: " + "; ".join(problems))

    def target(self, cfg: DictionaryConfig) -> float | None:
        return self.l0_target if self.l0_target is not None else cfg.l0_target

    def target_at(self, cfg: DictionaryConfig, step):
        """L0*(step)."""
        end = float(self.target(cfg))
        if self.l0_target_init is None:
            return jnp.asarray(end, jnp.float32)
        return linear_interpolate(self.l0_target_init, end, self.l0_target_decay_steps, step)


def latent_slice_decode(d: Dictionary, codes: jax.Array, start: int, stop: int) -> jax.Array:
    """Contribution of latents [start, stop) (of every source layer) to the prediction,
    without bias or skip: codes [N, (L,) F] -> [N, (L,) d_out]."""
    dt = jnp.result_type(codes.dtype, d.cfg.param_dtype)
    part = codes[..., start:stop].astype(dt)
    if d.cfg.multilayer:
        return causal_decode(part, tuple(w[...][start:stop].astype(dt) for w in d.w_dec))
    return part @ d.w_dec[...][start:stop].astype(dt)


def prefix_reconstructions(
    d: Dictionary, codes: jax.Array, x: jax.Array, widths: tuple[int, ...]
) -> list[jax.Array]:
    """`[d.decode(codes, x, prefix=n) for n in widths]`, built cumulatively so that all
    levels together cost one full decode."""
    out = [d.decode(codes, x, prefix=widths[0])]
    for start, stop in zip(widths, widths[1:], strict=False):
        out.append(out[-1] + latent_slice_decode(d, codes, start, stop))
    return out


def sparse_training_codes(
    d: Dictionary, pre: jax.Array, codes: jax.Array | None, lcfg: LossConfig
) -> SparseCodes | None:
    """The sparse codes the loss decodes from, or None for a dense decode (module doc)."""
    cfg = d.cfg
    if cfg.architecture == "topk" and lcfg.sparse_topk:
        return topk_codes(pre, cfg.k, recall_target=lcfg.topk_recall)
    if cfg.architecture in BOUNDED_SPARSE and lcfg.sparse_k is not None:
        return sparsify(
            codes, lcfg.sparse_k, recall_target=lcfg.topk_recall, groups=lcfg.sparse_groups
        )
    return None


def _sq(a: jax.Array) -> jax.Array:
    """Per-token squared norm [N] over all non-token axes."""
    return jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))


def dictionary_loss(
    d: Dictionary,
    x: jax.Array,
    y: jax.Array,
    lcfg: LossConfig,
    *,
    step: jax.Array,
    steps_since_fired: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics for one batch (see the module docstring).

    x [N, (L,) d_in], y [N, (L,) d_out] (normalised activations), `step` the int32 train
    step, `steps_since_fired` [(L,) F] int32. Metrics: `loss`, `recon_loss`, `mse` (full
    dictionary), `mse_prefix_{n}` per Matryoshka level, `l0`, `fire_counts` [(L,) F] (tokens
    on which each latent fired), `fvu_stats`, and per architecture `sparsity_loss`,
    `sparsity_coeff`, `l0_target`, `freq_penalty` or `aux_loss`, `num_dead`.
    """
    cfg = d.cfg
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    pre = d.pre_activations(x)
    token_free = tuple(range(1, pre.ndim))
    jump = cfg.architecture == "jumprelu"
    sparse_topk = cfg.architecture == "topk" and lcfg.sparse_topk
    codes = None if sparse_topk else d.activate(pre, bandwidth=lcfg.bandwidth if jump else None)
    sparse = sparse_training_codes(d, pre, codes, lcfg)

    widths = tuple(cfg.matryoshka_widths or (cfg.width,))
    weights = lcfg.matryoshka_weights or (1.0,) * len(widths)
    if sparse is None:
        recons = prefix_reconstructions(d, codes, x, widths)
    else:
        recons = [d.decode_sparse(sparse, x, prefix=n) for n in widths]
    mses = [jnp.mean(_sq(y - r)) for r in recons]
    recon_loss = sum(w * m for w, m in zip(weights, mses, strict=True))
    y_hat = recons[-1]
    if codes is None:
        l0_tokens = jnp.sum(sparse.l0(), axis=tuple(range(1, sparse.overflow.ndim)))
        counts = fire_counts(sparse, cfg.width)
    else:
        fired = codes > 0
        l0_tokens = fired.sum(token_free)
        counts = fired.sum(0).astype(jnp.int32)
    metrics = {
        "mse": mses[-1],
        "l0": jnp.mean(l0_tokens.astype(jnp.float32)),
        "fire_counts": counts,
        "fvu_stats": fvu_stats(jax.lax.stop_gradient(y), jax.lax.stop_gradient(y_hat)),
    }
    if sparse is not None and jump:
        metrics["overflow"] = jnp.mean(sparse.overflow.sum(token_free[:-1]).astype(jnp.float32))
    if len(widths) > 1:
        metrics.update({f"mse_prefix_{n}": m for n, m in zip(widths, mses, strict=True)})
    num_dead = jnp.sum(steps_since_fired >= lcfg.dead_steps)
    metrics["num_dead"] = num_dead

    if jump:
        extra = jumprelu_penalties(d, pre, lcfg, step, metrics)
    else:
        extra = _aux_k_loss(d, pre, y - y_hat, steps_since_fired, num_dead, lcfg, metrics)
    loss = recon_loss + extra
    metrics["recon_loss"] = recon_loss
    metrics["loss"] = loss
    return loss, metrics


def jumprelu_penalties(
    d: Dictionary, pre, lcfg: LossConfig, step, metrics, weights: jax.Array | None = None
) -> jax.Array:
    """The quadratic L0 penalty and the frequency penalty of pre-activations `pre` [N, (L,) F];
    `weights` [N] (e.g. 0/1 for the tokens a finetune splices) weight the token means."""
    cfg = d.cfg

    def token_mean(a):  # [N, ...] -> [...]
        if weights is None:
            return jnp.mean(a, axis=0)
        w = weights.reshape(weights.shape + (1,) * (a.ndim - 1)).astype(a.dtype)
        return jnp.sum(w * a, axis=0) / jnp.maximum(jnp.sum(weights), 1.0).astype(a.dtype)

    step_fn = act_lib.heaviside_ste(pre, d.threshold[...].astype(pre.dtype), lcfg.bandwidth)
    l0_tokens = jnp.sum(step_fn, axis=tuple(range(1, pre.ndim)))  # [N], STE for θ
    target = lcfg.target_at(cfg, step)
    coeff = linear_warmup(lcfg.sparsity_coeff, lcfg.sparsity_warmup_steps, step)
    if lcfg.l0_penalty == "batch":
        dev = jnp.square(token_mean(l0_tokens) - target)
    else:
        dev = token_mean(jnp.square(l0_tokens - target))
    sparsity = coeff * (2.0 / target) * dev
    metrics.update(sparsity_loss=sparsity, sparsity_coeff=coeff, l0_target=target)
    if lcfg.freq_penalty_coeff <= 0:
        return sparsity
    # [(L,) F] firing frequency; its STE reaches θ *and* the pre-activations (the encoder),
    # else the encoder bias follows θ up and the frequency never falls (see freq_step)
    freq = token_mean(freq_step(pre, d.threshold[...].astype(pre.dtype), lcfg.bandwidth))
    penalty = lcfg.freq_penalty_coeff * jnp.sum(
        jnp.square(jax.nn.relu(freq - lcfg.freq_penalty_max))
    )
    metrics["freq_penalty"] = penalty
    return sparsity + penalty


@jax.custom_vjp
def freq_step(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """`1[pre > θ]` with the rectangle-kernel STE on both sides: d/dθ = -K/ε (as
    `heaviside_ste`) and d/dpre = +K/ε. For the high-frequency penalty: with the gradient on θ
    alone, the encoder bias rises with θ (both by ~lr per Adam step) and a dense latent stays
    dense; through the pre-activations the penalty also lowers the encoder's output."""
    return (pre > threshold).astype(pre.dtype)


def _freq_step_fwd(pre, threshold, bandwidth):
    return freq_step(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _freq_step_bwd(res, g):
    pre, threshold, bandwidth = res
    k = (jnp.abs((pre - threshold) / bandwidth) < 0.5).astype(pre.dtype) / bandwidth * g
    d_th = -k.sum(axis=tuple(range(k.ndim - jnp.ndim(threshold))))
    return k, d_th.reshape(jnp.shape(threshold)).astype(jnp.result_type(threshold)), None


freq_step.defvjp(_freq_step_fwd, _freq_step_bwd)


def _aux_k_loss(d, pre, residual, steps_since_fired, num_dead, lcfg: LossConfig, metrics):
    """Skipped (0, no compute) while no latent is dead; ê is a gather of k_aux decoder rows
    per token (and source layer), not a dense decode."""
    cfg = d.cfg
    k_aux = min(lcfg.aux_k or max(cfg.d_out // 2, 1), cfg.width)
    dead = steps_since_fired >= lcfg.dead_steps  # [(L,) F]
    e = jax.lax.stop_gradient(residual)

    def aux(pre, blocks):
        values, indices = jax.lax.top_k(jnp.where(dead, jax.nn.relu(pre), 0.0), k_aux)
        if cfg.multilayer:
            e_hat = causal_decode_sparse(values, indices, blocks)
        else:
            e_hat = decode_rows(values, indices, blocks[0])
        total_var = jnp.sum(_sq(e - jnp.mean(e, axis=0)))
        ratio = jnp.sum(_sq(e - e_hat)) / jnp.maximum(total_var, jnp.finfo(jnp.float32).tiny)
        scale = jnp.minimum(num_dead / (k_aux * cfg.num_layers), 1.0)
        return lcfg.aux_coeff * scale * ratio

    blocks = tuple(w[...].astype(pre.dtype) for w in (d.w_dec if cfg.multilayer else [d.w_dec]))
    skip = lambda pre, blocks: jnp.zeros((), pre.dtype)
    loss = jax.lax.cond(num_dead > 0, aux, skip, pre, blocks)
    metrics["aux_loss"] = loss
    return loss
