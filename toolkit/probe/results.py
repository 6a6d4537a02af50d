"""The tidy results of a probe run and their files: one row per site × layer × step × t × target × solver × split.

Files in the output folder (all plain formats, readable without this package):
``results.csv`` / ``results.json`` (the table; the JSON also holds the run's settings), ``per_task.csv``,
``details.json`` (confusion matrices, instruction similarity matrices, by row id), ``weights.npz``
(``W_<id>``, ``b_<id>``, ``shift_<id>``: predict with (x − shift) @ W + b on raw activations).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    per_task: list[dict] = field(default_factory=list)
    details: dict[int, dict] = field(default_factory=dict)
    weights: dict[int, tuple] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add(self, row: dict, extra: dict, per_task: list[dict], weights) -> None:
        self.rows.append(row)
        self.details[row["id"]] = extra
        self.per_task += [{"id": row["id"], "site": row["site"], "layer": row["layer"], "t": row["t"],
                           "step": row["step"], "target": row["target"], "solver": row["solver"],
                           "split": row["split"], **p} for p in per_task]
        policy = self.meta.get("config", {}).get("save_weights", "best")
        if policy == "all":
            self.weights[row["id"]] = weights
        elif policy == "best":
            key = (row["site"], row["target"], row["solver"], row["split"])
            rival = next((i for i in self.weights if _key(self.rows[i]) == key), None)
            if rival is None or row["metric"] > self.rows[rival]["metric"]:
                self.weights.pop(rival, None)
                self.weights[row["id"]] = weights

    def extend(self, other: "Results") -> None:
        """Append another run's rows (renumbering ids), e.g. a second site of the same sweep."""
        offset = len(self.rows)
        for r in other.rows:
            self.rows.append({**r, "id": r["id"] + offset})
        self.per_task += [{**p, "id": p["id"] + offset} for p in other.per_task]
        self.details.update({i + offset: v for i, v in other.details.items()})
        self.weights.update({i + offset: v for i, v in other.weights.items()})
        if not self.meta:
            self.meta = dict(other.meta)

    def table(self):
        """The results as a pandas DataFrame (one row per probe)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "results.csv", self.rows)
        _write_csv(out / "per_task.csv", self.per_task)
        (out / "results.json").write_text(json.dumps(_finite({"meta": self.meta, "rows": self.rows}), indent=1,
                                                     default=_json_default))
        (out / "details.json").write_text(json.dumps({str(k): v for k, v in self.details.items() if v},
                                                     default=_json_default))
        arrays = {}
        for i, (W, b, shift) in self.weights.items():
            arrays.update({f"W_{i}": np.asarray(W, np.float32), f"b_{i}": np.asarray(b, np.float32),
                           f"shift_{i}": np.asarray(shift, np.float32)})
        np.savez_compressed(out / "weights.npz", **arrays)
        return out

    @classmethod
    def load(cls, out: str | Path) -> "Results":
        out = Path(out)
        if not (out / "results.json").exists():
            raise ToolkitError(f"{out} holds no probe results (no results.json); run `toolkit probe --out {out}`")
        data = json.loads((out / "results.json").read_text())
        details = json.loads((out / "details.json").read_text()) if (out / "details.json").exists() else {}
        per_task = _read_csv(out / "per_task.csv") if (out / "per_task.csv").exists() else []
        return cls(rows=data["rows"], per_task=per_task, details={int(k): v for k, v in details.items()},
                   meta=data.get("meta", {}))


def _key(row: dict) -> tuple:
    return row["site"], row["target"], row["solver"], row["split"]


def _finite(o):
    """NaN/inf become null so the JSON is strict (readable by any JSON parser)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))
