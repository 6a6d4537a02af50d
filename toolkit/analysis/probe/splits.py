"""Outer cross-validation folds over whole episodes (or whole tasks); never over steps by default.

Consecutive steps of one episode are near duplicates, so a step split lets a probe recognise the episode
and decode even a random per-episode label far above chance (Hewitt & Liang's memorisation effect, with
the episode as the word type).  Every split here puts whole episodes (or whole tasks) into one of K outer
folds, so every episode is tested exactly once, by a probe that never saw it; the K−1 other folds are its
training set and, one at a time, its inner validation folds (nested cross-validation).
The ``steps`` split exists only to show that the tests can fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.sdk.errors import ToolkitError

SPLITS = ("episodes", "tasks", "steps")


@dataclass
class Folds:
    """Per-row outer fold ids 0..n_folds-1, what the held-out unit is, and the seed that dealt them (the same
    rows, split and seed always give the same folds; results save them per episode in ``folds.csv``)."""

    kind: str
    fold: np.ndarray  # (n_rows,) int
    n_folds: int
    seed: int = 0

    def train(self, k: int) -> np.ndarray:
        return self.fold != k

    def test(self, k: int) -> np.ndarray:
        return self.fold == k


def make_folds(kind: str, episode: np.ndarray, task: np.ndarray, n_folds: int = 5, seed: int = 0,
               strata: np.ndarray | None = None) -> Folds:
    """Assign rows to K outer folds by episode (stratified by ``strata``, per episode), by task, or by step.

    ``strata`` is one label per row that is constant within an episode (the task, or a per-episode class
    such as success); stratifying keeps every class in every training set when it has enough episodes.
    """
    if kind not in SPLITS:
        raise ToolkitError(f"unknown split {kind!r}: use one of {', '.join(SPLITS)}")
    if n_folds < 2:
        raise ToolkitError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    folds = _deal(kind, episode, task, n_folds, np.random.default_rng(seed), strata)
    folds.seed = int(seed)
    return folds


def _deal(kind: str, episode: np.ndarray, task: np.ndarray, n_folds: int, rng, strata) -> Folds:
    if kind == "steps":
        fold = np.empty(len(episode), dtype=np.int64)
        fold[rng.permutation(len(episode))] = np.arange(len(episode)) % n_folds
        return Folds(kind, fold, n_folds)
    if kind == "tasks":
        units = np.unique(task)
        if len(units) < 4:  # 2 held-out tasks at least: retrieval among one held-out instruction is trivially right
            raise ToolkitError(f"holding out tasks needs at least 4 tasks (2 to train, 2 to test); the selection has "
                               f"{len(units)}")
        k = min(n_folds, len(units) // 2)
        order = units[rng.permutation(len(units))]
        f = {u: i % k for i, u in enumerate(order)}
        return Folds(kind, np.array([f[u] for u in task], dtype=np.int64), k)
    return _by_episode(episode, task if strata is None else strata, n_folds, rng)


def _by_episode(episode: np.ndarray, strata: np.ndarray, n_folds: int, rng) -> Folds:
    eps, first = np.unique(episode, return_index=True)
    if len(eps) < 2:
        raise ToolkitError(f"the selection holds {len(eps)} episode: cross-validation over episodes needs at least 2")
    k = min(n_folds, len(eps))
    ep_stratum = strata[first]
    ep_fold = np.empty(len(eps), dtype=np.int64)
    offset = 0
    for s in np.unique(ep_stratum):  # deal each stratum's shuffled episodes round-robin, continuing the count
        idx = np.flatnonzero(ep_stratum == s)
        idx = idx[rng.permutation(len(idx))]
        ep_fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    perm = rng.permutation(k)  # which fold gets the remainders is random too
    return Folds("episodes", perm[ep_fold][np.searchsorted(eps, episode)], k)
