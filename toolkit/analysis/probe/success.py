"""Does the probe's confidence in an episode go with that episode's success, within a task?

Per episode, the confidence is the mean over its rows of the pooled out-of-fold score of the truth: the
probe's score for the true class (classification; ridge scores regress the one-hot labels, logistic ones
are probabilities), the cosine of the predicted and the true instruction embedding (embedding targets), or
minus the squared error (regression).  Every row is scored by a probe that never saw its episode, so a
high-confidence episode is one the probe reads well out of sample, not one it memorised.

Tasks differ in success rate, and a probe of the task reads some tasks better than others; across tasks the
two go together without anything in the activations going with success (a permutation over all episodes,
this module's earlier test, flagged 75 % of simulated task-only null runs at success rates 0.2/0.8 and 99.8 %
at 0.05/0.95; ``benchmarks/bench_calibration.py``).  So everything here is *within task*: episodes are
compared only with episodes of their own task.  With ``c`` the confidence, ``s`` the success (0/1), and
``c̄ₖ``, ``s̄ₖ`` their means in the episode's task k:

* ``diff`` — the within-task difference in mean confidence, successful minus failed:
  Δ = Σₖ wₖ (c̄ₖ(success) − c̄ₖ(failure)) / Σₖ wₖ with wₖ = nₖ(success)·nₖ(failure)/nₖ, which is the
  coefficient of success in a least-squares fit of confidence on success with one intercept per task
  (task fixed effects): Δ = Σ (s − s̄ₖ)(c − c̄ₖ) / Σ (s − s̄ₖ)²;
* ``r`` — the within-task point-biserial correlation Σ (s − s̄ₖ)(c − c̄ₖ) / √(Σ (s − s̄ₖ)² · Σ (c − c̄ₖ)²)
  (the partial correlation of confidence and success given the task; the ordinary point-biserial r when
  there is one task);
* ``p_value`` — two-sided, from permuting the successes *within* each task (a stratified permutation test of
  "within each task, confidence is independent of success"; it keeps every task's success count, so task
  differences in success rate cannot produce it).  Δ and r give the same p (a within-task permutation keeps
  both denominators).  Exact (every arrangement enumerated) when there are at most ``n_perm`` arrangements,
  else ``n_perm`` random ones and p = (1 + #{|Δ*| ≥ |Δ|}) / (1 + n_perm);
* ``diff_ci_low/high`` — the 95 % interval for Δ by inverting that test: the shifts δ for which the same
  permutations do not reject "the successful episodes are shifted by δ within every task" (the test of
  c − δ·s).  It excludes 0 exactly when p ≤ 0.05; it is exact (up to the sampling of permutations) when
  success shifts confidence by one constant within tasks, and covered 94.6–95.3 % in simulation with
  failed episodes twice as variable and with effects that differ by task, 92.9 % at success rates 0.05/0.95
  with failed episodes half as variable (2000 runs each; tests/test_probe_success_tasks.py,
  ``benchmarks/bench_calibration.py``).  Each permutation's acceptance set is an interval around Δ with closed-form ends, so the interval costs one
  sort of the permutations already drawn for p;
* ``r_ci_low/high`` — that interval in correlation units: r(δ) = δ√S / √(RSS + δ²S), the within-task r the
  data would show if the difference were δ (S = Σ (s − s̄ₖ)², RSS the residual sum of squares of the
  fixed-effects fit), monotone in δ and equal to r at Δ.

Tasks with one episode, or whose episodes all succeeded or all failed, carry no within-task contrast and
contribute nothing; ``per_task`` lists every task (episodes, successes, mean confidence per outcome, its own
difference, its weight in Δ, and why it was left out).  ``r_across_tasks`` is the ordinary correlation over
all episodes, ignoring the task: descriptive only (not tested), to set beside r.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from toolkit.analysis.probe.intervals import LEVEL, episode_sums
from toolkit.sdk.errors import ToolkitError

N_PERM = 5000
CELLS = 1 << 20  # permutation matrix entries drawn at a time (memory flat in the episode count)


def episode_confidence(episode: np.ndarray, conf: np.ndarray, success: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per episode with a known outcome (sorted by episode): (mean row confidence, success 0/1)."""
    known = success >= 0
    ep, c, s = episode[known], conf[known], success[known]
    if not len(ep):
        return np.zeros(0), np.zeros(0)
    total, n, wins = episode_sums(ep, c, np.ones(len(ep)), s)
    return total / n, (wins / n > 0.5).astype(np.float64)


def episode_task(episode: np.ndarray, task: np.ndarray, success: np.ndarray) -> np.ndarray:
    """The task of each episode with a known outcome, in ``episode_confidence``'s order (an episode's first row)."""
    known = success >= 0
    ep, tk = episode[known], np.asarray(task)[known]
    if not len(ep):
        return np.zeros(0, dtype=tk.dtype)
    _, first = np.unique(ep, return_index=True)
    return tk[first]


def _per_task(conf: np.ndarray, success: np.ndarray, inv: np.ndarray, names: np.ndarray) -> list[dict]:
    n = np.bincount(inv, minlength=len(names))
    ns = np.bincount(inv, weights=success, minlength=len(names)).astype(np.int64)
    cs = np.bincount(inv, weights=conf * success, minlength=len(names))
    cf = np.bincount(inv, weights=conf * (1 - success), minlength=len(names))
    w = ns * (n - ns) / np.maximum(n, 1)
    out = []
    for k, name in enumerate(names):
        used = 0 < ns[k] < n[k]
        mean_s = cs[k] / ns[k] if ns[k] else float("nan")
        mean_f = cf[k] / (n[k] - ns[k]) if n[k] - ns[k] else float("nan")
        note = "" if used else "one episode" if n[k] == 1 else "all succeeded" if ns[k] == n[k] else "all failed"
        out.append({"task": str(name), "n_episodes": int(n[k]), "n_success": int(ns[k]),
                    "n_failure": int(n[k] - ns[k]), "conf_success": float(mean_s), "conf_failure": float(mean_f),
                    "diff": float(mean_s - mean_f) if used else float("nan"),
                    "weight": float(w[k] / w.sum()) if used else 0.0, "used": bool(used), "note": note})
    return out


def _arrangements(counts: list[tuple[int, int]], limit: int) -> int | None:
    """Π C(nₖ, sₖ), or None once it passes ``limit``."""
    total = 1
    for n, k in counts:
        total *= math.comb(n, k)
        if total > limit:
            return None
    return total


def _null_exact(s: np.ndarray, xs: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(arrangements, 2): Σ π·xs[:, j] for every within-task arrangement π of s (a Cartesian sum over tasks)."""
    acc = np.zeros((1, xs.shape[1]))
    for a, b in zip(starts[:-1], starts[1:]):
        ones = np.array(list(itertools.combinations(range(b - a), int(s[a:b].sum()))), dtype=np.int64)
        part = xs[a:b][ones].sum(1)  # (C_k, 2)
        acc = (acc[:, None, :] + part[None, :, :]).reshape(-1, xs.shape[1])
    return acc


def _null_random(s: np.ndarray, xs: np.ndarray, starts: np.ndarray, n_perm: int, rng) -> np.ndarray:
    """(n_perm, 2): Σ π·xs[:, j] for random within-task permutations π of s, task by task in row blocks."""
    acc = np.zeros((n_perm, xs.shape[1]))
    for a, b in zip(starts[:-1], starts[1:]):
        block = max(1, CELLS // (b - a))
        for r in range(0, n_perm, block):
            m = min(block, n_perm - r)
            acc[r:r + m] += rng.permuted(np.broadcast_to(s[a:b], (m, b - a)), axis=1) @ xs[a:b]
    return acc


def success_correlation(conf: np.ndarray, success: np.ndarray, task: np.ndarray | None = None,
                        n_perm: int = N_PERM, seed: int = 0, n_boot: int | None = None) -> dict:
    """Within-task association of per-episode confidence with success (see the module docstring).

    ``conf``, ``success`` (0/1) and ``task`` (any labels; None: one task) are per episode.  Returns the
    within-task ``r`` and ``diff`` with 95 % intervals, the stratified permutation ``p_value``, counts
    (``n_tasks_used``: tasks with both outcomes) and ``per_task``; nan statistics, with a ``note``, when the
    tasks with both outcomes hold fewer than 2 successful or 2 failed episodes, or confidence is constant
    within every one of them.  ``n_boot`` is accepted and ignored
    (the interval is no longer a bootstrap).
    """
    del n_boot
    conf, success = np.asarray(conf, np.float64).ravel(), np.asarray(success, np.float64).ravel()
    task = np.zeros(len(conf), np.int64) if task is None else np.asarray(task).ravel()
    if not len(conf) == len(success) == len(task):
        raise ToolkitError(f"success_correlation needs one confidence, success and task per episode; got "
                           f"{len(conf)}, {len(success)} and {len(task)}")
    if not np.isin(success, (0, 1)).all() or not np.isfinite(conf).all():
        raise ToolkitError("success_correlation needs successes of 0 or 1 and finite confidences")
    n, n_succ = len(conf), int(success.sum())
    names, inv = np.unique(task, return_inverse=True)
    per_task = _per_task(conf, success, inv, names)
    used = np.array([t["used"] for t in per_task], bool)
    nan = float("nan")
    out = {"n_episodes": n, "n_success": n_succ, "n_failure": n - n_succ,
           "conf_success": float(conf[success == 1].mean()) if n_succ else nan,
           "conf_failure": float(conf[success == 0].mean()) if n - n_succ else nan,
           "n_tasks": len(names), "n_tasks_used": int(used.sum()),
           "n_episodes_used": int(sum(t["n_episodes"] for t in per_task if t["used"])),
           "r": nan, "r_ci_low": nan, "r_ci_high": nan, "diff": nan, "diff_ci_low": nan, "diff_ci_high": nan,
           "p_value": nan, "p_exact": False, "n_permutations": 0, "r_across_tasks": nan,
           "note": "", "per_task": per_task}
    if min(n_succ, n - n_succ) >= 1 and np.ptp(conf) > 0:
        out["r_across_tasks"] = float(np.corrcoef(conf, success)[0, 1])
    if not used.any():
        out["note"] = "no task has both successful and failed episodes: nothing to compare within a task"
        return out
    s_used = sum(t["n_success"] for t in per_task if t["used"])
    if min(s_used, out["n_episodes_used"] - s_used) < 2:
        out["note"] = "fewer than 2 successful or 2 failed episodes in tasks with both outcomes: no test"
        return out
    keep = used[inv]
    order = np.argsort(inv[keep], kind="stable")
    c, s, g = conf[keep][order], success[keep][order], inv[keep][order]
    sizes = np.bincount(g)[np.unique(g)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    mean = lambda v: np.repeat(np.add.reduceat(v, starts[:-1]) / sizes, sizes)  # noqa: E731 (per-task mean)
    cc, sc = c - mean(c), s - mean(s)
    S, Scc = float(sc @ sc), float(cc @ cc)
    if Scc <= 1e-12 * max(1.0, float(c @ c)):
        out["note"] = "confidence is constant within every task that has both outcomes"
        return out
    diff = float(sc @ cc) / S
    rss = max(Scc - diff * diff * S, 0.0)
    xs = np.stack([cc, sc], 1) / S
    counts = [(int(b - a), int(s[a:b].sum())) for a, b in zip(starts[:-1], starts[1:])]
    total = _arrangements(counts, n_perm)
    if total is not None:
        null, exact = _null_exact(s, xs, starts), True
    else:
        null, exact = _null_random(s, xs, starts, n_perm, np.random.default_rng(seed)), False
    lo, hi = _acceptance(null[:, 0], null[:, 1], diff, tol=1e-9 * (abs(diff) + math.sqrt(Scc / S)))
    count0 = int(np.sum((lo <= 0) & (hi >= 0)))
    alpha = 1 - LEVEL
    if exact:  # the identity is among the arrangements; p = share at least as extreme
        p, need = count0 / len(null), math.floor(alpha * len(null)) + 1
    else:
        p, need = (1 + count0) / (1 + len(null)), math.floor(alpha * (1 + len(null)) - 1) + 1
    d_lo = float(np.sort(lo)[need - 1]) if need >= 1 else -math.inf
    d_hi = float(-np.sort(-hi)[need - 1]) if need >= 1 else math.inf

    def r_of(d: float) -> float:
        if math.isinf(d):
            return math.copysign(1.0, d)
        return d * math.sqrt(S) / math.sqrt(rss + d * d * S) if rss + d * d * S > 0 else 0.0

    out.update({"r": float(np.clip(r_of(diff), -1, 1)), "r_ci_low": r_of(d_lo), "r_ci_high": r_of(d_hi),
                "diff": diff, "diff_ci_low": d_lo, "diff_ci_high": d_hi, "p_value": float(p), "p_exact": exact,
                "n_permutations": len(null)})
    return out


def _acceptance(A: np.ndarray, B: np.ndarray, diff: float, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """For each permutation π with A = Δ(c, π) and B = Δ(s, π): the shifts δ at which π is at least as
    extreme as the data in the test of c − δ·s, i.e. |A − δB| ≥ |Δ − δ|.

    (A − δB)² − (Δ − δ)² = (A − Δ + δ(1 − B)) · (A + Δ − δ(1 + B)) with |B| ≤ 1: a rising times a falling
    line, so the set is the closed interval between their roots (it always holds Δ), unbounded on one side
    when B = −1 and everything when π leaves the contrast unchanged (B = 1).  Widened by ``tol`` for ties.
    """
    b1, b2, a1, a2 = 1 - B, 1 + B, A - diff, A + diff
    flat1, flat2 = b1 <= 1e-9, b2 <= 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = np.where(flat1, 0.0, -a1 / np.where(flat1, 1, b1))
        r2 = np.where(flat2, 0.0, a2 / np.where(flat2, 1, b2))
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    # B = −1: the second factor is the constant a2; its sign picks the side of the first root
    lo = np.where(flat2, np.where(a2 >= -tol, r1, -np.inf), lo)
    hi = np.where(flat2, np.where(a2 <= tol, r1, np.inf), hi)
    lo = np.where(flat2 & (np.abs(a2) <= tol), -np.inf, lo)
    hi = np.where(flat2 & (np.abs(a2) <= tol), np.inf, hi)
    lo = np.where(flat1, -np.inf, lo)  # B = 1: the data's own arrangement, or one just like it
    hi = np.where(flat1, np.inf, hi)
    return lo - tol, hi + tol
