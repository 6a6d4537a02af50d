"""What a probe reads: the site, layers, denoising steps, tokens, and which samples (steps, tasks, episodes).

A selection is resolved against the store once, up front, so every unknown name fails with one line that
lists what exists, before any activation is read.  Rows are then grouped into *cells*: one cell is one
(layer, denoising step, rollout-step bucket) and gets its own probe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import IndexSpec, format_indices, store_layers, store_site_stream
from toolkit.store.reader import Store


def plain(v: np.ndarray) -> np.ndarray:
    """zarr hands strings back as numpy's variable-width StringDType; make them ordinary unicode arrays."""
    return v.astype(object).astype(str) if v.dtype.kind == "T" else v


POOLS = ("mean", "last", "first", "none")


@dataclass
class Selection:
    """A user's request, unresolved: every field accepts the CLI's string syntax (None = everything)."""

    site: str = "vlm"
    stream: str | None = None  # default: resid_post if present, else the site's first stream
    layers: str | None = None  # model layer indices: 'all', '10', '0-5,17'
    steps: str | None = None  # rollout steps kept: '20', '0-99'
    step_buckets: str | None = None  # one probe per bucket: '0-49,50-99' or a width such as '50'
    denoise: str | None = None  # action expert denoising step indices
    t: str | None = None  # or flow-matching t values, e.g. '0.9' or '1.0,0.5'
    tokens: str | None = None  # positions into the stored token axis ('all', '0-3', '-1')
    pool: str = "mean"  # how kept tokens become one vector: mean | last | first | none (concatenate)
    task_range: tuple[int, int] | None = None  # task_id in [a, b)
    episode_range: tuple[int, int] | None = None  # each task's episodes a..b-1 (ordinal within the task)


@dataclass
class Resolved:
    """A selection resolved against a store: positions to read and the rows that take part."""

    site: str
    stream: str
    expert: str
    layers: list[int]  # model layer indices
    layer_pos: list[int]  # their positions along the array's layer axis
    denoise_pos: list[int] | None  # None when the site has no denoise axis
    t_values: list[float | None]
    token_pos: list[int]
    tokens_label: str
    pool: str
    rows: np.ndarray  # sample indices kept (sorted)
    bucket: np.ndarray  # per kept row: bucket index
    bucket_labels: list[str]
    n_features: int
    stored_dtype: str | None = None
    extra: dict = field(default_factory=dict)


def episode_ordinal_in_task(episode: np.ndarray, task: np.ndarray) -> np.ndarray:
    """Per sample: the ordinal of its episode among its task's episodes (the seed's --episode_range unit)."""
    out = np.zeros(len(episode), dtype=np.int64)
    for t in np.unique(task):
        m = task == t
        eps = np.unique(episode[m])
        out[m] = np.searchsorted(eps, episode[m])
    return out


def resolve(store: Store, sel: Selection) -> Resolved:
    """Check every part of ``sel`` against the store and compute what to read (grammar: ``toolkit.sdk.names``)."""
    site, stream = store_site_stream(store, sel.site, sel.stream)
    arr = store.array(site, stream)
    dims = tuple(arr.metadata.dimension_names)
    layers = store_layers(store, site, sel.layers)
    layer_pos = [store.layers(site).index(v) for v in layers]

    denoise_pos, t_values = None, [None]
    if "denoise" in dims:
        n_den = arr.shape[dims.index("denoise")]
        t_all = [float(v) for v in store.static(f"{site}/t")] if f"{site}/t" in store.root else [None] * n_den
        if sel.t is not None and sel.denoise is not None:
            raise ToolkitError("give either --denoise (step index) or --action-timestep (t value), not both")
        if sel.t is not None:
            denoise_pos = []
            for tok in str(sel.t).split(","):
                want = float(tok)
                hits = [i for i, v in enumerate(t_all) if v is not None and abs(v - want) < 1e-3]
                if not hits:
                    raise ToolkitError(f"site {site!r} has no denoising step at t={want:g}; t values: "
                                       + ", ".join(f"{v:g}" for v in t_all if v is not None))
                denoise_pos.append(hits[0])
        else:
            denoise_pos = IndexSpec.parse(sel.denoise, "denoising step").resolve(n_den, where=f"at site {site!r}")
        t_values = [t_all[i] for i in denoise_pos]
    elif sel.t is not None or sel.denoise is not None:
        with_axis = ", ".join(s for s in store.sites if _has_denoise(store, s)) or "none"
        raise ToolkitError(f"site {site!r} has no denoising axis; --action-timestep/--denoise apply to the "
                           f"action expert (sites with one: {with_axis})")

    tok_coord = [int(v) for v in store.static(f"{site}/token")] if f"{site}/token" in store.root else \
        list(range(arr.shape[dims.index("token")]))
    n_tok = arr.shape[dims.index("token")]
    if sel.pool not in POOLS:
        raise ToolkitError(f"unknown pooling {sel.pool!r}: use one of {', '.join(POOLS)}")
    token_pos = IndexSpec.parse(sel.tokens, "token position").resolve(
        n_tok, where=f"(site {site!r} stores {n_tok}, model positions {format_indices(tok_coord)})")
    n_feat = arr.shape[-1] * (len(token_pos) if sel.pool == "none" else 1)
    tokens_label = "pooled" if tok_coord == [-1] else format_indices([tok_coord[i] for i in token_pos])

    rows, bucket, labels = _rows(store, sel)
    group_attrs = dict(store.root[site].attrs)
    return Resolved(site, stream, group_attrs.get("expert", site), layers, layer_pos, denoise_pos, t_values,
                    token_pos, tokens_label, sel.pool, rows, bucket, labels, n_feat, arr.attrs.get("stored_dtype"))


def _has_denoise(store: Store, site: str) -> bool:
    return any("denoise" in store.dims(site, s) for s in store.streams(site))


def _rows(store: Store, sel: Selection) -> tuple[np.ndarray, np.ndarray, list[str]]:
    n = store.n_samples
    if n == 0:
        raise ToolkitError(f"{store.path} holds no samples")
    step = store.coord("step").astype(np.int64)
    keep = np.ones(n, dtype=bool)
    if sel.task_range is not None:
        a, b = sel.task_range
        tid = store.coord("task_id").astype(np.int64)
        keep &= (tid >= a) & (tid < b)
        if not keep.any():
            raise ToolkitError(f"--task-range {a} {b} selects no sample; task ids in the store: "
                               f"{format_indices(np.unique(tid))}")
    if sel.episode_range is not None:
        a, b = sel.episode_range
        ordinal = episode_ordinal_in_task(store.coord("episode"), plain(store.coord("task")))
        keep &= (ordinal >= a) & (ordinal < b)
        if not keep.any():
            raise ToolkitError(f"--episode-range {a} {b} selects no sample; tasks hold up to "
                               f"{int(ordinal.max()) + 1} episodes")
    if sel.steps is not None:
        m = np.zeros(n, dtype=bool)
        m[keep] = IndexSpec.parse(sel.steps, "rollout step").mask(step[keep])
        keep &= m
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise ToolkitError("the selection is empty: no sample matches the task/episode/step filters")
    s = step[rows]
    if sel.step_buckets is None:
        return rows, np.zeros(len(rows), dtype=np.int64), ["all" if sel.steps is None else str(sel.steps)]
    spec = str(sel.step_buckets).strip()
    if re.fullmatch(r"\d+", spec):
        width = int(spec)
        if width < 1:
            raise ToolkitError("--step-buckets width must be at least 1")
        ranges = [(lo, lo + width - 1) for lo in range(int(s.min()) // width * width, int(s.max()) + 1, width)]
    else:
        items = IndexSpec.parse(spec, "step bucket").items or ()
        ranges = [IndexSpec(str(item), (item,), "step bucket") for item in items]
    bucket = np.full(len(rows), -1, dtype=np.int64)
    labels = []
    for r in ranges:
        if isinstance(r, tuple):
            lo, hi = r
            m = (s >= lo) & (s <= hi)
            label = f"{lo}-{hi}" if lo != hi else str(lo)
        else:
            m, label = r.mask(s), r.text
        m &= bucket < 0
        bucket[m] = len(labels)
        labels.append(label)
    keepb = bucket >= 0
    if not keepb.any():
        raise ToolkitError(f"no selected sample falls in --step-buckets {spec}; steps present: "
                           f"{format_indices(np.unique(s)[:50])}")
    return rows[keepb], bucket[keepb], labels
