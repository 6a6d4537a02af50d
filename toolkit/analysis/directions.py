"""Directions to intervene along, read from what the analysis left: a probe's saved weights
(``probe_direction``), the mean difference between two groups of a store's samples (``mean_difference``,
e.g. ``task=3`` vs ``task=5``), a stream's mean (``store_mean``), or a ``.npy`` file (``load_vector``).
They are plain arrays; ``toolkit.capture.intervention`` applies them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.analysis.probe.results import Results, load_direction
from toolkit.analysis.stats import iter_sample_vectors
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import hook_name, parse_hook
from toolkit.store.reader import open_store, Store


def load_vector(path: str | Path) -> np.ndarray:
    """A direction saved as ``.npy`` (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"direction file {p} does not exist")
    try:
        return np.asarray(np.load(p, allow_pickle=False), dtype=np.float64)
    except ValueError as e:
        raise ToolkitError(f"{p} is not a plain .npy array ({e})") from None


@dataclass(frozen=True)
class ProbeDirection:
    """A probe's weights and where it was trained: predict with (x - shift) @ W + b."""

    W: np.ndarray  # (F, C)
    b: np.ndarray  # (C,)
    shift: np.ndarray  # (F,)
    row: dict  # the results row: site, layer, stream, t, target, classes ...
    classes: list[str]
    selection: dict  # the probe run's selection (tokens, pool, ...)

    @property
    def hook(self) -> str:
        return hook_name(self.row["site"], int(self.row["layer"]), self.row.get("stream") or "resid_post")

    def column(self, cls: str | int) -> int:
        """The output column of a class: its name first (class names may be digits), else a column index."""
        if str(cls) in self.classes:
            return self.classes.index(str(cls))
        if isinstance(cls, str) and not cls.lstrip("-").isdigit():
            raise ToolkitError(f"the probe has no class {cls!r}; classes: {', '.join(self.classes)}")
        c = int(cls)
        if not -self.W.shape[1] <= c < self.W.shape[1]:
            raise ToolkitError(f"the probe has {self.W.shape[1]} output columns, not {c}")
        return c % self.W.shape[1]

    def direction(self, cls: str | int | None = None) -> np.ndarray:
        """One class's column (name or index), a regression's only column, or the whole (F, C) span."""
        if cls is None:
            return self.W[:, 0] if self.W.shape[1] == 1 else self.W
        return self.W[:, self.column(cls)]


def probe_direction(results: str | Path, row_id: int | None = None) -> ProbeDirection:
    """A probe's saved weights (``toolkit probe --out DIR``) and the row they belong to, read through
    ``toolkit.analysis.probe.results.load_direction``.  ``row_id`` None: the only saved probe, else an error listing them."""
    out = Path(results)
    res = Results.load(out)
    if not (out / "weights.npz").is_file():
        raise ToolkitError(f"{out} holds no weights.npz: run `toolkit probe` with --save-weights best or all")
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        ids = sorted(int(k[2:]) for k in z.files if k.startswith("W_"))
    if row_id is None and len(ids) != 1:
        raise ToolkitError(f"{out} holds the weights of {len(ids)} probes (ids {', '.join(map(str, ids))}); pick one "
                           f"with DIR:ID, e.g. {out}:{ids[0] if ids else 0}")
    row_id = ids[0] if row_id is None else row_id
    row = next((r for r in res.rows if int(r["id"]) == row_id), None)
    if row is None or row_id not in ids:
        raise ToolkitError(f"{out} has no saved weights for probe {row_id}; saved: {', '.join(map(str, ids))}")
    t = row.get("t")
    d = load_direction(out, row["site"], int(row["layer"]), row["target"], t=None if t is None else float(t),
                       step=row.get("step"), split=row["split"], solver=row["solver"])
    W = np.asarray(d.W, dtype=np.float64)
    W = W.reshape(W.shape[0], -1)
    classes = [str(c) for c in (d.labels or range(W.shape[1]))]
    return ProbeDirection(W, np.atleast_1d(np.asarray(d.b, dtype=np.float64)),
                          np.asarray(d.shift, dtype=np.float64).reshape(-1), d.row, classes,
                          dict(res.meta.get("selection") or {}))


def store_hook(store: Store, hook: str) -> tuple[str, int, str]:
    site, layer, stream = parse_hook(hook)
    if site not in store.sites:
        raise ToolkitError(f"{store.path} has no site {site!r}; sites: {', '.join(store.sites)}")
    if stream not in store.streams(site):
        raise ToolkitError(f"{store.path} holds no stream {stream!r} at site {site!r}")
    if layer not in store.layers(site):
        raise ToolkitError(f"{store.path} holds layers {store.layers(site)} of {site!r}, not {layer}")
    return site, layer, stream


def text_values(values: np.ndarray) -> np.ndarray:
    """A coordinate as an object array of str (stores keep strings variable-length), for matching by value."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def group_mask(store: Store, condition: str) -> np.ndarray:
    """Samples matching ``FIELD=VALUE`` (any coordinate or per-sample field; ``task=3`` also matches task id 3)."""
    name, sep, value = condition.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise ToolkitError(f"group {condition!r} must be FIELD=VALUE, e.g. task=3 or success=1")
    fields = store.fields()
    if name not in fields:
        raise ToolkitError(f"{store.path} has no field {name!r}; fields: {', '.join(fields)}")
    values = text_values(store.coord(name))
    mask = values == value
    if not mask.any() and name == "task" and value.lstrip("-").isdigit():
        mask = np.asarray(store.coord("task_id")) == int(value)
    if not mask.any():
        shown = ", ".join(sorted(set(values.tolist()))[:10])
        raise ToolkitError(f"no sample of {store.path} has {name}={value}; values: {shown}")
    return mask


def mean_difference(store: str | Path | Store, hook: str, group_a: str, group_b: str) -> np.ndarray:
    """mean(group a) - mean(group b) of a stored stream at one layer, streamed chunk by chunk."""
    s = store if isinstance(store, Store) else open_store(store)
    site, layer, stream = store_hook(s, hook)
    ma, mb = group_mask(s, group_a), group_mask(s, group_b)
    if (ma & mb).any():
        raise ToolkitError(f"groups {group_a!r} and {group_b!r} share samples: pick disjoint groups")
    sums = {}
    for rows, x in iter_sample_vectors(s, site, stream, layer):
        for key, m in (("a", ma), ("b", mb)):
            sums[key] = sums.get(key, 0) + x[m[rows]].sum(0)
    return sums["a"] / ma.sum() - sums["b"] / mb.sum()


def store_mean(store: str | Path | Store, hook: str) -> np.ndarray:
    """The stream's mean vector over every sample (and token, denoising step) of a store: for ``mean``."""
    s = store if isinstance(store, Store) else open_store(store)
    site, layer, stream = store_hook(s, hook)
    total, count = 0.0, 0
    for _, x in iter_sample_vectors(s, site, stream, layer):
        total, count = total + x.sum(0), count + len(x)
    return total / count
