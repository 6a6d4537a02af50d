"""Check a store: its metadata and every committed chunk.

``verify`` reads each chunk inside the committed range of every array through ``toolkit.store.chunks.read_chunk``
(the reader everything else uses), so it finds exactly what would make ``probe``, ``stats`` or ``export`` fail:
missing chunks, truncated ones, flipped bytes (crc32c mismatch), chunks that do not decode, and anything else that
raises while an array is read.  It also checks every node's own ``zarr.json`` against the consolidated metadata of
the root (the commit point): present, parseable, the same node, and for sample-axis arrays at least the committed
number of samples long (a reader that skips the consolidated metadata, e.g. zarr with ``use_consolidated=False``,
would otherwise see fewer samples).  ``quick=True`` checks the metadata and that every committed chunk exists with
a plausible size, without reading, decoding or checksumming any chunk.

Repairing needs the run's data and model at hand, so it lives with the runs: ``toolkit.run.repair``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.store.chunks import CorruptStoreError, chunk_key, chunk_plan, read_chunk
from toolkit.store.layout import SAMPLE
from toolkit.store.reader import Store

QUICK_NOTE = "chunk contents were not read, decoded or checksummed (run without --quick for that)"


def _arrays(group, prefix: str = "") -> list[tuple[str, Any]]:
    out = [(f"{prefix}{n}", a) for n, a in group.arrays()]
    for n, sub in group.groups():
        out += _arrays(sub, f"{prefix}{n}/")
    return out


def _has_checksum(arr) -> bool:
    return any(c.__class__.__name__ == "Crc32cCodec" for c in arr.metadata.codecs)


def _open(store: str | Path) -> Store:
    try:
        return Store(store, warn_incomplete=False)
    except ToolkitError:
        raise
    except Exception as e:  # e.g. a root zarr.json that is not JSON
        raise ToolkitError(f"cannot open {store} as a store: {type(e).__name__}: {first_line(e)}; it cannot be "
                           "verified (re-extract it with --overwrite)") from None


def _metadata_problem(name: str, problem: str) -> dict[str, Any]:
    return {"kind": "metadata", "array": name, "chunk": f"{name}/zarr.json" if name else "zarr.json",
            "problem": problem, "samples": None}


def check_metadata(s: Store) -> list[dict[str, Any]]:
    """Every node the root's consolidated metadata lists against its own ``zarr.json``: one bad entry per node
    whose own file is missing, unparseable, of another node type or otherwise different, or (a sample-axis array)
    shorter than the committed ``n_samples``."""
    raw = s.loc.get("zarr.json")
    try:
        nodes = json.loads(raw or b"{}").get("consolidated_metadata", {}).get("metadata", {})
    except (ValueError, AttributeError) as e:
        return [_metadata_problem("", f"is unparseable ({first_line(e)})")]
    if not isinstance(nodes, dict) or not nodes:
        return [_metadata_problem("", "holds no consolidated metadata (not a committed toolkit store)")]
    bad = []
    for key in sorted(nodes):
        meta = nodes[key]
        own_raw = s.loc.get(f"{key}/zarr.json")
        if own_raw is None:
            bad.append(_metadata_problem(key, "is missing"))
            continue
        try:
            own = json.loads(own_raw)
            if not isinstance(own, dict):
                raise ValueError(f"a JSON {type(own).__name__}, not an object")
        except ValueError as e:
            bad.append(_metadata_problem(key, f"is unparseable ({first_line(e)})"))
            continue
        if own.get("node_type") != meta.get("node_type"):
            bad.append(_metadata_problem(key, f"is a {own.get('node_type')}, the consolidated metadata says "
                                              f"{meta.get('node_type')}"))
            continue
        if meta.get("node_type") == "group":
            a = {k: v for k, v in own.items() if k != "consolidated_metadata"}
            b = {k: v for k, v in meta.items() if k != "consolidated_metadata"}
            if a != b:
                bad.append(_metadata_problem(key, f"disagrees with the consolidated metadata ({_first_key(a, b)})"))
            continue
        shape, committed_shape = list(own.get("shape") or []), list(meta.get("shape") or [])
        sample_axis = (meta.get("dimension_names") or [None])[0] == SAMPLE
        if sample_axis and shape and shape[0] < s.n_samples:
            bad.append(_metadata_problem(key, f"gives {shape[0]} samples along sample, fewer than the {s.n_samples} "
                                              "committed (a reader that skips the consolidated metadata sees "
                                              "fewer)"))
            continue
        if sample_axis:
            shape, committed_shape = shape[1:], committed_shape[1:]
        a = {k: v for k, v in own.items() if k != "shape"}
        b = {k: v for k, v in meta.items() if k != "shape"}
        if shape != committed_shape or a != b:
            what = "shape" if shape != committed_shape else _first_key(a, b)
            bad.append(_metadata_problem(key, f"disagrees with the consolidated metadata ({what})"))
    return bad


def _first_key(a: dict, b: dict) -> str:
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")


def _chunk_size(s: Store, plan, key: str) -> int | None:
    """The stored size of one chunk in bytes, None when it is missing."""
    if plan.root is not None:
        try:
            return os.stat(os.path.join(plan.root, key)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        return int(s.loc.fs.info(s.loc.key(key))["size"])
    except FileNotFoundError:
        return None


def _present(s: Store, arr, coords: tuple[int, ...]) -> str | None:
    """Quick check of one chunk: what is wrong with its presence or size (None: nothing seen)."""
    plan = chunk_plan(arr)
    key = chunk_key(arr, coords)
    size = _chunk_size(s, plan, key)
    if size is None:
        return "missing"
    if plan.codecs == ["crc32c"]:  # uncompressed: its size is known exactly
        want = int(np.prod(plan.chunks)) * plan.dtype.itemsize + 4
        if size != want:
            return f"the wrong size ({size} bytes, expected {want})"
    elif plan.codecs is not None and size <= 4:
        return f"too short ({size} bytes: no more than its checksum)"
    elif size == 0:
        return "empty (0 bytes)"
    return None


def verify(store: str | Path, quick: bool = False) -> dict[str, Any]:
    """Check the metadata and read every committed chunk (``quick``: only that each exists with a plausible size);
    a report with the bad ones (``bad``: kind, array, chunk (key), samples, problem)."""
    s = _open(store)
    bad: list[dict[str, Any]] = check_metadata(s)
    n_chunks = 0
    unchecked = []
    try:
        arrays = sorted(_arrays(s.root), key=lambda x: x[0])
    except Exception as e:
        raise ToolkitError(f"cannot list the arrays of {s.path}: {type(e).__name__}: {first_line(e)}; it cannot be "
                           "verified (re-extract it with --overwrite)") from None
    for name, arr in arrays:
        sample_axis = (arr.metadata.dimension_names or [None])[0] == SAMPLE
        if not _has_checksum(arr):
            unchecked.append(name)
        grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
        for coords in itertools.product(*grid):
            n_chunks += 1
            samples = None
            if sample_axis:
                first = coords[0] * arr.chunks[0]
                samples = [first, min(first + arr.chunks[0], arr.shape[0]) - 1]
            try:
                problem = _present(s, arr, coords) if quick else None
                if not quick:
                    read_chunk(arr, coords)
            except CorruptStoreError as e:
                problem = e.reason
            except Exception as e:  # anything else that stops a read is as bad
                problem = f"unreadable ({type(e).__name__}: {first_line(e)})"
            if problem:
                bad.append({"kind": "chunk", "array": name, "chunk": _key(arr, coords), "problem": problem,
                            "samples": samples})
    return {"path": str(s.path), "n_samples": s.n_samples, "complete": s.complete, "arrays": len(arrays),
            "chunks": n_chunks, "quick": quick, "bad": bad, "without_checksum": unchecked}


def _key(arr, coords) -> str:
    try:
        return chunk_key(arr, coords)
    except Exception:
        return f"{arr.store_path.path}/c/{'/'.join(map(str, coords))}"


def summary_line(report: dict[str, Any]) -> str:
    bad = report["bad"]
    quick = report.get("quick")
    where = f"{report['n_samples']} samples committed" + ("" if report["complete"] else " (incomplete)")
    if not bad:
        if quick:
            return (f"ok (quick check): metadata consistent, {report['chunks']} chunks in {report['arrays']} arrays "
                    f"present with plausible sizes, {where}; {QUICK_NOTE}")
        note = (f"; {len(report['without_checksum'])} arrays have no checksums (older store): only decoding was "
                "checked") if report["without_checksum"] else ", all checksums match"
        return f"ok: {report['chunks']} chunks in {report['arrays']} arrays, {where}{note}"
    chunks = [b for b in bad if b.get("kind", "chunk") == "chunk"]
    meta = [b for b in bad if b.get("kind") == "metadata"]
    parts = []
    if chunks:
        parts.append(f"{len(chunks)} of {report['chunks']} chunks are bad")
    if meta:
        parts.append(f"{len(meta)} metadata file{'s are' if len(meta) > 1 else ' is'} bad")
    samples = sorted({tuple(b["samples"]) for b in chunks if b["samples"] is not None})
    ranges = ", ".join(f"{a}-{b}" for a, b in samples[:5]) + (" ..." if len(samples) > 5 else "")
    kind = "quick check, " if quick else ""
    fix = ("`toolkit verify --repair " + report["path"] + "` re-extracts from the first bad chunk on, or re-extract "
           "with --overwrite") if chunks and not meta else "re-extract with --overwrite"
    return f"error: {' and '.join(parts)} ({kind}{where}; samples {ranges or '-'}); {fix}"
