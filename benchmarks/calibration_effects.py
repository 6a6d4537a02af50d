"""Calibration of the intervention statistics (``toolkit.analysis.effects``): false positives on nulls, power on
planted effects, interval coverage, by simulation of the per-episode values ``toolkit intervene`` tests.

* ``shift_test`` (the paired action-shift test, bootstrap-t; per action dimension and joint max-t): nulls whose
  per-episode shifts have mean 0 but are skewed (centred exponential) or heavy-tailed (t with 3 degrees of
  freedom), and a planted shift of ``SHIFT_POWER`` standard deviations; the sign-flip permutation test the
  toolkit used before runs beside it on the same draws, for comparison;
* ``bootstrap_mean`` (the episode bootstrap-t interval of an action metric): coverage of the true mean, beside
  the percentile interval it replaced;
* ``mcnemar_exact`` (the closed-loop success test on paired episodes): a null where episodes differ a lot in how
  hard they are (paired outcomes share an episode's difficulty, success rates from 0.05 to 0.95) and a planted
  change of success rate.

    python benchmarks/calibration_effects.py [--sims 1000] [--seed 0] [--out FILE]

"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ALPHA = 0.05
SHIFT_POWER = 0.8  # planted mean shift, in standard deviations of the per-episode shift, at 20 episodes
SUCCESS_POWER = (0.3, 0.6)  # planted success rates (unmodified, intervened), 60 paired episodes


def _null_shifts(kind: str, n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "skewed":
        return rng.exponential(1.0, (n, dims)) - 1.0
    return rng.standard_t(3, (n, dims)) / np.sqrt(3.0)  # heavy tails, unit variance


def _sign_flip_p(d: np.ndarray, n_perm: int, seed: int) -> float:
    """The former test, for comparison: sign-flip permutation of |mean| (exact for n <= 12)."""
    from scipy import stats as sps

    n = len(d)
    return float(sps.permutation_test((d,), lambda x, axis: np.abs(x.mean(axis=axis)), permutation_type="samples",
                                      vectorized=True, alternative="greater", rng=np.random.default_rng(seed),
                                      n_resamples=max(n_perm, 2 ** n) if n <= 12 else n_perm).pvalue)


def shift_calibration(n_sims: int, seed: int, n_boot: int = 999) -> dict:
    from toolkit.analysis.effects import shift_test

    rng = np.random.default_rng(seed)
    out: dict = {}
    for kind in ("skewed", "heavy"):
        for n in (8, 20):
            per, joint, flips = [], [], []
            for i in range(n_sims):
                d = _null_shifts(kind, n, 3, rng)
                j, p = shift_test(d, n_boot=n_boot, seed=i)
                per.append(p[0])
                joint.append(j)
                flips.append(_sign_flip_p(d[:, 0], n_boot, i))
            out[f"null {kind}, {n} episodes"] = {
                "false_positive_rate": float(np.mean(np.asarray(per) <= ALPHA)),
                "joint_false_positive_rate": float(np.mean(np.asarray(joint) <= ALPHA)),
                "sign_flip_false_positive_rate": float(np.mean(np.asarray(flips) <= ALPHA)), "sims": n_sims}
    hits = [shift_test(rng.normal(SHIFT_POWER, 1.0, 20), n_boot=n_boot, seed=i) <= ALPHA for i in range(n_sims)]
    out[f"shift {SHIFT_POWER} SD, 20 episodes"] = {"power": float(np.mean(hits)), "sims": n_sims}
    return out


def bootstrap_coverage(n_sims: int, seed: int, n_boot: int = 999) -> dict:
    from scipy import stats as sps

    from toolkit.analysis.effects import bootstrap_mean

    rng = np.random.default_rng(seed)
    out = {}
    for n in (10, 30):
        covered = percentile = 0
        for i in range(n_sims):
            v = rng.exponential(1.0, (n, 1))  # skewed per-episode metric, true mean 1
            lo, hi = bootstrap_mean(v, n_boot=n_boot, seed=i)
            covered += bool(lo[0] <= 1.0 <= hi[0])
            ci = sps.bootstrap((v[:, 0],), np.mean, n_resamples=n_boot, method="percentile",
                               rng=np.random.default_rng(i)).confidence_interval
            percentile += bool(ci.low <= 1.0 <= ci.high)
        out[f"skewed metric, {n} episodes"] = {"coverage": covered / n_sims,
                                               "percentile_coverage": percentile / n_sims, "sims": n_sims}
    return out


def mcnemar_calibration(n_sims: int, seed: int) -> dict:
    from toolkit.analysis.effects import mcnemar_exact

    rng = np.random.default_rng(seed)
    out = {}
    for n in (20, 60):
        p = []
        for _ in range(n_sims):
            hard = rng.uniform(0.05, 0.95, n)  # each episode's own success rate, the same in both runs
            p.append(mcnemar_exact(rng.random(n) < hard, rng.random(n) < hard))
        out[f"null, episode rates 0.05-0.95, {n} paired episodes"] = {
            "false_positive_rate": float(np.mean(np.asarray(p) <= ALPHA)), "sims": n_sims}
    base, new = SUCCESS_POWER
    hits = []
    for _ in range(n_sims):  # episodes of varied difficulty around the base rate; each run draws its own outcome
        rate = np.clip(rng.uniform(base - 0.25, base + 0.25, 60), 0.0, 1.0)
        hits.append(mcnemar_exact(rng.random(60) < rate + (new - base), rng.random(60) < rate) <= ALPHA)
    out[f"success {base} -> {new}, 60 paired episodes"] = {"power": float(np.mean(hits)), "sims": n_sims}
    return out


def effects_calibration(n_sims: int = 1000, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    out = {"shift_test": shift_calibration(n_sims, seed), "bootstrap_mean": bootstrap_coverage(n_sims, seed),
           "mcnemar_exact": mcnemar_calibration(n_sims, seed)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def print_effects(cal: dict) -> None:
    for test in ("shift_test", "bootstrap_mean", "mcnemar_exact"):
        for case, fig in cal[test].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in fig.items() if k != "sims")
            print(f"{test:15s} {case:48s} {shown}  ({fig['sims']} runs)")
    print(f"# {cal['seconds']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cal = effects_calibration(a.sims, a.seed)
    print_effects(cal)
    if a.out:
        a.out.write_text(json.dumps(cal, indent=2))


if __name__ == "__main__":
    sys.exit(main())
