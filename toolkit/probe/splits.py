"""Honest splits: held-out episodes (stratified by task) or held-out tasks, never held-out steps by default.

Consecutive steps of one episode are near duplicates, so a step split lets a probe recognise the episode
and decode even a random per-episode label far above chance (Hewitt & Liang's memorisation effect, with
the episode as the word type).  Every split here assigns whole episodes (or whole tasks) to one group:
groups 0..K-1 are the inner cross-validation folds that choose λ, group K is the held-out test set.
The ``steps`` split exists only to show that the tests can fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.errors import ToolkitError

SPLITS = ("episodes", "tasks", "steps")


@dataclass
class Split:
    """Per-row group ids (0..n_folds-1 inner folds, n_folds = test) and what they mean."""

    kind: str
    group: np.ndarray  # per row
    n_folds: int

    @property
    def test(self) -> int:
        return self.n_folds

    def is_test(self) -> np.ndarray:
        return self.group == self.n_folds


def make_split(kind: str, episode: np.ndarray, task: np.ndarray, n_folds: int = 5, test_fraction: float = 0.2,
               seed: int = 0) -> Split:
    """Assign rows to inner folds and a test group, by episode (stratified by task), by task, or by step."""
    if kind not in SPLITS:
        raise ToolkitError(f"unknown split {kind!r}: use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    if kind == "steps":
        n = len(episode)
        order = rng.permutation(n)
        group = np.empty(n, dtype=np.int64)
        n_test = max(1, int(round(test_fraction * n)))
        group[order[:n_test]] = n_folds
        group[order[n_test:]] = np.arange(n - n_test) % n_folds
        return Split(kind, group, n_folds)
    if kind == "tasks":
        return _by_unit(task, np.unique(task), n_folds, test_fraction, rng, "tasks", "task")
    return _by_episode(episode, task, n_folds, test_fraction, rng)


def _by_episode(episode: np.ndarray, task: np.ndarray, n_folds: int, test_fraction: float, rng) -> Split:
    eps, first = np.unique(episode, return_index=True)
    ep_task = task[first]
    tasks = np.unique(ep_task)
    ep_group = np.empty(len(eps), dtype=np.int64)
    n_train_eps = 0
    offset = 0
    for t in tasks:  # stratified: every task contributes episodes to the test set and to every fold it can
        idx = np.flatnonzero(ep_task == t)
        if len(idx) < 2:
            raise ToolkitError(f"task {t!r} has {len(idx)} episode in the selection: holding out episodes needs at "
                               "least 2 per task (add episodes or narrow --task-range)")
        idx = idx[rng.permutation(len(idx))]
        n_test = min(len(idx) - 1, max(1, int(round(test_fraction * len(idx)))))
        ep_group[idx[:n_test]] = -1
        rest = idx[n_test:]
        ep_group[rest] = (np.arange(len(rest)) + offset) % n_folds  # continue round-robin: balanced folds
        offset += len(rest)
        n_train_eps += len(rest)
    if n_train_eps < 2:
        raise ToolkitError(f"only {n_train_eps} training episode(s): too few episodes to split")
    k = min(n_folds, n_train_eps)
    ep_group[ep_group >= 0] %= k
    ep_group[ep_group < 0] = k
    return Split("episodes", ep_group[np.searchsorted(eps, episode)], k)


def _by_unit(unit: np.ndarray, units: np.ndarray, n_folds: int, test_fraction: float, rng, kind: str,
             what: str) -> Split:
    if len(units) < 4:  # 2 held-out tasks at least: retrieval among one held-out instruction is trivially right
        raise ToolkitError(f"holding out {kind} needs at least 4 {what}s (2 to train, 2 to test); the selection "
                           f"has {len(units)}")
    order = units[rng.permutation(len(units))]
    n_test = min(len(units) - 2, max(2, int(round(test_fraction * len(units)))))
    k = min(n_folds, len(units) - n_test)
    g = {u: (k if i < n_test else (i - n_test) % k) for i, u in enumerate(order)}
    return Split(kind, np.array([g[u] for u in unit], dtype=np.int64), k)


def control_labels(episode: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: one uniformly random class per episode, shared by all its steps."""
    eps = np.unique(episode)
    rng = np.random.default_rng(seed + 7919)
    per_ep = rng.integers(0, n_classes, len(eps))
    return per_ep[np.searchsorted(eps, episode)]
