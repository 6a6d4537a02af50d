"""What a probe reads: the site, layers, denoising steps, tokens, and which samples (steps, tasks, episodes).

A selection is resolved against the store once, up front, so every unknown name fails with one line that
lists what exists, before any activation is read.  Rows are then grouped into *cells*: one cell is one
(layer, denoising step, rollout-step bucket) and gets its own probe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.store import Store


def plain(v: np.ndarray) -> np.ndarray:
    """zarr hands strings back as numpy's variable-width StringDType; make them ordinary unicode arrays."""
    return v.astype(object).astype(str) if v.dtype.kind == "T" else v


POOLS = ("mean", "last", "first", "none")
_RANGE = re.compile(r"^(-?\d+)-(-?\d*)$")


def parse_int_spec(spec: str | None, what: str) -> list[tuple[int, int | None]] | None:
    """'all' | '5' | '0,5,17' | '0-5' | '50-' -> inclusive (lo, hi) ranges (hi None = open end)."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    out: list[tuple[int, int | None]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if re.fullmatch(r"-?\d+", part):
            out.append((int(part), int(part)))
        elif m := _RANGE.match(part):
            hi = int(m.group(2)) if m.group(2) else None
            if hi is not None and hi < int(m.group(1)):
                raise ToolkitError(f"{what} range {part!r} is empty: write the lower bound first")
            out.append((int(m.group(1)), hi))
        else:
            raise ToolkitError(f"malformed {what} selection {spec!r}: use all, 5, 0,5,17, 0-5 or 50-")
    return out


def _in_ranges(values: np.ndarray, ranges) -> np.ndarray:
    keep = np.zeros(len(values), dtype=bool)
    for lo, hi in ranges:
        keep |= (values >= lo) & (values <= (np.iinfo(np.int64).max if hi is None else hi))
    return keep


def _fmt(values) -> str:
    values = [int(v) for v in values]
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


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
    """Check every part of ``sel`` against the store and compute what to read."""
    if sel.site not in store.sites:
        raise ToolkitError(f"store has no site {sel.site!r}; sites: {', '.join(store.sites) or 'none'}")
    streams = store.streams(sel.site)
    stream = sel.stream or ("resid_post" if "resid_post" in streams else streams[0])
    if stream not in streams:
        raise ToolkitError(f"site {sel.site!r} has no stream {stream!r}; streams: {', '.join(streams)}")
    arr = store.array(sel.site, stream)
    dims = tuple(arr.metadata.dimension_names)
    site_layers = store.layers(sel.site)
    layer_ranges = parse_int_spec(sel.layers, "layer")
    if layer_ranges is None:
        layers = site_layers
    else:
        layers = []
        for lo, hi in layer_ranges:
            want = [lo] if lo == hi else [v for v in site_layers if lo <= v <= (10**9 if hi is None else hi)]
            if not want or any(v not in site_layers for v in want):
                asked = str(lo) if lo == hi else f"{lo}-{'' if hi is None else hi}"
                raise ToolkitError(f"site {sel.site!r} holds layers {_fmt(site_layers)}, not {asked}")
            layers += [v for v in want if v not in layers]
    layer_pos = [site_layers.index(v) for v in layers]

    denoise_pos, t_values = None, [None]
    if "denoise" in dims:
        n_den = arr.shape[dims.index("denoise")]
        t_all = [float(v) for v in store.static(f"{sel.site}/t")] if f"{sel.site}/t" in store.root else [None] * n_den
        if sel.t is not None and sel.denoise is not None:
            raise ToolkitError("give either --denoise (step index) or --action-timestep (t value), not both")
        if sel.t is not None:
            denoise_pos = []
            for tok in str(sel.t).split(","):
                want = float(tok)
                hits = [i for i, v in enumerate(t_all) if v is not None and abs(v - want) < 1e-3]
                if not hits:
                    raise ToolkitError(f"site {sel.site!r} has no denoising step at t={want:g}; t values: "
                                       + ", ".join(f"{v:g}" for v in t_all if v is not None))
                denoise_pos.append(hits[0])
        else:
            ranges = parse_int_spec(sel.denoise, "denoise step")
            denoise_pos = list(range(n_den)) if ranges is None else [
                i for i in range(n_den) if _in_ranges(np.array([i]), ranges)[0]]
            if ranges is not None and (not denoise_pos or any(
                    lo >= n_den or lo < 0 for lo, _ in ranges)):
                raise ToolkitError(f"site {sel.site!r} has denoising steps 0-{n_den - 1}, not {sel.denoise}")
        t_values = [t_all[i] for i in denoise_pos]
    elif sel.t is not None or sel.denoise is not None:
        with_axis = ", ".join(s for s in store.sites if _has_denoise(store, s)) or "none"
        raise ToolkitError(f"site {sel.site!r} has no denoising axis; --action-timestep/--denoise apply to the "
                           f"action expert (sites with one: {with_axis})")

    tok_coord = [int(v) for v in store.static(f"{sel.site}/token")] if f"{sel.site}/token" in store.root else \
        list(range(arr.shape[dims.index("token")]))
    n_tok = arr.shape[dims.index("token")]
    if sel.pool not in POOLS:
        raise ToolkitError(f"unknown pooling {sel.pool!r}: use one of {', '.join(POOLS)}")
    tranges = parse_int_spec(sel.tokens, "token")
    if tranges is None:
        token_pos = list(range(n_tok))
    else:
        token_pos = []
        for lo, hi in tranges:
            for i in range(lo, (hi if hi is not None else n_tok - 1) + 1):
                j = i + n_tok if i < 0 else i
                if not 0 <= j < n_tok:
                    raise ToolkitError(f"site {sel.site!r} stores {n_tok} token position(s) (model positions "
                                       f"{_fmt(tok_coord)}); token index {i} is out of range")
                token_pos.append(j)
    n_feat = arr.shape[-1] * (len(token_pos) if sel.pool == "none" else 1)
    tokens_label = "pooled" if tok_coord == [-1] else _fmt([tok_coord[i] for i in token_pos])

    rows, bucket, labels = _rows(store, sel)
    group_attrs = dict(store.root[sel.site].attrs)
    return Resolved(sel.site, stream, group_attrs.get("expert", sel.site), layers, layer_pos, denoise_pos, t_values,
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
                               f"{_fmt(np.unique(tid))}")
    if sel.episode_range is not None:
        a, b = sel.episode_range
        ordinal = episode_ordinal_in_task(store.coord("episode"), plain(store.coord("task")))
        keep &= (ordinal >= a) & (ordinal < b)
        if not keep.any():
            raise ToolkitError(f"--episode-range {a} {b} selects no sample; tasks hold up to "
                               f"{int(ordinal.max()) + 1} episodes")
    if sel.steps is not None:
        ranges = parse_int_spec(sel.steps, "rollout step")
        m = _in_ranges(step, ranges)
        if not (keep & m).any():
            have = np.unique(step[keep])
            raise ToolkitError(f"rollout step(s) {sel.steps} not in the selection; steps present: {_fmt(have[:50])}"
                               + (" ..." if len(have) > 50 else ""))
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
        ranges = parse_int_spec(spec, "step bucket") or []
    bucket = np.full(len(rows), -1, dtype=np.int64)
    labels = []
    for k, (lo, hi) in enumerate(ranges):
        m = _in_ranges(s, [(lo, hi)]) & (bucket < 0)
        bucket[m] = len(labels)
        labels.append(f"{lo}-{'' if hi is None else hi}" if lo != hi else str(lo))
    keepb = bucket >= 0
    if not keepb.any():
        raise ToolkitError(f"no selected sample falls in --step-buckets {spec}; steps present: "
                           f"{_fmt(np.unique(s)[:50])}")
    return rows[keepb], bucket[keepb], labels
