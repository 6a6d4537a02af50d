"""What the viewer shows, read from stores and a probe results folder: per episode its steps, instruction and
success, the policy's and the dataset's actions, the camera frames (JPEG, bounded in number) and the probe's
per-step confidence in the true label at every layer with saved weights."""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.analysis.directions import ProbeDirection, probe_activations, probe_direction, probe_labels
from toolkit.analysis.probe.results import Results
from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import Store, open_store


@dataclass
class Probes:
    """The saved probes the heatmap rows come from (one per site × layer × t), and what they are."""

    cells: list[ProbeDirection]
    target: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        out = []
        for p in self.cells:
            t = p.row.get("t")
            out.append(f"{p.row['site']}.{int(p.row['layer'])}" + ("" if _missing(t) else f" t={float(t):g}"))
        return out


def _missing(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v)) or str(v) in ("None", "nan")


def load_probes(results: str | Path, target: str | None = None) -> Probes:
    """Every saved classification probe of a ``toolkit probe`` folder for one target (default ``task``, else the
    first saved), one per site, layer and denoising time: the episode split and the all-steps probe first."""
    out = Path(results)
    res = Results.load(out)
    weights = out / "weights.npz"
    if not weights.is_file():
        raise ToolkitError(f"{out} holds no weights.npz: run `toolkit probe` with --save-weights all (every layer) "
                           "or best")
    with np.load(weights, allow_pickle=False) as z:
        saved = {int(k[2:]) for k in z.files if k.startswith("W_")}
    rows = [r for r in res.rows if int(r["id"]) in saved and r.get("kind") == "classification"]
    if not rows:
        raise ToolkitError(f"{out} holds no saved classification probe (the heatmap shows confidence in the true "
                           "class): probe a target such as task with --save-weights all")
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    if target is None:
        target = "task" if "task" in targets else targets[0]
    if target not in targets:
        raise ToolkitError(f"{out} has no saved classification probe of target {target!r}; saved: "
                           f"{', '.join(targets)}")
    cells: dict[tuple, dict] = {}
    for r in rows:
        if str(r["target"]) != target:
            continue
        key = (r["site"], r.get("stream"), int(r["layer"]), None if _missing(r.get("t")) else float(r["t"]))
        rank = (r["split"] != "episodes", str(r.get("step")) not in ("all", "None", ""), int(r["id"]))
        if key not in cells or rank < cells[key][0]:
            cells[key] = (rank, r)
    chosen = sorted(cells.items(), key=lambda kv: (str(kv[0][0]), -1 if kv[0][3] is None else -kv[0][3], kv[0][2]))
    probes = Probes([probe_direction(out, int(r["id"])) for _, (_, r) in chosen], target)
    if len(probes.cells) == 1:
        probes.notes.append(f"{out} keeps one probe's weights (--save-weights best): rerun `toolkit probe` with "
                            "--save-weights all for a row per layer")
    return probes


def confidence(store: Store, probe: ProbeDirection) -> np.ndarray:
    """Per sample of ``store``: the probe's confidence in the sample's true class (NaN where its label is one the
    probe never saw).  Ridge probes regress one-hot labels, so their class scores sum to one and the true class's
    score is used as it is (the probe run's own per-row confidence); logistic and cosine scores go through a
    softmax first."""
    rows, x = probe_activations(store, probe)
    labels = probe_labels(store, probe, rows)
    out = np.full(store.n_samples, np.nan, dtype=np.float32)
    if labels is None:
        return out
    scores = (x.astype(np.float64) - probe.shift) @ probe.W + probe.b
    if probe.row.get("solver") != "ridge":
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    ok = labels >= 0
    out[np.asarray(rows)[ok]] = scores[np.nonzero(ok)[0], labels[ok]]
    return out


def jpeg_uri(frame: np.ndarray, size: int, quality: int) -> str:
    """A frame as a ``data:`` URI: JPEG, the longer side at most ``size`` px."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame))
    if max(img.size) > size:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _values(a: np.ndarray, nd: int = 4) -> list:
    """A float array as nested lists, rounded, NaN as None (strict JSON)."""
    r = np.round(np.asarray(a, dtype=np.float64), nd)
    return json.loads(json.dumps(r.tolist()).replace("NaN", "null"))


def _text(values: np.ndarray) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


@dataclass
class Rollouts:
    """One store's per-sample data the viewer needs, by sample position."""

    store: Store
    episode: np.ndarray
    step: np.ndarray
    key: list[str]
    policy: np.ndarray | None
    conf: np.ndarray | None  # (cells, samples)
    cameras: list[str]

    @classmethod
    def read(cls, store: Store, probes: Probes | None, notes: list[str]) -> Rollouts:
        s = store
        key = _text(s.coord("episode_key")) if "episode_key" in s.fields() else \
            [str(v) for v in s.coord("episode").tolist()]
        policy = None
        if "policy_action" in s.fields():
            p = s.coord("policy_action").astype(np.float32)
            policy = p[:, 0] if p.ndim == 3 else p.reshape(len(p), -1)  # the first action of each chunk
        conf = None
        if probes is not None and probes.cells:
            rows = []
            for probe in probes.cells:
                try:
                    rows.append(confidence(s, probe))
                except ToolkitError as e:  # e.g. an intervened store that did not capture this hook
                    notes.append(f"{s.path}: no confidence for {probe.hook} ({e})")
                    rows.append(np.full(s.n_samples, np.nan, dtype=np.float32))
            conf = np.stack(rows)
        return cls(s, s.coord("episode"), s.coord("step"), key, policy, conf, s.cameras)


def condition_stores(run: str | Path) -> dict[str, Path]:
    """A ``toolkit intervene`` folder's stores: label -> path, the unmodified run first."""
    run = Path(run)
    path = run / "effects.json"
    if not path.is_file():
        raise ToolkitError(f"{run} is not a `toolkit intervene` output folder (no effects.json)")
    meta = json.loads(path.read_text()).get("meta") or {}
    stores = meta.get("stores") or {}
    if "unmodified" not in stores:
        raise ToolkitError(f"{path} names no unmodified store (meta.stores); rerun `toolkit intervene`")
    out: dict[str, Path] = {}
    for label, where in stores.items():
        p = Path(where)
        if not (p / "zarr.json").exists():  # recorded relative to where the run was started: look inside RUN
            p = run / "stores" / p.name
        if not (p / "zarr.json").exists():
            raise ToolkitError(f"{run}: the store of condition {label!r} ({where}) is missing")
        out[str(label)] = p
    return out


def open_quiet(path: str | Path) -> Store:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = open_store(path)
    return store
