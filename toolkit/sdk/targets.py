"""The contract between the probe engine and target plugins (label encoders).

A target plugin registers a class with ``name`` and ``description``; the engine constructs it as
``cls(arg, **options)`` (``arg`` is what follows the colon in ``--target field:success``) and calls
``encode(labels)``, where ``labels`` reads any per-sample field of the selected rows (``Labels``).  The result
(``TargetData``) says what kind of probe it needs; the engine does the rest (splits, control task, solvers,
metrics).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

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


class Labels(abc.ABC):
    """What a target reads: per-sample fields of the selected rows, by name (``labels["task"]``)."""

    @abc.abstractmethod
    def fields(self) -> list[str]:
        """The names that can be read."""

    @abc.abstractmethod
    def __getitem__(self, name: str) -> np.ndarray:
        """One value per selected row; a one-line ToolkitError for a name the data does not have."""
