"""Control tasks that can be learned in principle (Hewitt & Liang 2019): a random function of the input *type*.

Hewitt & Liang give every word *type* a random label; a probe scores on the control only as far as it can
memorise which type carries which label, so "selectivity" (real − control) measures how much more than
memorisation the real score needs.  That only works if the type recurs between training and test rows.
A random label per *episode* never does under an episode split (every test episode is new), so it
measures nothing.  Here the type of a row is **(task, progress bin)**: which task the episode performs,
and which quarter of the episode the step lies in (step over the episode's last stored step).  Both recur
in every held-out episode, so a representation that encodes task and progress can learn the control.
Under a held-out-*task* split the types do not recur, so the control sits at chance there, by design.

The control has the target's label space *and its label distribution*: each type's label is drawn so that
the rows' labels keep the real frequencies (classes and candidate instructions: ``_quota``; values: the
value of a random real row), so the control's majority rate (its chance line) matches the target's.  A
uniform random class per type does not: on an 80/20 target it gives a control near 50/50 whose own floor
is far below the target's, and selectivity then changed sign with the seed.  Several independent draws
(``control_targets``) are fitted side by side and averaged (``ProbeConfig.n_controls``).
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


def _quota(labels: np.ndarray, types: np.ndarray, n_types: int, rng) -> np.ndarray:
    """Per type one label such that the rows' label counts match the real ones as closely as whole types allow:
    the types (in random order) are laid end to end over the rows, so are the real labels' counts (labels in
    random order), and each type takes the label under the middle of its span.  Which types share a label is
    random; how many rows carry each label is the real count, give or take a type's rows at each boundary."""
    size = np.bincount(types, minlength=n_types)
    values, counts = np.unique(labels, return_counts=True)
    lab = rng.permutation(len(values))
    ends = np.cumsum(counts[lab])
    order = rng.permutation(n_types)
    mid = np.cumsum(size[order]) - size[order] / 2
    per_type = np.empty(n_types, dtype=values.dtype)
    per_type[order] = values[lab][np.minimum(np.searchsorted(ends, mid, side="right"), len(values) - 1)]
    return per_type


def control_target(d: TargetData, types: np.ndarray, seed: int, choices: dict[int, np.ndarray] | None = None,
                   draw: int = 0) -> TargetData:
    """The control task of ``d``: the same label space and label frequencies, labels a seeded random function
    of the row's type (draw ``draw`` of several independent ones).

    ``choices`` (embedding targets under a held-out-task split) limits each type's random instruction to
    the candidates its rows are scored against, so target and control compete on the same candidates: the
    types sharing a set of candidates share out those rows' real instructions.
    """
    rng = np.random.default_rng([seed + 7919, draw])
    n_types = int(types.max()) + 1 if len(types) else 0
    if d.kind == "classification":
        per_type = _quota(d.classes, types, n_types, rng)
        return replace(d, classes=per_type[types], valid=None, info={})
    if d.kind == "embedding":
        per_type = _quota(d.index, types, n_types, rng)
        groups: dict[bytes, list[int]] = {}
        for t, allowed in (choices or {}).items():
            groups.setdefault(np.asarray(allowed).tobytes(), []).append(int(t))
        for members in groups.values():
            m = np.isin(types, members)
            local = np.unique(types[m], return_inverse=True)[1]
            per_type[np.unique(types[m])] = _quota(d.index[m], local, len(np.unique(types[m])), rng)
        idx = per_type[types]
        return replace(d, y=d.candidates[idx], index=idx, valid=None, info={})
    y = np.asarray(d.y, dtype=np.float32)
    pick = rng.integers(0, len(y), n_types) if len(y) else np.zeros(n_types, dtype=np.int64)
    return replace(d, y=y[pick][types], valid=None, info={})


def control_targets(d: TargetData, types: np.ndarray, seed: int, n: int,
                    choices: dict[int, np.ndarray] | None = None) -> list[TargetData]:
    """``n`` independent control draws of ``d`` (see ``control_target``)."""
    return [control_target(d, types, seed, choices, draw=i) for i in range(n)]
