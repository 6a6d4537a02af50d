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
    Balanced accuracy (mean recall over the classes present) and macro-F1 over those classes (zero where a
    class is never predicted) are scikit-learn's definitions, from one confusion count (tested equal): these
    run for every cell and control draw, where scikit-learn's input checks cost more than the probe.
    """
    acc, lo, hi = proportion(episode, (pred == true).astype(np.float64), fold)
    present = np.unique(true)
    counts = np.bincount(true, minlength=n_classes)
    cm = confusion(pred, true, max(n_classes, int(true.max(initial=-1)) + 1))
    tp = np.diag(cm)[present].astype(np.float64)
    predicted = cm.sum(0)[present].astype(np.float64)
    recall = tp / counts[present]
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"metric_name": "accuracy", "metric": acc, "ci_low": lo, "ci_high": hi, "accuracy": acc,
            "balanced_accuracy": float(recall.mean()), "macro_f1": float(f1.mean()),
            "chance": 1.0 / len(present), "balanced_chance": 1.0 / len(present),
            "majority": float(counts.max() / len(true))}


def train_majority(labels: np.ndarray, fold: np.ndarray) -> float:
    """The majority rate of the training folds, pooled like the scores: for each outer fold k, the share of
    the most frequent label among the rows of the other folds, weighted by fold k's test rows.

    A label-blind probe fitted on the training folds (intercepts from those folds only) answers their most
    frequent label; this is what that answer scores when a test fold has the training folds' label mix.  The
    held-out mix is if anything poorer in that label (the folds partition one selection), so on data without
    signal the pooled out-of-fold accuracy sits at or below this rate: the chance line accuracy is tested
    against.  It is never below 1/C (C the labels present)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    _, y = np.unique(labels, return_inverse=True)
    total = np.bincount(y)
    out = 0.0
    for k in np.unique(fold):
        test = fold == k
        train = total - np.bincount(y[test], minlength=len(total))
        if train.sum() > 0:
            out += test.sum() * train.max() / train.sum()
    return float(out / len(labels))


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows the true class, columns the predicted one (rows predicting no
    class in range, e.g. −1, are left out), as ``sklearn.metrics.confusion_matrix(true, pred, labels=range(C))``."""
    pred, true = np.asarray(pred, dtype=np.int64), np.asarray(true, dtype=np.int64)
    ok = (pred >= 0) & (pred < n_classes) & (true >= 0) & (true < n_classes)
    return np.bincount(true[ok] * n_classes + pred[ok], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


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
