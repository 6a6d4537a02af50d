"""The store's layout on disk: its format marker, the sample axis, array specs and chunk sizes, and the commit
point (the root ``zarr.json`` with consolidated metadata cut to the committed samples)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import location

FORMAT = "toolkit-activations"


FORMAT_VERSION = 2  # 2: crc32c per chunk, consolidated metadata written at each commit


CHUNK_TARGET_BYTES = 4 * 2**20


MAX_CHUNK_SAMPLES = 256


SAMPLE = "sample"


@dataclass
class ArraySpec:
    """One sample-axis array: its per-sample shape, dtype and dimension names (after ``sample``)."""

    name: str  # path inside the store, e.g. "vlm/resid_post" or "episode"
    shape: tuple[int, ...]
    dtype: str  # numpy dtype as stored
    dims: tuple[str, ...]
    stored_dtype: str | None = None  # "bfloat16" when dtype is its uint16 bit pattern
    attrs: dict[str, Any] = field(default_factory=dict)
    chunk_inner: tuple[int, ...] | None = None  # chunk of the per-sample dims (default: whole)
    codec: str | None = None  # this array's own --codec (e.g. camera frames: always zstd); None: the store's

    def per_sample_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def choose_chunk_samples(specs: list[ArraySpec], multiple_of: int = 1, expected: int | None = None) -> int:
    """Samples per chunk: ~4 MiB for the largest per-layer slice, capped, a multiple of the batch size; no more
    than ``expected`` (the run's sample count or an upper bound of it) rounded up to the batch size, so a run
    smaller than one chunk stores its samples, not a chunk padded to full size (zarr pads edge chunks, and
    ``--codec none`` cannot shrink the padding)."""
    largest = 1
    for s in specs:
        inner = s.chunk_inner or s.shape
        largest = max(largest, int(np.prod(inner, dtype=np.int64)) * np.dtype(s.dtype).itemsize)
    n = max(1, min(MAX_CHUNK_SAMPLES, CHUNK_TARGET_BYTES // largest))
    if expected:
        n = min(n, -(-int(expected) // multiple_of) * multiple_of)
    return max(multiple_of, (n // multiple_of) * multiple_of)


def sample_arrays(group) -> list[tuple[str, Any]]:
    out = []
    for name, arr in group.arrays():
        if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == SAMPLE:
            out.append((name, arr))
    for name, sub in group.groups():
        out += [(f"{name}/{n}", a) for n, a in sample_arrays(sub)]
    return out


def np_dtype(dtype: str):
    return object if dtype == "str" else np.dtype(dtype)


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first place where two JSON values differ: (dotted key, old, new), or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            d = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if d:
                return d
        return None
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(v, (dict, list)) for v in old + new)):  # lists of plain values are named whole
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{key}[{i}]")
            if d:
                return d
        return None
    return None if old == new else (key, old, new)


def _node_metadata(loc, prefix: str = "") -> dict[str, Any]:
    """Every node's ``zarr.json`` under a group, keyed by its path (arrays' chunk folders are not walked)."""
    out: dict[str, Any] = {}
    for name in loc.children(prefix):
        raw = loc.get(f"{prefix}{name}/zarr.json")
        if raw is None:
            continue
        key = f"{prefix}{name}"
        meta = json.loads(raw)
        if meta.get("node_type") == "group":
            meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
            out[key] = meta
            out.update(_node_metadata(loc, key + "/"))
        else:
            out[key] = meta
    return out


def write_consolidated(target: Any, n: int, complete: bool) -> None:
    """The commit point: rewrite the root ``zarr.json`` atomically with ``n_samples``/``complete`` and the
    consolidated metadata of every node, sample-axis arrays cut to ``n`` samples.  Readers that use it
    (``Store``, ``xarray.open_zarr``/``open_datatree`` by default) see exactly the committed prefix, even while
    the writer has grown the arrays for the next block.  Each site group gets its own consolidated snapshot
    first, for ``xarray.open_zarr(path, group=SITE)``.  ``target``: a store path, URL or ``Location`` (locally a
    rename makes the rewrite atomic, on an object store a single PUT does)."""
    loc = target if hasattr(target, "children") else location(target)
    nodes = _node_metadata(loc)
    for meta in nodes.values():
        if meta.get("node_type") == "array" and (meta.get("dimension_names") or [None])[0] == SAMPLE:
            meta["shape"] = [min(n, meta["shape"][0]), *meta["shape"][1:]]
    raw = loc.get("zarr.json")
    if raw is None:
        raise ToolkitError(f"{loc.url} lost its root zarr.json while being written; use --overwrite")
    root = json.loads(raw)
    for key, meta in nodes.items():
        if meta.get("node_type") == "group" and "/" not in key:
            inner = {k[len(key) + 1:]: v for k, v in nodes.items() if k.startswith(key + "/")}
            group = {**{k: v for k, v in meta.items() if k != "consolidated_metadata"},
                     "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": inner}}
            loc.put(f"{key}/zarr.json", json.dumps(group, indent=2).encode())
    root["attributes"].update(n_samples=n, complete=complete)
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": nodes}
    loc.put("zarr.json", json.dumps(root, indent=2).encode())
