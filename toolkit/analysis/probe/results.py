"""The tidy results of a probe run and their files: one row per site × layer × step × t × target × solver × split.

Files in the output folder (all plain formats, readable without this package):

* ``results.csv`` / ``results.json``: the table (the JSON also holds the run's settings: model, store, selection);
* ``best.csv``: per (site, target, split, solver, step bucket) the layer chosen inside each outer fold and the
  pooled out-of-fold score of those choices (the number without a winner's curse);
* ``success.csv``: per cell, the within-task association of per-episode probe confidence with episode success
  (correlation and difference in mean confidence, their 95 % intervals, the within-task permutation p;
  ``toolkit.analysis.probe.success``; only where both outcomes occur); ``success_per_task.csv``: its per-task
  breakdown (episodes, successes, mean confidence per outcome, difference, weight, tasks left out and why);
* ``per_task.csv``; ``details.json`` (confusion matrices, instruction similarity matrices, by row id);
* ``folds.csv``: the outer fold of every episode, per (site, split, target): episode, episode key, task, fold,
  K, rows, seed (``Results.fold_of``; the intervals describe probes trained on the other K − 1 folds);
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

from toolkit.analysis.probe.intervals import CORRECTIONS, adjust_pvalues
from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import model_weights


# The columns a reader needs first (where in the model, what, how well, against what, whether it survives the
# correction); the others (the control and its own chance, the raw p-value, test episodes, ...) follow.
LEAD = ("site", "layer", "t", "step", "target", "split", "metric_name", "metric", "ci_low", "ci_high", "chance",
        "selectivity", "p_adjusted", "significant", "warnings")


def interval_note(n_folds) -> str:
    """What the 95 % intervals describe, for K outer folds (one K, or several: per split)."""
    ks = sorted({int(k) for k in (n_folds if isinstance(n_folds, (list, tuple, set)) else [n_folds])
                 if k not in (None, "")}) or [5]
    frac = ", ".join(f"{k - 1}/{k}" for k in ks)
    return (f"95 % intervals describe a probe trained on (K−1)/K of the episodes ({frac}; K = "
            f"{', '.join(map(str, ks))} outer folds): the procedure's held-out score at that training size, not "
            f"the probe refitted on every episode (the saved weights)")


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
    folds: list[dict] = field(default_factory=list)  # episode -> outer fold, per (site, split, target): folds.csv

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
        self.folds += other.folds
        if not self.meta:
            self.meta = dict(other.meta)
        self.correct()  # the family is the whole run: every row so far

    def correct(self, method: str | None = None, alpha: float | None = None) -> None:
        """Correct the rows' one-sided "above chance" p-values (``p_value``) for multiplicity over every row
        of the run (layers × steps × t × targets × splits × sites): ``p_adjusted`` by ``method`` (the run's
        ``correction``: holm, the default, bounds the family-wise error; bh the false discovery rate; none)
        and ``significant`` = p_adjusted ≤ ``alpha``.  ``meta["multiplicity"]`` records the correction and
        the number of tests.  Rows without a p-value (results written before the test existed) are left out."""
        cfg = self.meta.get("config") or {}
        method = method or cfg.get("correction") or "holm"
        alpha = float(cfg.get("alpha", 0.05) if alpha is None else alpha)
        if method not in CORRECTIONS:
            raise ToolkitError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
        tested = [r for r in self.rows if "p_value" in r]
        p = np.array([np.nan if r["p_value"] is None else float(r["p_value"]) for r in tested], dtype=np.float64)
        for r, a in zip(tested, adjust_pvalues(p, method)):
            r["p_adjusted"] = float(a)
            r["significant"] = bool(np.isfinite(a) and a <= alpha)
        if tested:
            self.meta["multiplicity"] = {"correction": method, "n_tests": int(np.isfinite(p).sum()), "alpha": alpha,
                                         "test": "one-sided: metric above chance (or the majority rate if higher; "
                                                 "R² above 0)"}

    def table(self, columns: str | list[str] = "all"):
        """The results as a pandas DataFrame, one row per probe: ``"all"`` columns (the ones a reader needs first,
        see ``LEAD``), ``"lead"`` those only, or a list of names."""
        import pandas as pd

        cols = ordered_columns(self.rows)
        if columns == "lead":
            cols = [c for c in cols if c in LEAD]
        elif columns != "all":
            cols = list(columns)
        df = pd.DataFrame(self.rows, columns=cols)
        df.attrs["intervals"] = interval_note({r.get("n_folds") for r in self.rows})
        return df

    def __repr__(self) -> str:
        """A few lines: how many probes of what, the best of each site and target, and the model's weights."""
        if not self.rows:
            return "<probe Results: empty>"
        sites = sorted({str(r["site"]) for r in self.rows})
        targets = sorted({str(r["target"]) for r in self.rows})
        lines = [f"<probe Results: {len(self.rows)} probes, sites {', '.join(sites)}, targets {', '.join(targets)}"
                 + (" (RANDOM weights)" if model_weights(self.meta.get("model")).random else "") + ">"]
        for b in self.best[:8]:
            lines.append(f"  selected {b['site']} {b['target']} (step {b['step']}): layer {b['layer']}, "
                         f"{b['metric_name']} {b['metric']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]")
        flagged = sum(1 for r in self.rows if r.get("warnings"))
        lines.append(f"  {interval_note({r.get('n_folds') for r in self.rows})}")
        mult = self.meta.get("multiplicity")
        if mult:
            name = _CORRECTION_NAMES.get(mult["correction"], mult["correction"])
            lines.append(f"  {sum(bool(r.get('significant')) for r in self.rows)} of {mult['n_tests']} cells above "
                         f"chance at {mult['alpha']:g} after {name}")
        lines.append(f"  .table() for every row ({len(ordered_columns(self.rows))} columns); "
                     f"{flagged} rows carry warnings")
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "results.csv", self.rows)
        _write_csv(out / "best.csv", self.best)
        _write_csv(out / "per_task.csv", self.per_task)
        _write_csv(out / "success.csv", [{k: v for k, v in r.items() if k != "per_task"} for r in self.success])
        _write_csv(out / "success_per_task.csv", [{"id": r["id"], "site": r["site"], "layer": r["layer"], "t": r["t"],
                                                   "step": r["step"], "target": r["target"], "solver": r["solver"],
                                                   "split": r["split"], **k}
                                                  for r in self.success for k in r.get("per_task", [])])
        _write_csv(out / "folds.csv", self.folds)
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
        return cls(rows=[_upgrade(r) for r in data["rows"]], per_task=per_task,
                   details={int(k): v for k, v in details.items()},
                   meta=data.get("meta", {}), best=data.get("best", []),
                   success=data.get("success", []), folds=_read_folds(out / "folds.csv"))

    def fold_of(self, site: str, target: str = "task", split: str = "episodes") -> dict[str, int]:
        """Episode key -> outer fold (0..K−1) that the run used for one site, target and split."""
        rows = [f for f in self.folds if f["site"] == site and f["target"] == target and f["split"] == split]
        if not rows:
            have = sorted({f"{f['site']} {f['target']} {f['split']}" for f in self.folds}) or ["none"]
            raise ToolkitError(f"no fold assignment for {site} {target} {split}; saved: {', '.join(have)} (results "
                               "written before folds.csv existed have none: rerun `toolkit probe`)")
        out: dict[str, int] = {}
        for f in rows:
            if out.setdefault(str(f["episode_key"]), int(f["fold"])) != int(f["fold"]):
                raise ToolkitError(f"episode {f['episode_key']} spans several folds under the {split} split: read "
                                   "folds.csv's rows per fold instead")
        return out


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


_CORRECTION_NAMES = {"holm": "Holm's correction", "bh": "Benjamini–Hochberg", "none": "no correction"}


def correction_text(meta: dict) -> str:
    """One sentence: which test, which correction, over how many tests (for the report and the CLI)."""
    m = meta.get("multiplicity")
    if not m:
        return "No significance test was recorded (results from before the test existed)."
    return (f"\"Significant\" is a one-sided score test of the metric above chance (or the majority rate if "
            f"higher; R² above 0; p_value; episode-clustered variance, Student's t), "
            f"{_CORRECTION_NAMES.get(m['correction'], m['correction'])} over all {m['n_tests']} tests of the run "
            f"(p_adjusted), at {m['alpha']:g}.")


def _upgrade(row: dict) -> dict:
    """A row of older results: ``flagged`` (it meant "has warnings", not significance) becomes ``has_warnings``."""
    if "flagged" in row and "has_warnings" not in row:
        row = {("has_warnings" if k == "flagged" else k): v for k, v in row.items()}
    return row


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


def _read_folds(path: Path) -> list[dict]:
    """folds.csv back, with its integer columns as integers (empty when the results predate it)."""
    if not path.exists():
        return []
    ints = ("episode", "fold", "n_folds", "rows", "seed")
    return [{k: int(v) if k in ints and v != "" else v for k, v in r.items()} for r in _read_csv(path)]


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))
