"""Held-out metrics of pooled out-of-fold predictions, with episode-unit intervals (``intervals``).

Classification metrics come from ``sklearn.metrics`` (the pooled predictions fit in memory); embedding
scores are computed chunk by chunk per row (``embedding_rows``) so predictions never pile up.
"""

from __future__ import annotations

import numpy as np

from toolkit.analysis.probe.intervals import proportion_interval, ratio_interval


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def cosine_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", _unit(pred), _unit(true))


def retrieval(pred: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, allowed: np.ndarray | None = None,
              ) -> np.ndarray:
    """Per row: is the true instruction the nearest (cosine) among the allowed candidate embeddings?"""
    sims = _unit(pred) @ _unit(candidates).T
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    return sims.argmax(1) == true_index


def embedding_rows(pred, true, true_index, candidates, allowed, train_mean) -> dict[str, np.ndarray]:
    """Per-row embedding scores: retrieval hit, raw and centred cosine, mean-embedding cosine, R² parts."""
    return {"hit": retrieval(pred, candidates, true_index, allowed).astype(np.float64),
            "cos": cosine_rows(pred, true), "cos_c": cosine_rows(pred - train_mean, true - train_mean),
            "cos_base": cosine_rows(np.broadcast_to(train_mean, true.shape), true),
            "sse": ((true - pred) ** 2).sum(1), "ss0": ((true - train_mean) ** 2).sum(1)}


def proportion(episode: np.ndarray, hits: np.ndarray, fold: np.ndarray) -> tuple[float, float, float]:
    """(pooled rate, interval low, interval high)."""
    lo, hi = proportion_interval(episode, hits, fold)
    return (float(hits.mean()) if len(hits) else float("nan")), lo, hi


def r2(episode: np.ndarray, sse: np.ndarray, ss0: np.ndarray, fold: np.ndarray) -> tuple[float, float, float]:
    lo, hi = ratio_interval(episode, sse, ss0, fold)
    return float(1 - sse.sum() / max(ss0.sum(), 1e-12)), lo, hi


def classification_summary(pred: np.ndarray, true: np.ndarray, episode: np.ndarray, fold: np.ndarray,
                           n_classes: int) -> dict:
    """Accuracy (headline, with interval), balanced accuracy, macro-F1; chance, majority, balanced chance.

    chance and balanced chance are 1/C over the classes present; majority is the rate of always guessing
    the most frequent class, which is what a label-blind probe reaches on accuracy when classes are unbalanced.
    """
    from sklearn import metrics as skm  # imported on use: a few seconds that a plain `import toolkit` should not pay

    acc, lo, hi = proportion(episode, (pred == true).astype(np.float64), fold)
    present = np.unique(true)
    counts = np.bincount(true, minlength=n_classes)
    return {"metric_name": "accuracy", "metric": acc, "ci_low": lo, "ci_high": hi, "accuracy": acc,
            "balanced_accuracy": float(skm.balanced_accuracy_score(true, pred)),
            "macro_f1": float(skm.f1_score(true, pred, labels=present, average="macro", zero_division=0)),
            "chance": 1.0 / len(present), "balanced_chance": 1.0 / len(present),
            "majority": float(counts.max() / len(true))}


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn import metrics as skm

    return skm.confusion_matrix(true, pred, labels=np.arange(n_classes))


def embedding_summary(rows: dict[str, np.ndarray], episode: np.ndarray, fold: np.ndarray, chance: float,
                      majority: float) -> dict:
    """Retrieval (headline), cosine raw and centred on the training-mean embedding, R² against that mean.

    Sentence embeddings are anisotropic (the mean embedding alone scores a high raw cosine), hence the
    centred cosine and the mean-embedding baseline next to the raw one.
    """
    hit, lo, hi = proportion(episode, rows["hit"], fold)
    return {"metric_name": "retrieval", "metric": hit, "ci_low": lo, "ci_high": hi, "retrieval": hit,
            "cosine": float(rows["cos"].mean()), "cosine_centered": float(rows["cos_c"].mean()),
            "cosine_baseline": float(rows["cos_base"].mean()),
            "r2": float(1 - rows["sse"].sum() / max(rows["ss0"].sum(), 1e-12)), "chance": chance,
            "majority": majority}


def regression_summary(sse: np.ndarray, ss0: np.ndarray, episode: np.ndarray, fold: np.ndarray) -> dict:
    """Out-of-fold R² against predicting each fold's training mean (variance-weighted over columns)."""
    v, lo, hi = r2(episode, sse, ss0, fold)
    return {"metric_name": "r2", "metric": v, "ci_low": lo, "ci_high": hi, "r2": v, "chance": 0.0}
