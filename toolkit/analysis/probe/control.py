"""Control tasks that can be learned in principle (Hewitt & Liang 2019): a random function of the input *type*.

Hewitt & Liang give every word *type* a random label; a probe scores on the control only as far as it can
memorise which type carries which label, so "selectivity" (real − control) measures how much more than
memorisation the real score needs.  That only works if the type recurs between training and test rows.
A random label per *episode* never does under an episode split (every test episode is new), so it
measures nothing.  Here the type of a row is **(task, progress bin)**: which task the episode performs,
and which quarter of the episode the step lies in (step over the episode's last stored step).  Both recur
in every held-out episode, so a representation that encodes task and progress can learn the control.
Under a held-out-*task* split the types do not recur, so the control sits at chance there, by design.

The control has the target's label space: a random class (classification), a random candidate
instruction (embedding), or a random value with the target's mean and spread (regression).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from toolkit.sdk.targets import TargetData

PROGRESS_BINS = 4
TYPE_DESCRIPTION = f"(task, progress quartile): a random label per task × {PROGRESS_BINS} progress bins"


def input_type(task: np.ndarray, progress: np.ndarray, bins: int = PROGRESS_BINS) -> np.ndarray:
    """Per row: an integer id of its (task, progress bin) type."""
    _, t = np.unique(task, return_inverse=True)
    b = np.minimum((np.asarray(progress, dtype=np.float64) * bins).astype(np.int64), bins - 1)
    return t * bins + b


def control_target(d: TargetData, types: np.ndarray, seed: int, choices: dict[int, np.ndarray] | None = None,
                   ) -> TargetData:
    """The control task of ``d``: the same label space, labels a seeded random function of the row's type.

    ``choices`` (embedding targets under a held-out-task split) limits each type's random instruction to
    the candidates its rows are scored against, so target and control compete on the same candidates.
    """
    rng = np.random.default_rng(seed + 7919)
    n_types = int(types.max()) + 1 if len(types) else 0
    if d.kind == "classification":
        per_type = rng.integers(0, len(d.class_names), n_types)
        return replace(d, classes=per_type[types], valid=None, info={})
    if d.kind == "embedding":
        per_type = rng.integers(0, len(d.candidates), n_types)
        for t, allowed in (choices or {}).items():
            per_type[t] = allowed[rng.integers(0, len(allowed))]
        idx = per_type[types]
        return replace(d, y=d.candidates[idx], index=idx, valid=None, info={})
    y = np.asarray(d.y, dtype=np.float32)
    noise = rng.standard_normal((n_types, y.shape[1])).astype(np.float32)
    return replace(d, y=y.mean(0) + noise[types] * y.std(0), valid=None, info={})
