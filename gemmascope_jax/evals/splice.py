"""Delta LM loss and KL with a dictionary's prediction spliced into Gemma 3 (docs/recipe.md).

For tokens [B, T] (held-out text, BOS first) the model runs twice: clean, and with every
output site of the dictionary replaced by the dictionary's prediction
(`model(tokens, interventions={site: ...})`):

    SAE / crosscoder    site s.l  <- d(x)[l]          x = the site's value(s) in this run
    transcoder          mlp_out.l <- d(mlp_in.l)
    CLT                 mlp_out.l <- d(mlp_in.0..l)[l]   causal: later inputs see the
                                                       spliced residual stream

Only real tokens after each row's first, and never a <bos>, are spliced: every BOS stays
clean, the row's first and those that separate packed documents (GS2 neither trains nor
splices on BOS; a BOS's residual is ~14x a token's norm at the 270M's `resid_post.9`).
`use_error_term=True` adds the clean run's error
`y_clean - d(x_clean)` to the prediction (for one site this reproduces the clean run
exactly; for several sites it measures only the effect of upstream changes).
`zero_ablation=True` also runs with the output sites zeroed, for the CE loss score.

Metrics are means over predicted positions t (logits at t predict token t+1) with t
spliced and t+1 a real token:

    ce_clean, ce_spliced     cross-entropy (nats)
    delta_loss               ce_spliced - ce_clean
    kl                       KL(p_clean || p_spliced), summed over the vocabulary
    ce_loss_score            (ce_zero - ce_spliced) / (ce_zero - ce_clean)   (zero_ablation)

Dictionaries trained on normalised activations take `input_scale` / `output_scale`
(scalars, or [L] per layer): prediction = s_out · d(x / s_in). Folded (exported)
dictionaries use the defaults 1.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.gemma3.tokenizer import BOS_ID

_SUMS = ("ce_clean", "ce_spliced", "ce_zero", "kl", "count")


def _keep_mask(tokens: jax.Array, attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(valid [B, T], spliced [B, T]): real tokens, and real tokens after the row's first that
    are not <bos>."""
    valid = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask != 0
    first = jnp.argmax(valid, axis=1)
    spliced = valid & (jnp.arange(tokens.shape[1])[None, :] > first[:, None]) & (tokens != BOS_ID)
    return valid, spliced


def _log_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


def _ce(logp: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position CE [B, T-1] of next tokens under log-probs [B, T-1, V]."""
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def at_least_f32(x: jax.Array) -> jax.Array:
    """At least float32 (float64 stays: finetuning's finite-difference test runs in it)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Splicer:
    """The interventions of one spliced forward of dictionary `d`: records the input sites as
    the forward reaches them, and replaces output site j at the `spliced` positions [B, T]
    with the prediction from the spliced run's inputs 0..j (causal, for CLTs: layer j's
    prediction reads only layers <= j), scaled by `s_in` / `s_out` (normalised units in,
    raw units out). `errors` (per output site) are added to the predictions (SAE-error
    splicing); `zero` writes zeros instead (zero ablation); `forward` maps normalised inputs
    [B, T, (L,) d_in] to predictions [B, T, (L,) d_out] (default: the dictionary itself;
    finetuning passes its straight-through-estimator forward). The one spliced prediction of
    the splice eval and the finetune step."""

    def __init__(self, d, spliced, s_in, s_out, errors=None, zero=False, forward=None):
        self.d, self.cfg = d, d.cfg
        self.spliced = spliced[..., None]
        self.s_in, self.s_out = s_in, s_out
        self.errors, self.zero = errors, zero
        self.forward = d if forward is None else forward
        self.seen: dict[int, jax.Array] = {}

    def _inputs_upto(self, j: int) -> jax.Array:
        """Dictionary input [B, T, (L,) d_in] from the recorded sites 0..j (zeros after j)."""
        if not self.cfg.multilayer:
            return self.seen[0] / self.s_in
        xs = [self.seen.get(i, jnp.zeros_like(self.seen[0])) for i in range(self.cfg.num_layers)]
        s_in = jnp.broadcast_to(self.s_in, (self.cfg.num_layers,))
        return jnp.stack(xs, axis=-2) / s_in[:, None]

    def predict(self, j: int) -> jax.Array:
        y = self.forward(at_least_f32(self._inputs_upto(j)))
        if self.cfg.multilayer:
            return y[..., j, :] * jnp.broadcast_to(self.s_out, (self.cfg.num_layers,))[j]
        return y * self.s_out

    def record(self, j: int):
        def fn(x):
            self.seen[j] = at_least_f32(x)
            return x

        return fn

    def replace(self, j: int, same_site: bool):
        def fn(x):
            if same_site:
                self.seen[j] = at_least_f32(x)
            if self.zero:
                new = jnp.zeros_like(x)
            else:
                new = self.predict(j)
                if self.errors is not None:
                    new = new + self.errors[j]
            return jnp.where(self.spliced, new.astype(x.dtype), x)

        return fn

    def interventions(self) -> dict[str, Any]:
        out = {}
        for j, (s_in, s_out) in enumerate(
            zip(self.cfg.input_sites, self.cfg.output_sites, strict=True)
        ):
            if s_in != s_out:
                out[s_in] = self.record(j)
            out[s_out] = self.replace(j, same_site=s_in == s_out)
        return out


@functools.partial(jax.jit, static_argnames=("use_error_term", "zero_ablation"))
def splice_batch(
    model,
    d,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    input_scale=1.0,
    output_scale=1.0,
    *,
    use_error_term: bool = False,
    zero_ablation: bool = False,
) -> dict[str, jax.Array]:
    """Sums over one batch (`ce_clean`, `ce_spliced`, `ce_zero` (0 without
    `zero_ablation`), `kl`, `count` positions); combine batches with `SpliceAccumulator`."""
    cfg = d.cfg
    tokens = jnp.asarray(tokens)
    s_in = jnp.asarray(input_scale, jnp.float32)
    s_out = jnp.asarray(output_scale, jnp.float32)
    valid, spliced = _keep_mask(tokens, attention_mask)
    sites = tuple(dict.fromkeys((*cfg.input_sites, *cfg.output_sites)))
    clean = model(tokens, attention_mask=attention_mask, capture=sites)
    errors = None
    if use_error_term:
        splicer = Splicer(d, spliced, s_in, s_out)
        splicer.seen = {
            j: clean.sites[s].astype(jnp.float32) for j, s in enumerate(cfg.input_sites)
        }
        errors = [
            clean.sites[s].astype(jnp.float32) - splicer.predict(j)
            for j, s in enumerate(cfg.output_sites)
        ]
    run = Splicer(d, spliced, s_in, s_out, errors)
    patched = model(tokens, attention_mask=attention_mask, interventions=run.interventions())

    mask = (spliced[:, :-1] & valid[:, 1:]).astype(jnp.float32)
    logp_clean, logp_spliced = _log_probs(clean.logits), _log_probs(patched.logits)
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced), axis=-1)
    out = {
        "ce_clean": jnp.sum(_ce(logp_clean, tokens) * mask),
        "ce_spliced": jnp.sum(_ce(logp_spliced, tokens) * mask),
        "ce_zero": jnp.zeros((), jnp.float32),
        "kl": jnp.sum(kl * mask),
        "count": jnp.sum(mask),
    }
    if zero_ablation:
        zero = Splicer(d, spliced, s_in, s_out, zero=True)
        zeroed = model(tokens, attention_mask=attention_mask, interventions=zero.interventions())
        out["ce_zero"] = jnp.sum(_ce(_log_probs(zeroed.logits), tokens) * mask)
    return out


class SpliceAccumulator:
    """Sums `splice_batch` outputs (float64) and turns them into the metrics."""

    def __init__(self):
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.zero = False

    def add(self, sums: dict[str, Any], zero_ablation: bool = False) -> SpliceAccumulator:
        for k in _SUMS:
            self.sums[k] += float(np.asarray(sums[k], np.float64))
        self.zero = self.zero or zero_ablation
        return self

    def summary(self) -> dict[str, float]:
        n = self.sums["count"]
        ce_clean, ce_spliced = self.sums["ce_clean"] / n, self.sums["ce_spliced"] / n
        out = {
            "ce_clean": ce_clean,
            "ce_spliced": ce_spliced,
            "delta_loss": ce_spliced - ce_clean,
            "kl": self.sums["kl"] / n,
            "positions": int(n),
        }
        if self.zero:
            ce_zero = self.sums["ce_zero"] / n
            out["ce_zero"] = ce_zero
            out["ce_loss_score"] = (ce_zero - ce_spliced) / (ce_zero - ce_clean)
        return out


def splice_eval(
    model,
    d,
    batches: Iterable[Any],
    *,
    input_scale=1.0,
    output_scale=1.0,
    use_error_term: bool = False,
    zero_ablation: bool = False,
) -> dict[str, float]:
    """Splice metrics over batches of tokens [B, T] or (tokens, attention_mask) pairs."""
    acc = SpliceAccumulator()
    for batch in batches:
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        sums = splice_batch(
            model,
            d,
            tokens,
            mask,
            input_scale,
            output_scale,
            use_error_term=use_error_term,
            zero_ablation=zero_ablation,
        )
        acc.add(sums, zero_ablation)
    return acc.summary()
