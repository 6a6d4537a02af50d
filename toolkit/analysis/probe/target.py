"""The contract between the probe engine and target plugins (label encoders).

A target plugin registers a class with ``name`` and ``description``; the engine constructs it as
``cls(arg, **options)`` (``arg`` is what follows the colon in ``--target field:success``) and calls
``encode(labels)``, where ``labels`` reads any per-sample field of the selected rows.  The result says
what kind of probe it needs; the engine does the rest (splits, control task, solvers, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.probe.select import plain
from toolkit.store.core import Store

KINDS = ("classification", "embedding", "regression")


@dataclass
class TargetData:
    """Encoded labels for the selected rows.

    classification: ``classes`` (n,) ints into ``class_names``.
    embedding:      ``y`` (n, E) and ``index`` (n,) into ``candidates`` (C, E) named ``candidate_names``
                    (the retrieval set: every distinct instruction).
    regression:     ``y`` (n, M).
    ``valid`` marks rows that have a label (e.g. episodes whose success is unknown have none).
    """

    kind: str
    y: np.ndarray | None = None
    classes: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    candidates: np.ndarray | None = None
    candidate_names: list[str] = field(default_factory=list)
    index: np.ndarray | None = None
    valid: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def columns(self) -> np.ndarray:
        """The matrix ridge regresses on: one-hot classes, or the targets themselves."""
        if self.kind == "classification":
            return np.eye(len(self.class_names), dtype=np.float32)[self.classes]
        return np.asarray(self.y, dtype=np.float32).reshape(len(self.y), -1)


class Labels:
    """Per-sample fields of the selected rows, read from the store on demand (they are small)."""

    def __init__(self, store: Store, rows: np.ndarray):
        self.store = store
        self.rows = rows
        self._cache: dict[str, np.ndarray] = {}

    def fields(self) -> list[str]:
        return self.store.fields() + ["progress"]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name == "progress" and "progress" not in self.store.fields():
                self._cache[name] = progress(self["episode"], self["step"])
            else:
                if name not in self.store.fields():
                    raise ToolkitError(f"store has no per-sample field {name!r}; fields: {', '.join(self.fields())}")
                self._cache[name] = plain(self.store.coord(name)[self.rows])
        return self._cache[name]


def progress(episode: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Step over the episode's last stored step: 0 at the start, 1 at the end (task lengths differ)."""
    out = np.zeros(len(step), dtype=np.float32)
    for e in np.unique(episode):
        m = episode == e
        out[m] = step[m] / max(1, step[m].max())
    return out
