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

The same variances give the per-cell test "above chance" (``proportion_p``, ``r2_p``: one-sided score tests,
the variance evaluated at the null), a difference of scores on the same rows (``linear_var``: a target minus
its controls), and ``adjust_pvalues`` corrects a run's family of tests (Holm by default, Benjamini–Hochberg).
"""

from __future__ import annotations

import math

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
                        extra_var: float = 0.0) -> tuple[float, float]:
    """95 % interval for Σhits/Σrows (see the module docstring); without ``fold`` (no fitted probe shared
    by groups of rows, e.g. success rates of episodes) only the episode variance.  ``extra_var``: a further
    variance added to both (e.g. the spread of a mean over random control draws)."""
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
    half = Z * np.sqrt(v_ep + v_fold + extra_var)
    return float(max(0.0, p - half)), float(min(1.0, p + half))


def ratio_interval(episode: np.ndarray, sse: np.ndarray, ss0: np.ndarray, fold: np.ndarray) -> tuple[float, float]:
    """95 % interval for R² = 1 − Σsse/Σss0 by the delta method, episode and fold variances summed."""
    if len(sse) == 0 or ss0.sum() <= 0:
        return float("nan"), float("nan")
    r = float(sse.sum() / ss0.sum())
    var = _ratio_var(episode, sse, ss0, r) + (_ratio_var(fold, sse, ss0, r) if len(np.unique(fold)) > 1 else 0.0)
    half = Z * np.sqrt(var)
    return float(1 - r - half), float(min(1.0, 1 - r + half))


# ----------------------------------------------------------------------------- sums of ratios, tests, multiplicity


def linear_var(episode: np.ndarray, fold: np.ndarray | None, terms: list[tuple[float, np.ndarray, np.ndarray]],
               ) -> float:
    """Variance of Σⱼ cⱼ·(Σnumⱼ / Σdenⱼ) over rows, ``terms`` = [(cⱼ, numⱼ, denⱼ)] on the same rows (e.g. a
    target's accuracy minus the mean of its control draws): the delta method, each unit contributing
    Σⱼ cⱼ (numⱼ,u − rⱼ denⱼ,u) / Σdenⱼ, summed as a cluster-robust variance over episodes (× M/(M−1)) plus
    the same over outer folds (× K/(K−1)), like the intervals above (without Agresti–Coull's pseudo-episodes)."""
    var = 0.0
    for unit in (episode, fold):
        if unit is None or len(np.unique(unit)) < 2:
            continue
        infl = 0.0
        for c, num, den in terms:
            a, b = episode_sums(unit, num, den)
            infl = infl + c * (a - a.sum() / b.sum() * b) / b.sum()
        g = len(infl)
        var += float((infl ** 2).sum() * g / (g - 1))
    return var


def _upper_tail(z: float, df: int) -> float:
    """P(T > z) for Student's t with ``df`` degrees of freedom (the normal tail for df ≥ 1000)."""
    from scipy.special import ndtr, stdtr  # imported on use, like sklearn in metrics

    return float(ndtr(-z) if df >= 1000 else stdtr(max(df, 1), -z))


def _score_p(unit: np.ndarray, num: np.ndarray, den: np.ndarray, r0: float, d: float) -> float:
    """One-sided p of d = estimate − null > 0, with the cluster-robust variance of Σnum/Σden at the null r0."""
    v = _ratio_var(unit, num, den, r0)
    if v <= 0:
        return 0.5 if abs(d) < 1e-12 else float(d < 0)
    return _upper_tail(d / math.sqrt(v), len(np.unique(unit)) - 1)


def proportion_p(episode: np.ndarray, hits: np.ndarray, null: float) -> float:
    """One-sided p of "the rate Σhits/Σrows is above ``null``" (a label-blind floor): a score test,
    t = (p̂ − null) / √v₀ with v₀ the cluster-robust variance over episodes of the residuals hits − null
    (at the null, so a perfect score from few episodes is not infinitely significant), Student's t tail with
    episodes − 1 degrees of freedom.

    The null is a probe that decodes nothing: given each outer fold's probe, the held-out rows then score
    the floor at most in expectation, so the fold-to-fold variance the *intervals* add (how a probe with
    signal varies between training sets) has no part in it.  Adding it anyway made the test reject 0.2 % of
    600 null cells at 0.05; without it 6.0 % of 2,400 (0.04 % at 0.001: the tail Holm uses is not
    anti-conservative; tests/test_probe_controls_chance.py, docs/probing.md)."""
    if len(hits) == 0 or not np.isfinite(null):
        return float("nan")
    return _score_p(episode, hits, np.ones(len(hits)), null, float(hits.mean()) - null)


def r2_p(episode: np.ndarray, sse: np.ndarray, ss0: np.ndarray) -> float:
    """One-sided p of "R² = 1 − Σsse/Σss0 is above 0": the score test of ``proportion_p`` for the ratio
    Σsse/Σss0 at 1 (residuals sse − ss0 per episode)."""
    if len(sse) == 0 or ss0.sum() <= 0:
        return float("nan")
    return _score_p(episode, sse, ss0, 1.0, 1.0 - float(sse.sum() / ss0.sum()))


CORRECTIONS = ("holm", "bh", "none")


def adjust_pvalues(p, method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values over one family (NaN entries are not tests and stay NaN):
    ``holm`` — Holm's step-down (family-wise error ≤ α under any dependence): the i-th smallest of m becomes
    max over j ≤ i of min(1, (m − j + 1)·p₍ⱼ₎); ``bh`` — Benjamini–Hochberg (false discovery rate ≤ α for
    independent or positively dependent tests): min over j ≥ i of min(1, m/j · p₍ⱼ₎); ``none`` — unchanged."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ps = p[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ps))
    elif method == "bh":
        adj = np.minimum.accumulate(np.minimum(1.0, m / rank * ps)[::-1])[::-1]
    else:
        adj = ps
    out[order] = adj
    return out
