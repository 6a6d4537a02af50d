"""Does the probe's confidence in an episode go with that episode's success?

Per episode, the confidence is the mean over its rows of the pooled out-of-fold score of the truth: the
probe's score for the true class (classification; ridge scores regress the one-hot labels, logistic ones
are probabilities), the cosine of the predicted and the true instruction embedding (embedding targets), or
minus the squared error (regression).  Every row is scored by a probe that never saw its episode, so a
high-confidence episode is one the probe reads well out of sample, not one it memorised.

The statistic is the point-biserial correlation (Pearson with success as 0/1) over episodes with a known
outcome (success −1 = unknown is left out).  The episode is the unit: the 95 % interval is a percentile
bootstrap over episodes, and the two-sided p-value comes from permuting the outcomes over episodes, exact
(every arrangement of the successes enumerated) when there are at most ``n_perm`` arrangements.
Success often differs by task, and so can confidence: a correlation across tasks may be a task effect,
which the per-task rows of the report can separate.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from toolkit.analysis.probe.intervals import LEVEL, episode_sums

N_BOOT = 2000
N_PERM = 5000
BLOCK = 250  # resamples drawn and reduced at a time


def episode_confidence(episode: np.ndarray, conf: np.ndarray, success: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per episode with a known outcome: (mean row confidence, success 0/1)."""
    known = success >= 0
    ep, c, s = episode[known], conf[known], success[known]
    if not len(ep):
        return np.zeros(0), np.zeros(0)
    total, n, wins = episode_sums(ep, c, np.ones(len(ep)), s)
    return total / n, (wins / n > 0.5).astype(np.float64)


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis, broadcasting (nan where either side is constant)."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc ** 2).sum(-1) * (yc ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / np.where(den > 0, den, 1), np.nan)


def _permuted_r(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Pearson r of x with each 0/1 row of y holding k ones: one matrix-vector product (a permutation keeps
    y's mean and variance, so only the cross term changes)."""
    xc = x - x.mean()
    n = len(x)
    return (y @ xc) / np.sqrt((xc ** 2).sum() * k * (n - k) / n)


def success_correlation(conf: np.ndarray, success: np.ndarray, n_boot: int = N_BOOT, n_perm: int = N_PERM,
                        seed: int = 0) -> dict:
    """Point-biserial r of per-episode confidence with success, its bootstrap interval and permutation p.

    Returns nan statistics (and ``n_*`` counts) when fewer than 2 episodes of each outcome are known.
    """
    conf, success = np.asarray(conf, np.float64), np.asarray(success, np.float64)
    n, n_succ = len(conf), int(success.sum())
    out = {"n_episodes": n, "n_success": n_succ, "n_failure": n - n_succ,
           "conf_success": float(conf[success == 1].mean()) if n_succ else float("nan"),
           "conf_failure": float(conf[success == 0].mean()) if n - n_succ else float("nan"),
           "r": float("nan"), "r_ci_low": float("nan"), "r_ci_high": float("nan"), "p_value": float("nan"),
           "p_exact": False, "n_permutations": 0}
    if min(n_succ, n - n_succ) < 2 or np.ptp(conf) == 0:
        return out
    rng = np.random.default_rng(seed)
    r = float(_corr(conf, success))
    boot = np.concatenate([_corr(conf[idx], success[idx]) for idx in  # blocks: memory flat in the episode count
                           (rng.integers(0, n, (min(BLOCK, n_boot - a), n)) for a in range(0, n_boot, BLOCK))])
    boot = boot[np.isfinite(boot)]
    alpha = (1 - LEVEL) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha]) if len(boot) else (np.nan, np.nan)
    if math.comb(n, n_succ) <= n_perm:
        perms = np.zeros((math.comb(n, n_succ), n))
        for i, ones in enumerate(itertools.combinations(range(n), n_succ)):
            perms[i, list(ones)] = 1
        null = _permuted_r(conf, perms, n_succ)
        p, exact = float(np.mean(np.abs(null) >= abs(r) - 1e-12)), True
    else:
        null = np.concatenate([_permuted_r(conf, rng.permuted(np.broadcast_to(success, (min(BLOCK, n_perm - a), n)),
                                                              axis=1), n_succ) for a in range(0, n_perm, BLOCK)])
        p, exact = float((1 + np.sum(np.abs(null) >= abs(r) - 1e-12)) / (1 + n_perm)), False
    out.update({"r": r, "r_ci_low": float(lo), "r_ci_high": float(hi), "p_value": p, "p_exact": exact,
                "n_permutations": len(null)})
    return out

