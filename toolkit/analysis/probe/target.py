"""Probe labels read from a store: the ``Labels`` a target plugin encodes (``toolkit.sdk.targets``)."""

from __future__ import annotations

import numpy as np

from toolkit.analysis.probe.select import plain
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.targets import Labels
from toolkit.store.reader import Store


class StoreLabels(Labels):
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
