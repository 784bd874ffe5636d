"""Synthetic ground truth: train dictionaries on activations built from known sparse features.

Shapes: N true features, D hidden dims, F dictionary latents, n tokens.

Generator (after SAELens' synthetic data / SynthSAEBench, Chanin & Garriga-Alonso 2026,
arXiv:2602.14687; own code). `SyntheticModel(SyntheticConfig(...))` holds

    features  [N, D]  unit vectors d_i (orthonormal when N <= D, else random unit vectors:
                      N > D is superposition)
    probs     [N]     firing probabilities p_i, Zipf-like: p_i = max(p_max (i+1)^-a, p_min)
    mag_mean  [N]     mean magnitudes, linear from `mag_start` (frequent) to `mag_end` (rare)
    parent    [N]     parent feature index or -1 (hierarchy forest, see below)
    loadings  [N, R]  low-rank Gaussian-copula factors (correlation, see below)
    bias      [D]     constant offset of norm `bias_norm`

and `sample(n, rng)` returns x [n, D] = f @ features + bias + noise and f [n, N] with
f_i = fire_i * |mag_mean_i + mag_std * N(0,1)| (folded normal magnitudes).

Correlation: fire_i = [z_i < Φ⁻¹(p_i)] with z = loadings @ g + sqrt(1 - |loadings_i|²) e,
g ~ N(0, I_R), e ~ N(0, I_N): every feature keeps its marginal rate p_i, and two features
with loadings of the same sign tend to co-fire (latent correlation loadings_i · loadings_j).
Hierarchy: `hierarchy_roots` trees with `branching` children per node and `hierarchy_depth`
levels below the roots, on the most frequent features (roots first). A child can fire only
when its parent fires; its own draw uses min(1, p_child / p_parent) so that its marginal rate
stays near p_child; with `mutually_exclusive` at most one child of a parent fires (a random
one of those drawn), which lowers the children's rates.

Training on it with the project's train step: `training.synthetic.train_on_synthetic`.

Metrics (`ground_truth_metrics`; decoder rows w_dec [F, D] against features [N, D]):
- `mcc_max` (mean max cosine similarity, Sharkey et al. 2022 "Taking features out of
  superposition"): mean over true features of max_j |cos(w_j, d_i)|.
- `mcc` (Hungarian, O'Neill et al. 2024 arXiv:2411.13117, as SAELens `synthetic/evals.py`):
  optimal one-to-one matching of latents and features on |cos|, mean over matched pairs.
- `uniqueness` (SynthSAEBench): #distinct argmax_i |cos(w_j, d_i)| over live latents j,
  divided by the number of live latents (1 = no two latents track the same feature).
- `recovered`: fraction of true features with max |cos| > 0.9.
- `shrinkage` (SAELens): mean over tokens of ||x̂|| / ||x|| (1 = no shrinkage).
- `magnitude_ratio`: on Hungarian-matched pairs with cos > 0.9, the median over pairs of
  mean(code_j) / mean(true magnitude_i) over tokens where both fire (codes are in the units
  of the true magnitudes: decoder rows are unit norm and the data scale is undone).
- `fvu`, `l0`, `dead_fraction` (latents that never fire on the eval tokens), `true_l0`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import ndtri


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings (module docstring). Sizes: `num_features` N, `d` D."""

    num_features: int = 256
    d: int = 64
    p_max: float = 0.2
    p_min: float = 0.005
    zipf_exponent: float = 0.5
    mag_start: float = 5.0
    mag_end: float = 4.0
    mag_std: float = 0.5
    correlation_rank: int = 0
    correlation_scale: float = 0.0
    hierarchy_roots: int = 0
    branching: int = 4
    hierarchy_depth: int = 1
    mutually_exclusive: bool = True
    noise_std: float = 0.0
    bias_norm: float = 0.0
    seed: int = 0


class SyntheticModel:
    """Fixed ground truth drawn from `cfg.seed`; `sample` draws tokens (module docstring)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        n, d = cfg.num_features, cfg.d
        rng = np.random.default_rng(cfg.seed)
        if n <= d:
            q, _ = np.linalg.qr(rng.standard_normal((d, n)))
            feats = q.T
        else:
            feats = rng.standard_normal((n, d))
        self.features = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
        ranks = np.arange(1, n + 1, dtype=np.float64)
        self.probs = np.maximum(cfg.p_max * ranks ** (-cfg.zipf_exponent), cfg.p_min)
        self.mag_mean = np.linspace(cfg.mag_start, cfg.mag_end, n)
        b = rng.standard_normal(d)
        self.bias = (cfg.bias_norm * b / np.linalg.norm(b)).astype(np.float32)
        r = cfg.correlation_rank
        self.loadings = np.zeros((n, max(r, 1)))
        if r > 0 and cfg.correlation_scale > 0:
            a = rng.standard_normal((n, r))
            self.loadings = cfg.correlation_scale * a / np.linalg.norm(a, axis=1, keepdims=True)
        self.parent = np.full(n, -1, np.int64)
        self.levels: list[np.ndarray] = []  # per level below the roots: child ids [P, branching]
        parents = np.arange(min(cfg.hierarchy_roots, n))
        nxt = len(parents)
        for _ in range(cfg.hierarchy_depth if cfg.hierarchy_roots else 0):
            need = len(parents) * cfg.branching
            if nxt + need > n:
                break
            kids = np.arange(nxt, nxt + need).reshape(len(parents), cfg.branching)
            self.parent[kids] = parents[:, None]
            self.levels.append(kids)
            parents, nxt = kids.ravel(), nxt + need
        self._thresh = ndtri(self.probs)
        cond = self.probs.copy()
        has = self.parent >= 0
        cond[has] = np.minimum(1.0, self.probs[has] / self.probs[self.parent[has]])
        self._cond_thresh = ndtri(cond)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n tokens: (x [n, D] float32, true feature activations f [n, N] float32)."""
        cfg = self.cfg
        nf = cfg.num_features
        e = rng.standard_normal((n, nf))
        if cfg.correlation_rank > 0 and cfg.correlation_scale > 0:
            g = rng.standard_normal((n, self.loadings.shape[1]))
            resid = np.sqrt(1.0 - np.sum(self.loadings**2, axis=1))
            z = g @ self.loadings.T + resid * e
        else:
            z = e
        fire = z < np.where(self.parent >= 0, self._cond_thresh, self._thresh)
        for kids in self.levels:  # parents before children
            fire[:, kids] &= fire[:, self.parent[kids]]
            if cfg.mutually_exclusive:
                sub = fire[:, kids]  # [n, P, branching]
                score = np.where(sub, rng.random(sub.shape), -1.0)
                keep = np.arange(cfg.branching) == np.argmax(score, axis=-1)[..., None]
                fire[:, kids] = sub & keep
        mags = np.abs(self.mag_mean + cfg.mag_std * rng.standard_normal((n, nf)))
        f = np.where(fire, mags, 0.0).astype(np.float32)
        x = f @ self.features + self.bias
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * rng.standard_normal(x.shape)
        return x.astype(np.float32), f


def abs_cosines(learned: np.ndarray, true: np.ndarray) -> np.ndarray:
    """|cos| between rows: learned [F, D], true [N, D] -> [F, N]."""
    a = learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)
    b = true / np.maximum(np.linalg.norm(true, axis=1, keepdims=True), 1e-12)
    return np.abs(a @ b.T)


def direction_metrics(
    learned: np.ndarray, true: np.ndarray, live: np.ndarray | None = None
) -> dict[str, float]:
    """`mcc_max`, `mcc` (Hungarian), `uniqueness`, `recovered` for w_dec [F, D] vs
    features [N, D]; `live` [F] bool restricts uniqueness to latents that fire."""
    cos = abs_cosines(np.asarray(learned, np.float64), np.asarray(true, np.float64))
    rows, cols = linear_sum_assignment(-cos)
    live = np.ones(cos.shape[0], bool) if live is None else np.asarray(live, bool)
    best = np.argmax(cos[live], axis=1)
    return {
        "mcc_max": float(cos.max(axis=0).mean()),
        "mcc": float(cos[rows, cols].mean()),
        "uniqueness": float(np.unique(best).size / max(int(live.sum()), 1)),
        "recovered": float(np.mean(cos.max(axis=0) > 0.9)),
    }


def ground_truth_metrics(d, model: SyntheticModel, scale: float, x, f) -> dict[str, float]:
    """All metrics (module docstring) of dictionary `d` (trained on x / scale) on eval tokens
    x [n, D] (raw) with their true activations f [n, N]."""
    xs = jnp.asarray(x / scale)
    codes = np.asarray(d.encode(xs))  # [n, F]
    x_hat = np.asarray(d.decode(jnp.asarray(codes), xs)) * scale
    fired = codes > 0
    live = fired.any(axis=0)
    w_dec = np.asarray(d.w_dec[...])
    out = direction_metrics(w_dec, model.features, live)
    xn = np.linalg.norm(x, axis=1)
    ok = xn > 0
    out["shrinkage"] = float(np.mean(np.linalg.norm(x_hat, axis=1)[ok] / xn[ok]))
    out["fvu"] = float(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))
    out["l0"] = float(fired.sum(axis=1).mean())
    out["true_l0"] = float((f > 0).sum(axis=1).mean())
    out["dead_fraction"] = float(1.0 - live.mean())
    cos = abs_cosines(w_dec, model.features)
    rows, cols = linear_sum_assignment(-cos)
    ratios = []
    for j, i in zip(rows, cols, strict=True):
        both = fired[:, j] & (f[:, i] > 0)
        if cos[j, i] > 0.9 and both.sum() >= 5:
            ratios.append(codes[both, j].mean() * scale / f[both, i].mean())
    out["magnitude_ratio"] = float(np.median(ratios)) if ratios else float("nan")
    return out
