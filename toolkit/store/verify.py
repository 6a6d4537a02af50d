"""Check every committed chunk of a store.

``verify`` reads each chunk inside the committed range of every array through
``toolkit.store.chunks.read_chunk`` (the reader everything else uses), so it finds exactly what would make
``probe``, ``stats`` or ``export`` fail: missing chunks, truncated ones, flipped bytes (crc32c mismatch) and
chunks that do not decode.

Repairing needs the run's data and model at hand, so it lives with the runs: ``toolkit.run.repair``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from toolkit.store.chunks import CorruptStoreError, read_chunk
from toolkit.store.layout import SAMPLE
from toolkit.store.reader import Store


def _arrays(group, prefix: str = "") -> list[tuple[str, Any]]:
    out = [(f"{prefix}{n}", a) for n, a in group.arrays()]
    for n, sub in group.groups():
        out += _arrays(sub, f"{prefix}{n}/")
    return out


def _has_checksum(arr) -> bool:
    return any(c.__class__.__name__ == "Crc32cCodec" for c in arr.metadata.codecs)


def verify(store: str | Path) -> dict[str, Any]:
    """Read every committed chunk; a report with the bad ones (``bad``: key, samples, problem)."""
    s = Store(store, warn_incomplete=False)
    bad: list[dict[str, Any]] = []
    n_chunks = 0
    unchecked = []
    arrays = sorted(_arrays(s.root), key=lambda x: x[0])
    for name, arr in arrays:
        if not _has_checksum(arr):
            unchecked.append(name)
        grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
        for coords in itertools.product(*grid):
            n_chunks += 1
            try:
                read_chunk(arr, coords)
            except CorruptStoreError as e:
                sample_axis = (arr.metadata.dimension_names or [None])[0] == SAMPLE
                bad.append({"array": name, "chunk": e.key, "problem": e.reason,
                            "samples": list(e.samples) if sample_axis else None})
    return {"path": str(s.path), "n_samples": s.n_samples, "complete": s.complete, "arrays": len(arrays),
            "chunks": n_chunks, "bad": bad, "without_checksum": unchecked}


def summary_line(report: dict[str, Any]) -> str:
    bad = report["bad"]
    where = f"{report['n_samples']} samples committed" + ("" if report["complete"] else " (incomplete)")
    if not bad:
        note = (f"; {len(report['without_checksum'])} arrays have no checksums (older store): only decoding was "
                "checked") if report["without_checksum"] else ", all checksums match"
        return f"ok: {report['chunks']} chunks in {report['arrays']} arrays, {where}{note}"
    samples = sorted({tuple(b["samples"]) for b in bad if b["samples"] is not None})
    ranges = ", ".join(f"{a}-{b}" for a, b in samples[:5]) + (" ..." if len(samples) > 5 else "")
    return (f"error: {len(bad)} of {report['chunks']} chunks are bad ({where}; samples {ranges or '-'}); "
            f"`toolkit verify --repair {report['path']}` re-extracts from the first bad chunk on, or re-extract "
            "with --overwrite")

