"""Running SAEBench's core eval (the metrics are defined in `evals.saebench`): the spliced
forwards of the CE / KL groups (clean, every output site replaced by the prediction, every
output site zeroed) and `core_metrics`, which runs a dictionary or transcoder set over token
batches and gathers every group.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope_jax.dictionaries.base import stack_sites
from gemmascope_jax.evals.saebench import (
    SPECIAL_IDS,
    TRANSCODER_SET,
    CoreAccumulator,
    as_target,
    core_device,
    keep_mask,
    weight_metrics,
)

# ---- spliced CE / KL -------------------------------------------------------------------------


class _Replacer:
    """Interventions of one forward: record the input sites, replace the output sites by the
    prediction (where `where`) or by zeros."""

    def __init__(self, members, kind, in_sites, out_sites, where, zero=False):
        self.members, self.kind = members, kind
        self.in_sites, self.out_sites = in_sites, out_sites
        self.where, self.zero = where[..., None], zero
        self.seen: dict[int, jax.Array] = {}

    def predict(self, j: int):
        if self.kind == TRANSCODER_SET:
            return self.members[j](self.seen[j])
        d = self.members[0]
        if self.kind not in ("clt", "crosscoder"):
            return d(self.seen[0])
        n = len(self.out_sites)
        xs = [self.seen.get(i, jnp.zeros_like(self.seen[0])) for i in range(n)]
        return d(jnp.stack(xs, axis=-2))[..., j, :]

    def _record(self, j):
        def fn(x):
            self.seen[j] = x.astype(jnp.float32)
            return x

        return fn

    def _replace(self, j, same_site):
        def fn(x):
            if same_site:
                self.seen[j] = x.astype(jnp.float32)
            new = jnp.zeros_like(x) if self.zero else self.predict(j).astype(x.dtype)
            return jnp.where(self.where, new, x)

        return fn

    def interventions(self):
        out = {}
        for j, (s_in, s_out) in enumerate(zip(self.in_sites, self.out_sites, strict=True)):
            if s_in != s_out:
                out[s_in] = self._record(j)
            out[s_out] = self._replace(j, s_in == s_out)
        return out


@functools.partial(jax.jit, static_argnames=("kind", "in_sites", "out_sites", "zero_all"))
def _recon_device(
    model, members, kind, in_sites, out_sites, tokens, attention_mask, keep, zero_all
):
    run = lambda r: model(tokens, attention_mask=attention_mask, interventions=r.interventions())
    clean = model(
        tokens, attention_mask=attention_mask, capture=tuple(dict.fromkeys(in_sites + out_sites))
    )
    spliced = run(_Replacer(members, kind, in_sites, out_sites, keep))
    zero_where = jnp.ones_like(keep) if zero_all else keep
    zeroed = run(_Replacer(members, kind, in_sites, out_sites, zero_where, zero=True))
    logp = [jax.nn.log_softmax(o.logits.astype(jnp.float32), -1) for o in (clean, spliced, zeroed)]
    kl = [jnp.sum(jnp.exp(logp[0]) * (logp[0] - lp), -1) for lp in logp[1:]]
    ce = [-jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0] for lp in logp]
    valid = jnp.ones_like(keep) if attention_mask is None else attention_mask != 0
    kl_w = (keep & valid).astype(jnp.float32)
    ce_w = (keep[:, :-1] & valid[:, 1:]).astype(jnp.float32)
    return {
        "kl_div_with_sae": jnp.sum(kl[0] * kl_w),
        "kl_div_with_ablation": jnp.sum(kl[1] * kl_w),
        "ce_loss_without_sae": jnp.sum(ce[0] * ce_w),
        "ce_loss_with_sae": jnp.sum(ce[1] * ce_w),
        "ce_loss_with_ablation": jnp.sum(ce[2] * ce_w),
        "kl_count": jnp.sum(kl_w),
        "ce_count": jnp.sum(ce_w),
    }, clean.sites


class ReconAccumulator:
    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, sums: dict[str, Any]) -> ReconAccumulator:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v, np.float64))
        return self

    def summary(self) -> dict[str, dict[str, float]]:
        s = self.sums
        kl = {k: s[k] / s["kl_count"] for k in ("kl_div_with_sae", "kl_div_with_ablation")}
        ce_keys = ("ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae")
        ce = {k: s[k] / s["ce_count"] for k in ce_keys}
        kl_abl, kl_sae = kl["kl_div_with_ablation"], kl["kl_div_with_sae"]
        ce_gap = ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]
        return {
            "model_behavior_preservation": {
                "kl_div_score": (kl_abl - kl_sae) / kl_abl if kl_abl else float("nan"),
                **kl,
            },
            "model_performance_preservation": {
                "ce_loss_score": (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / ce_gap
                if ce_gap
                else float("nan"),
                **ce,
            },
            "token_stats": {"total_tokens_eval_reconstruction": int(s["kl_count"])},
        }


def core_metrics(
    model,
    dictionary,
    batches: Iterable,
    *,
    ignore_ids=SPECIAL_IDS,
    splice: bool = True,
    zero_ablate_all_positions: bool = True,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """SAEBench core metrics of a dictionary (or transcoder set) on token batches [B, T] (or
    (tokens, attention_mask) pairs, BOS first). Returns (metrics by SAEBench group, feature
    density [ΣF])."""
    t = as_target(dictionary)
    core = CoreAccumulator(sum(t.widths))
    recon = ReconAccumulator()
    forward = None if splice else model.jitted(capture=t.sites, logits=False)
    for batch in batches:
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        tokens = jnp.asarray(tokens)
        keep = keep_mask(tokens, mask, ignore_ids)
        am = None if mask is None else jnp.asarray(mask)
        if splice:  # the clean run of the splice captures the sites too
            sums, sites = _recon_device(
                model,
                t.members,
                t.kind,
                t.input_sites,
                t.output_sites,
                tokens,
                am,
                jnp.asarray(keep),
                zero_ablate_all_positions,
            )
            recon.add(sums)
        else:
            sites = forward(tokens, attention_mask=am).sites
        x = stack_sites(sites, t.input_sites, t.multilayer)
        y = stack_sites(sites, t.output_sites, t.multilayer)
        x = x.reshape(-1, *x.shape[2:])
        y = y.reshape(-1, *y.shape[2:])
        dev = core_device(t.members, t.kind, x, jnp.asarray(keep.reshape(-1)))
        core.add(y, dev["y_hat"], keep, dev)
    out = core.summary()
    out["misc_metrics"].update(weight_metrics(t))
    if splice and recon.sums:
        r = recon.summary()
        out["model_behavior_preservation"] = r["model_behavior_preservation"]
        out["model_performance_preservation"] = r["model_performance_preservation"]
        out["token_stats"].update(r["token_stats"])
    return out, core.density()
