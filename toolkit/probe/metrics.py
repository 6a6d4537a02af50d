"""Held-out metrics and their 95 % intervals from an episode (cluster) bootstrap.

Steps of one episode are correlated, so a per-step binomial interval is too narrow; resampling whole test
episodes and recomputing the pooled metric gives an honest interval.  Every metric here is a ratio of
per-row sums (correct/total, SSE/SS), so the bootstrap works on per-episode sums.
"""

from __future__ import annotations

import numpy as np


def per_episode_sums(episode: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    eps, inv = np.unique(episode, return_inverse=True)
    return [np.bincount(inv, weights=v.astype(np.float64), minlength=len(eps)) for v in values]


def bootstrap_ratio(episode: np.ndarray, num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    one_minus: bool = False) -> tuple[float, float]:
    """95 % percentile interval of Σnum/Σden (or 1 − that) resampling test episodes with replacement."""
    if n_boot <= 0 or len(episode) == 0:
        return float("nan"), float("nan")
    a, b = per_episode_sums(episode, num, den)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = a[idx].sum(1) / b[idx].sum(1)
    if one_minus:
        r = 1 - r
    lo, hi = np.nanpercentile(r, [2.5, 97.5])
    return float(lo), float(hi)


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true)) if len(true) else float("nan")


def balanced_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    classes = np.unique(true)
    return float(np.mean([np.mean(pred[true == c] == c) for c in classes])) if len(classes) else float("nan")


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def cosine_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", _unit(pred), _unit(true))


def retrieval(pred: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, allowed: np.ndarray | None = None,
              ) -> np.ndarray:
    """Per row: is the true instruction the nearest (cosine) among the candidate instruction embeddings?"""
    sims = _unit(pred) @ _unit(candidates).T
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    return sims.argmax(1) == true_index


def classification_summary(pred, true, episode, train_true, n_classes, n_boot, seed) -> dict:
    correct = (pred == true).astype(np.float64)
    lo, hi = bootstrap_ratio(episode, correct, np.ones_like(correct), n_boot, seed)
    counts = np.bincount(train_true, minlength=n_classes)
    return {"metric_name": "accuracy", "metric": accuracy(pred, true), "ci_low": lo, "ci_high": hi,
            "accuracy": accuracy(pred, true), "balanced_accuracy": balanced_accuracy(pred, true),
            "chance": 1.0 / max(1, int((counts > 0).sum())),
            "majority": float(np.mean(true == int(np.argmax(counts))))}


def embedding_rows(pred, true, true_index, candidates, allowed, train_mean) -> dict[str, np.ndarray]:
    """Per-row embedding scores, computed chunk by chunk so predictions never pile up in memory."""
    return {"hit": retrieval(pred, candidates, true_index, allowed).astype(np.float64),
            "cos": cosine_rows(pred, true), "cos_c": cosine_rows(pred - train_mean, true - train_mean),
            "cos_base": cosine_rows(np.broadcast_to(train_mean, true.shape), true),
            "sse": ((true - pred) ** 2).sum(1), "ss0": ((true - train_mean) ** 2).sum(1)}


def embedding_summary(rows: dict[str, np.ndarray], episode, n_candidates: int, n_boot, seed) -> dict:
    """Retrieval (headline), cosine raw and centred on the training-mean embedding, R² against that mean.

    Sentence embeddings are anisotropic (the mean embedding alone scores a high raw cosine), hence the
    centred cosine and the mean-embedding baseline next to the raw one.
    """
    hit = rows["hit"]
    lo, hi = bootstrap_ratio(episode, hit, np.ones_like(hit), n_boot, seed)
    return {"metric_name": "retrieval", "metric": float(hit.mean()), "ci_low": lo, "ci_high": hi,
            "retrieval": float(hit.mean()), "cosine": float(rows["cos"].mean()),
            "cosine_centered": float(rows["cos_c"].mean()), "cosine_baseline": float(rows["cos_base"].mean()),
            "r2": float(1 - rows["sse"].sum() / max(rows["ss0"].sum(), 1e-12)), "chance": 1.0 / max(1, n_candidates)}


def regression_summary(pred, true, train_mean, episode, n_boot, seed) -> dict:
    """R² against predicting the training mean (variance-weighted over output columns)."""
    sse = ((true - pred) ** 2).sum(1)
    ss0 = ((true - train_mean) ** 2).sum(1)
    lo, hi = bootstrap_ratio(episode, sse, ss0, n_boot, seed, one_minus=True)
    r2 = float(1 - sse.sum() / max(ss0.sum(), 1e-12))
    return {"metric_name": "r2", "metric": r2, "ci_low": lo, "ci_high": hi, "r2": r2, "chance": 0.0}
