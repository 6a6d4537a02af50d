"""``verify --repair``: re-extract the samples of a store's bad chunks with the run the store records.

It needs the run's data and model at hand: it rolls the store back to the first bad chunk (under the store's lock)
and resumes the run recorded in the store's ``run_spec`` attribute (``RunSpec.from_store``), so every sample from
there on is extracted again, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.run.api import extract, import_latents
from toolkit.run.spec import IMPORT, RunSpec
from toolkit.sdk.errors import ToolkitError
from toolkit.store.layout import write_consolidated
from toolkit.store.reader import Store


def repair(store: str | Path, report: dict[str, Any], trust_remote_code: bool = False, progress: bool = False) -> int:
    """Re-extract from the first bad chunk on (``report``: ``toolkit.store.verify.verify``'s); the first
    re-extracted sample."""
    s = Store(store, warn_incomplete=False)
    stored = s.attrs.get("run_spec")
    if not stored:
        raise ToolkitError(f"{s.path} records no run spec (made by an older toolkit): re-extract it with --overwrite")
    if stored.get("interventions"):
        raise ToolkitError(f"{s.path} was made with interventions, which the store cannot replay: re-run that "
                           "extraction with --overwrite")
    static = [b["chunk"] for b in report["bad"] if b["samples"] is None]
    if static:
        raise ToolkitError(f"{s.path}: chunk {static[0]} is a fixed coordinate written at creation; re-extract the "
                           "store with --overwrite")
    spec = RunSpec.from_store(stored)
    start = min(b["samples"][0] for b in report["bad"])
    chunk = int(s.attrs["chunk_samples"])
    start -= start % chunk
    lock = s.loc.lock()
    lock.acquire()
    try:
        write_consolidated(s.path, start, False)  # roll back: the resume below truncates and redoes the rest
    finally:
        lock.release()
    if spec.command == IMPORT:
        import_latents(spec, s.path, resume=True, progress=progress)
    else:
        extract(RunSpec.build(spec, trust_remote_code=trust_remote_code), s.path, resume=True, progress=progress)
    return start
