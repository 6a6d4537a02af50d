"""``toolkit view``: one self-contained HTML file to scrub through a store's rollouts.

Per episode (picked by task and success): the camera frame at the current step, play / pause / step / a slider,
the instruction and the outcome, the probe's confidence in the true label at every layer as a heatmap (layer ×
step; a click seeks), and the policy's first predicted action against the dataset's action, per dimension.  With a
``toolkit intervene`` folder, its unmodified and an intervened rollout side by side.  Everything is inline (the
script and styles from this package, the frames as JPEG ``data:`` URIs, the numbers as JSON): opening it makes no
network request.  Drawing is a small hand-written canvas script (``viewer.js``): heatmaps and line plots of a few
hundred points need no plotting library, and none has to be shipped inside every file.

Size: at most ``max_frames`` frames (JPEG, the longer side at most ``frame_size`` px) and ``max_episodes``
episodes; beyond either, frames are thinned (every k-th step keeps its frame) or episodes left out, each said in a
note and returned by ``view`` (the CLI prints them)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

# the CLI reads the defaults below at `toolkit --help`: what computes (probes, hence torch) is imported in `view`

MAX_FRAMES = 2000


MAX_EPISODES = 200


FRAME_SIZE = 128


QUALITY = 85


class View(str):
    """The written file's path (a ``str``), with ``notes``: what was thinned or left out, and why."""

    notes: list[str]
    size: int


def view(store: str | Path | None = None, out: str | Path = "view.html", *, results: str | Path | None = None,
         intervention: str | Path | None = None, target: str | None = None, episodes: Any = None,
         max_episodes: int = MAX_EPISODES, max_frames: int = MAX_FRAMES, frame_size: int = FRAME_SIZE,
         title: str | None = None, rerun: str | Path | None = None) -> View:
    """Write the viewer of ``store`` to ``out`` (one HTML file) and return its path.

    ``results``: a ``toolkit probe`` folder whose saved classification probes give the heatmap (``target``: which
    one, default ``task``).  ``intervention``: a ``toolkit intervene`` folder; ``store`` then defaults to its
    unmodified store, shown beside the intervened rollout picked in the page.  ``episodes`` picks episodes by
    ordinal (``"0-9"``; the selection grammar); ``max_episodes``, ``max_frames`` and ``frame_size`` bound the file
    (see the module docstring).  ``rerun``: write the same timelines as a rerun recording (``.rrd``, the
    ``rerun`` extra) at that path instead of the page (``toolkit.analysis.view.rerun``)."""
    from toolkit.analysis.view.data import Rollouts, condition_stores, load_probes, open_quiet

    if max_frames < 0 or max_episodes < 1 or frame_size < 8:
        raise ToolkitError("--max-frames must be at least 0, --max-episodes at least 1 and --frame-size at least 8")
    conditions = condition_stores(intervention) if intervention is not None else {}
    if store is None:
        if not conditions:
            raise ToolkitError("no store given: toolkit view STORE (or --intervention RUN)")
        store = conditions["unmodified"]
    main = open_quiet(store)
    if not main.n_samples:
        raise ToolkitError(f"{store} holds no committed sample: nothing to view")
    notes: list[str] = [] if main.complete else [f"{main.path} is incomplete: its {main.n_samples} committed samples "
                                                  "are shown"]
    probes = load_probes(results, target) if results is not None else None
    if probes is not None:
        notes += probes.notes
    same = bool(conditions) and Path(store).resolve() == Path(conditions["unmodified"]).resolve()
    base_label = "unmodified" if same else "rollout"
    runs = {base_label: Rollouts.read(main, probes, notes)}
    for label, path in conditions.items():
        if label != "unmodified" or base_label != "unmodified":
            runs[label] = Rollouts.read(open_quiet(path), probes, notes)
    data = _page_data(main, runs, probes, episodes, max_episodes, max_frames, frame_size, notes)
    data["meta"]["title"] = title or f"toolkit view: {main.path}"
    if rerun is not None:
        from toolkit.analysis.view.rerun import write_rerun

        path = write_rerun(data, rerun)
        result = View(str(path))
        result.notes, result.size = notes, path.stat().st_size
        return result
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render(data)
    out.write_text(page, encoding="utf-8")
    result = View(str(out))
    result.notes, result.size = notes, len(page.encode())
    return result


def _page_data(main, runs: dict, probes, episodes, max_episodes: int, max_frames: int, frame_size: int,
               notes: list[str]) -> dict:
    from toolkit.analysis.view.data import _text, _values
    from toolkit.store.reader import model_weights

    base = next(iter(runs.values()))
    order = list(dict.fromkeys(base.episode.tolist()))
    if episodes is not None:
        from toolkit.sdk.names import IndexSpec

        keep = IndexSpec.parse(episodes, "episode").mask(np.asarray(order))
        order = [e for e, k in zip(order, keep) if k]
        if not order:
            raise ToolkitError(f"--episodes {episodes} picks no episode of {main.path}")
    if len(order) > max_episodes:
        notes.append(f"showing the first {max_episodes} of {len(order)} episodes (--max-episodes); pick others with "
                     "--episodes")
        order = order[:max_episodes]
    fields = set(main.fields())
    task = _text(main.coord("task")) if "task" in fields else [""] * main.n_samples
    instruction = _text(main.coord("instruction")) if "instruction" in fields else task
    success = main.coord("success").astype(int).tolist() if "success" in fields else [-1] * main.n_samples
    task_id = main.coord("task_id").astype(int).tolist() if "task_id" in fields else [0] * main.n_samples
    dataset_action = main.coord("dataset_action").astype(np.float32) if "dataset_action" in fields else None
    if dataset_action is not None and dataset_action.ndim != 2:
        dataset_action = dataset_action.reshape(len(dataset_action), -1)
    positions = {e: np.nonzero(base.episode == e)[0] for e in order}
    # the frame budget: every k-th step of each episode keeps its frames, over every run and camera
    cams = sum(len(r.cameras) for r in runs.values())

    def n_frames(k: int) -> int:
        return cams * sum(-(-len(p) // k) for p in positions.values())

    longest = max(len(p) for p in positions.values())
    every = max(1, -(-n_frames(1) // max_frames)) if max_frames else 0
    while every and every < longest and n_frames(every) > max_frames:
        every += 1
    framed = set(order)  # episodes whose steps have frames: all, unless even one frame each is too many
    if every and n_frames(every) > max_frames:
        framed = set(order[:max_frames // max(1, cams)])
        notes.append(f"{n_frames(1)} frames exceed --max-frames {max_frames}: the first {len(framed)} episodes keep "
                     "one frame each, the others none")
    elif every > 1:
        notes.append(f"{n_frames(1)} frames exceed --max-frames {max_frames}: every {every}th step keeps its frame "
                     f"({n_frames(every)} frames)")
    elif not max_frames and n_frames(1):
        notes.append("--max-frames 0: no frames")
    index = {name: {(k, int(st)): i for i, (k, st) in enumerate(zip(r.key, r.step.tolist()))}
             for name, r in runs.items()}
    out_eps = []
    for e in order:
        pos = positions[e]
        first = int(pos[0])
        ep: dict[str, Any] = {"episode": int(e), "key": base.key[first], "task": task[first],
                              "task_id": task_id[first], "instruction": instruction[first],
                              "success": success[first], "steps": base.step[pos].astype(int).tolist(),
                              "dataset_action": None if dataset_action is None else _values(dataset_action[pos]),
                              "runs": {}}
        for name, r in runs.items():
            at = pos if r is base else np.array([index[name].get((base.key[i], int(base.step[i])), -1) for i in pos])
            ep["runs"][name] = _run_episode(r, at, every if e in framed else 0, frame_size)
        out_eps.append(ep)
    model = main.attrs.get("model") or {}
    w = model_weights(model)
    meta = {"store": str(main.path), "model": model.get("name") if isinstance(model, dict) else str(model),
            "weights": f"{w.label}: {w.detail}", "random": bool(w.random), "n_samples": main.n_samples,
            "dataset": (main.attrs.get("dataset") or {}).get("name"), "notes": notes,
            "probe": None if probes is None else {"target": probes.target, "cells": probes.labels,
                                                  "hooks": [p.hook for p in probes.cells],
                                                  "solver": [p.row.get("solver") for p in probes.cells]}}
    return {"meta": meta, "runs": list(runs), "cameras": sorted({c for r in runs.values() for c in r.cameras}),
            "episodes": out_eps}


def _run_episode(r, at: np.ndarray, every: int, frame_size: int) -> dict:
    from toolkit.analysis.view.data import _values, jpeg_uri

    ok = at >= 0
    idx = np.where(ok, at, 0)

    def pick(a: np.ndarray) -> list:
        v = a[idx].astype(np.float64)
        v[~ok] = np.nan
        return _values(v)

    out: dict[str, Any] = {"action": None if r.policy is None else pick(r.policy),
                           "conf": None if r.conf is None else _values(np.where(ok, r.conf[:, idx], np.nan), 3),
                           "frames": {}}
    for cam in r.cameras:
        uris: list[str | None] = [None] * len(at)
        if every:
            keep = [k for k in range(0, len(at), every) if ok[k]]
            if keep:
                frames = r.store.frames(cam, np.asarray([at[k] for k in keep]))
                for k, f in zip(keep, frames):
                    uris[k] = jpeg_uri(f, frame_size, QUALITY)
        out["frames"][cam] = uris
    return out


def _asset(name: str) -> str:
    return resources.files("toolkit.analysis.view").joinpath(name).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The page: the template with the styles, the script and the data inlined (``</`` escaped in the JSON)."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (_asset("viewer.html").replace("/*STYLE*/", _asset("viewer.css"))
            .replace("/*SCRIPT*/", _asset("viewer.js"))
            .replace("{{TITLE}}", _escape(data["meta"].get("title", "toolkit view")))
            .replace("/*DATA*/", payload))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["view", "render", "View", "MAX_FRAMES", "MAX_EPISODES", "FRAME_SIZE"]
