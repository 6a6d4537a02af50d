"""Mergeable accumulators of streamed activations: per-feature moments and histograms, filled chunk by chunk and
merged pairwise, so the serial and the Dask paths (``toolkit.analysis.parallel``) compute the same numbers."""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 64


class RunningMoments:
    """Per-feature count, mean, M2, min, max and zero count, merged chunk by chunk (Chan et al.)."""

    def __init__(self, n_features: int, dead_eps: float = 1e-6):
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)
        self.near_zero = np.zeros(n_features, dtype=np.int64)
        self.nonfinite = np.zeros(n_features, dtype=np.int64)
        self.dead_eps = dead_eps

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        bad = ~np.isfinite(x)
        if bad.any():
            self.nonfinite += bad.sum(0)
            x = np.where(bad, 0.0, x)
        nb = len(x)
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n
        np.minimum(self.min, x.min(0), out=self.min)
        np.maximum(self.max, x.max(0), out=self.max)
        self.near_zero += (np.abs(x) <= self.dead_eps).sum(0)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def global_moments(self) -> tuple[float, float]:
        """Mean and (population) std over every value, from the per-feature moments."""
        f = len(self.mean)
        gmean = float(self.mean.mean())
        total_m2 = self.m2.sum() + self.n * ((self.mean - gmean) ** 2).sum()
        return gmean, float(math.sqrt(total_m2 / max(self.n * f, 1)))


class Histograms:
    """Per-feature histograms with fixed bins over [lo_f, hi_f], plus one pooled histogram over [glo, ghi]."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, bins: int = DEFAULT_BINS):
        self.bins = bins
        self.lo = np.asarray(lo, dtype=np.float64)
        span = np.asarray(hi, dtype=np.float64) - self.lo
        self.width = np.where(span > 0, span / bins, 1.0)  # a constant feature: everything in bin 0
        self.glo, ghi = float(self.lo.min()), float(np.max(hi))
        self.gwidth = (ghi - self.glo) / bins if ghi > self.glo else 1.0
        self.counts = np.zeros((len(self.lo), bins), dtype=np.int64)
        self.gcounts = np.zeros(bins, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = np.where(np.isfinite(x), x, 0.0)
        f = x.shape[1]
        idx = np.clip(((x - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        flat = (idx + np.arange(f) * self.bins).ravel()
        self.counts += np.bincount(flat, minlength=f * self.bins).reshape(f, self.bins)
        gidx = np.clip(((x - self.glo) / self.gwidth).astype(np.int64), 0, self.bins - 1)
        self.gcounts += np.bincount(gidx.ravel(), minlength=self.bins)

    def edges(self, feature: int | None = None) -> np.ndarray:
        if feature is None:
            return self.glo + self.gwidth * np.arange(self.bins + 1)
        return self.lo[feature] + self.width[feature] * np.arange(self.bins + 1)


def merge_moments(p: RunningMoments, q: RunningMoments) -> RunningMoments:
    """Chan et al.'s pairwise update: the moments of the union of two disjoint sets of rows."""
    if not q.n:
        return p
    if not p.n:
        return q
    out = RunningMoments(len(p.mean), p.dead_eps)
    n = p.n + q.n
    delta = q.mean - p.mean
    out.n = n
    out.mean = p.mean + delta * (q.n / n)
    out.m2 = p.m2 + q.m2 + delta**2 * (p.n * q.n / n)
    out.min, out.max = np.minimum(p.min, q.min), np.maximum(p.max, q.max)
    out.near_zero = p.near_zero + q.near_zero
    out.nonfinite = p.nonfinite + q.nonfinite
    return out


def merge_histograms(p: Histograms, q: Histograms) -> Histograms:
    p.counts = p.counts + q.counts
    p.gcounts = p.gcounts + q.gcounts
    return p
