"""95 % intervals for pooled out-of-fold scores, with the episode as the unit and the split's variation included.

Steps of one episode are correlated, so the unit is the episode; and the out-of-fold scores of one outer
fold share one fitted probe, so episodes of a fold are correlated too (split-to-split variation).  A
proportion (accuracy, retrieval) is the ratio Σ hits / Σ rows; its interval is p̃ ± z·√(v_episode + v_fold):

* p̃ is Agresti–Coull on episodes: z²/2 pseudo-episodes of average length scoring 1 and z²/2 scoring 0
  are added, so a perfect score from a few episodes gives an interval of honest width, never [1, 1];
* v_episode is the cluster-robust (sandwich) variance of the ratio over (pseudo-)episodes, × M/(M−1);
* v_fold is the same variance with the outer folds as the units, × K/(K−1): what one fold's shared probe
  adds.  Without it the intervals covered 86–89 % at 16 episodes per task in the calibration study.

An R² (1 − ΣSSE/ΣSS₀) gets the same two variances by the delta method.  ``benchmarks/bench_calibration.py``
measures coverage and the null exclusion rate (docs/benchmarks.md, Probe calibration).
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054  # the normal 97.5 % quantile


def episode_sums(episode: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    """Per-unit sums of each per-row value (units in sorted order)."""
    _, inv = np.unique(episode, return_inverse=True)
    n = int(inv.max()) + 1 if len(inv) else 0
    return [np.bincount(inv, weights=np.asarray(v, dtype=np.float64), minlength=n) for v in values]


def _ratio_var(unit: np.ndarray, num: np.ndarray, den: np.ndarray, r: float) -> float:
    """Cluster-robust variance of Σnum/Σden at ratio r, with ``unit`` as the clusters."""
    a, b = episode_sums(unit, num, den)
    g = len(a)
    return float(((a - r * b) ** 2).sum() / b.sum() ** 2 * g / max(g - 1, 1))


def proportion_interval(episode: np.ndarray, hits: np.ndarray, fold: np.ndarray | None = None,
                        ) -> tuple[float, float]:
    """95 % interval for Σhits/Σrows (see the module docstring); without ``fold`` (no fitted probe shared
    by groups of rows, e.g. success rates of episodes) only the episode variance."""
    if len(hits) == 0:
        return float("nan"), float("nan")
    ones = np.ones(len(hits))
    a, n = episode_sums(episode, hits, ones)
    k, w = Z * Z / 2, n.mean()
    total = n.sum() + 2 * k * w
    p = (a.sum() + k * w) / total
    m = len(a) + 2 * k
    v_ep = (((a - p * n) ** 2).sum() + k * (w * (1 - p)) ** 2 + k * (w * p) ** 2) / total ** 2 * m / (m - 1)
    v_fold = _ratio_var(fold, hits, ones, float(hits.mean())) if fold is not None and len(np.unique(fold)) > 1 \
        else 0.0
    half = Z * np.sqrt(v_ep + v_fold)
    return float(max(0.0, p - half)), float(min(1.0, p + half))


def ratio_interval(episode: np.ndarray, sse: np.ndarray, ss0: np.ndarray, fold: np.ndarray) -> tuple[float, float]:
    """95 % interval for R² = 1 − Σsse/Σss0 by the delta method, episode and fold variances summed."""
    if len(sse) == 0 or ss0.sum() <= 0:
        return float("nan"), float("nan")
    r = float(sse.sum() / ss0.sum())
    var = _ratio_var(episode, sse, ss0, r) + (_ratio_var(fold, sse, ss0, r) if len(np.unique(fold)) > 1 else 0.0)
    half = Z * np.sqrt(var)
    return float(1 - r - half), float(min(1.0, 1 - r + half))
