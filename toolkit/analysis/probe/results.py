"""The tidy results of a probe run and their files: one row per site × layer × step × t × target × solver × split.

Files in the output folder (all plain formats, readable without this package):

* ``results.csv`` / ``results.json``: the table (the JSON also holds the run's settings: model, store, selection);
* ``best.csv``: per (site, target, split, solver, step bucket) the layer chosen inside each outer fold and the
  pooled out-of-fold score of those choices (the number without a winner's curse);
* ``success.csv``: per cell, the correlation of per-episode probe confidence with episode success, its bootstrap
  interval and permutation p (``toolkit.analysis.probe.success``; only where both outcomes occur);
* ``per_task.csv``; ``details.json`` (confusion matrices, instruction similarity matrices, by row id);
* ``weights.npz``: for each saved row id ``i``, ``W_<i>`` (D, M) float32, ``b_<i>`` (M,) and ``shift_<i>`` (D,):
  the probe refitted on every episode, on raw (decoded, pooled) activations: scores = (x − shift) @ W + b.
  Columns are the target's classes (``details.json`` labels, the same order) or its embedding / value
  dimensions.  ``load_direction`` reads one back.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.sdk.errors import ToolkitError


# The columns a reader needs first (where in the model, what, how well, against what); the others follow.
LEAD = ("site", "layer", "t", "step", "target", "split", "metric_name", "metric", "ci_low", "ci_high", "chance",
        "control", "selectivity", "n_test_episodes", "warnings")


def ordered_columns(rows: list[dict]) -> list[str]:
    """Every column the rows have, the ``LEAD`` ones first."""
    cols: list[str] = [c for c in LEAD if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


@dataclass(repr=False)
class Results:
    """The tidy results of a probe run (``rows``: one per probe) and what goes with them."""

    rows: list[dict] = field(default_factory=list)
    per_task: list[dict] = field(default_factory=list)
    details: dict[int, dict] = field(default_factory=dict)
    weights: dict[int, tuple] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    best: list[dict] = field(default_factory=list)
    success: list[dict] = field(default_factory=list)

    def add(self, row: dict, extra: dict, per_task: list[dict], final) -> None:
        """Append a row; keep its final probe's weights per the run's ``save_weights`` policy.

        "best" keeps, per (site, target, solver, split), the probe with the best inner-CV score over all
        folds (chosen without test rows, like the selected probe).
        """
        self.rows.append(row)
        self.details[row["id"]] = extra
        self.per_task += [{"id": row["id"], "site": row["site"], "layer": row["layer"], "t": row["t"],
                           "step": row["step"], "target": row["target"], "solver": row["solver"],
                           "split": row["split"], **p} for p in per_task]
        if final is None:
            return
        weights = (final.model.W, final.model.b, final.model.shift)
        policy = self.meta.get("config", {}).get("save_weights", "best")
        if policy == "all":
            self.weights[row["id"]] = weights
        elif policy == "best":
            key = _key(row)
            rival = next((i for i in self.weights if _key(self.rows[i]) == key), None)
            row["final_score"] = final.inner_score
            if rival is None or final.inner_score > self.rows[rival].get("final_score", -np.inf):
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
        self.best += other.best
        self.success += [{**r, "id": r["id"] + offset} for r in other.success]
        if not self.meta:
            self.meta = dict(other.meta)

    def table(self, columns: str | list[str] = "all"):
        """The results as a pandas DataFrame, one row per probe: ``"all"`` columns (the ones a reader needs first,
        see ``LEAD``), ``"lead"`` those only, or a list of names."""
        import pandas as pd

        cols = ordered_columns(self.rows)
        if columns == "lead":
            cols = [c for c in cols if c in LEAD]
        elif columns != "all":
            cols = list(columns)
        return pd.DataFrame(self.rows, columns=cols)

    def __repr__(self) -> str:
        """A few lines: how many probes of what, the best of each site and target, and the model's weights."""
        if not self.rows:
            return "<probe Results: empty>"
        sites = sorted({str(r["site"]) for r in self.rows})
        targets = sorted({str(r["target"]) for r in self.rows})
        model = self.meta.get("model") if isinstance(self.meta.get("model"), dict) else {}
        lines = [f"<probe Results: {len(self.rows)} probes, sites {', '.join(sites)}, targets {', '.join(targets)}"
                 + (" (RANDOM weights)" if model.get("random_init") else "") + ">"]
        for b in self.best[:8]:
            lines.append(f"  selected {b['site']} {b['target']} (step {b['step']}): layer {b['layer']}, "
                         f"{b['metric_name']} {b['metric']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]")
        flagged = sum(1 for r in self.rows if r.get("warnings"))
        lines.append(f"  .table() for every row ({len(ordered_columns(self.rows))} columns); "
                     f"{flagged} rows carry warnings")
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "results.csv", self.rows)
        _write_csv(out / "best.csv", self.best)
        _write_csv(out / "per_task.csv", self.per_task)
        _write_csv(out / "success.csv", self.success)
        (out / "results.json").write_text(json.dumps(_finite({"meta": self.meta, "rows": self.rows,
                                                              "best": self.best, "success": self.success}),
                                                      indent=1, default=_json_default))
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
            raise ToolkitError(f"{out} holds no probe results (no results.json); run `toolkit probe STORE --out {out}`")
        data = json.loads((out / "results.json").read_text())
        details = json.loads((out / "details.json").read_text()) if (out / "details.json").exists() else {}
        per_task = _read_csv(out / "per_task.csv") if (out / "per_task.csv").exists() else []
        return cls(rows=data["rows"], per_task=per_task, details={int(k): v for k, v in details.items()},
                   meta=data.get("meta", {}), best=data.get("best", []),
                   success=data.get("success", []))


@dataclass
class Direction:
    """One saved probe: scores = (x − shift) @ W + b on raw activations; ``labels`` name W's columns."""

    W: np.ndarray
    b: np.ndarray
    shift: np.ndarray
    labels: list[str]
    row: dict


def load_direction(results_dir: str | Path, site: str, layer: int, target: str = "task", t: float | None = None,
                   step: str | None = None, split: str = "episodes", solver: str | None = None) -> Direction:
    """The saved probe of one cell from a results folder (for steering and ablation along probe directions).

    Raises a one-line error naming the cells that do have weights when the asked one has none
    (``--save-weights best`` keeps one per site and target; use ``--save-weights all`` for every cell).
    """
    res = Results.load(results_dir)
    path = Path(results_dir) / "weights.npz"
    arrays = np.load(path) if path.exists() else {}
    saved = {int(k[2:]) for k in getattr(arrays, "files", []) if k.startswith("W_")}

    def match(r: dict) -> bool:
        return (r["site"] == site and int(r["layer"]) == int(layer) and r["target"] == target and r["split"] == split
                and (solver is None or r["solver"] == solver) and (step is None or str(r["step"]) == str(step))
                and (t is None or (r["t"] is not None and abs(float(r["t"]) - t) < 1e-6)))

    hits = [r for r in res.rows if match(r) and int(r["id"]) in saved]
    if not hits:
        have = ", ".join(sorted({f"{r['site']} layer {r['layer']} {r['target']}" + ("" if r["t"] is None else
                                                                                   f" t={float(r['t']):g}")
                                 for r in res.rows if int(r["id"]) in saved})) or "none"
        raise ToolkitError(f"{results_dir} has no saved probe for {site} layer {layer} {target}; saved: {have} "
                           "(rerun with --save-weights all to keep every cell)")
    r = hits[0]
    i = int(r["id"])
    return Direction(arrays[f"W_{i}"], arrays[f"b_{i}"], arrays[f"shift_{i}"],
                     list(res.details.get(i, {}).get("labels", [])) if r["kind"] == "classification" else [], r)


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
    cols = ordered_columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))
