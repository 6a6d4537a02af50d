"""Check every committed chunk of a store, and re-extract the samples of bad ones.

``verify`` reads each chunk inside the committed range of every array through ``store.read_chunk`` (the
reader everything else uses), so it finds exactly what would make ``probe``, ``stats`` or ``export`` fail:
missing chunks, truncated ones, flipped bytes (crc32c mismatch) and chunks that do not decode.

``repair`` needs the run's data and model at hand: it rolls the store back to the first bad chunk (under the
store's lock) and resumes the run recorded in the store's ``run_spec`` attribute, so every sample from there
on is extracted again, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from toolkit.sdk.errors import ToolkitError
from toolkit.store.core import SAMPLE, CorruptStoreError, Store, read_chunk, write_consolidated


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


def repair(store: str | Path, report: dict[str, Any], trust_remote_code: bool = False, progress: bool = False) -> int:
    """Re-extract from the first bad chunk on with the store's recorded run; the first re-extracted sample."""
    s = Store(store, warn_incomplete=False)
    spec = s.attrs.get("run_spec")
    if not spec:
        raise ToolkitError(f"{s.path} records no run spec (made by an older toolkit): re-extract it with --overwrite")
    if spec.get("interventions"):
        raise ToolkitError(f"{s.path} was made with interventions, which the store cannot replay: re-run that "
                           "extraction with --overwrite")
    static = [b["chunk"] for b in report["bad"] if b["samples"] is None]
    if static:
        raise ToolkitError(f"{s.path}: chunk {static[0]} is a fixed coordinate written at creation; re-extract the "
                           "store with --overwrite")
    start = min(b["samples"][0] for b in report["bad"])
    chunk = int(s.attrs["chunk_samples"])
    start -= start % chunk
    lock = s.loc.lock()
    lock.acquire()
    try:
        write_consolidated(s.path, start, False)  # roll back: the resume below truncates and redoes the rest
    finally:
        lock.release()
    kwargs = _call_arguments(spec)
    if spec.get("command") == "import":
        from toolkit.run.pipeline import import_latents

        import_latents(store=s.path, resume=True, progress=progress, **kwargs)
    else:
        from toolkit.run.pipeline import extract

        extract(store=s.path, resume=True, progress=progress, trust_remote_code=trust_remote_code, **kwargs)
    return start


def _call_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """extract()/import_latents() keywords that reproduce a recorded run spec."""
    sel = spec.get("selection") or {}
    drop = ("selection", "command", "interventions") + (("model",) if spec.get("command") == "import" else ())
    out = {k: v for k, v in spec.items() if k not in drop}
    out.update(sites=list(sel),
               layers=[f"{site}={','.join(map(str, c['layers']))}" for site, c in sel.items()],
               tokens=[f"{site}={c['tokens']}" for site, c in sel.items()],
               pool=[f"{site}={c['pool']}" for site, c in sel.items()],
               streams=[f"{site}={','.join(c['streams'])}" for site, c in sel.items()])
    return out


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

