"""``verify --repair``: re-extract the samples of a store's bad chunks with the run the store records.

It needs the run's data and model at hand.  Nothing in the store changes until all of it is: the run recorded in
the store's ``run_spec`` attribute (``RunSpec.from_store``) is made first (dataset opened, model loaded), the data
must give exactly the store's samples (open loop: every stored sample's identity, the ones after the bad chunk and
the count included) and the run must record the same spec; only then is the store rolled back to the first bad
chunk (under the store's lock) and the run resumed (``toolkit.run.api.write_run``), so every sample from there on
is extracted again, bit-identical to an uninterrupted run.  Anything missing is one line, with the store unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.run.api import write_run
from toolkit.run.pipeline import Run, make_run
from toolkit.run.samples import check_samples, stored_identities
from toolkit.run.spec import IMPORT, RunSpec
from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.sdk.plugins import get_dataset
from toolkit.store.layout import jsonable, write_consolidated
from toolkit.store.reader import Store

UNCHANGED = "the store is unchanged"


def repair(store: str | Path, report: dict[str, Any], trust_remote_code: bool = False, progress: bool = False) -> int:
    """Re-extract from the first bad chunk on (``report``: ``toolkit.store.verify.verify``'s); the first
    re-extracted sample."""
    s = Store(store, warn_incomplete=False)
    what = f"cannot repair {s.path}"
    stored = s.attrs.get("run_spec")
    if not stored:
        raise ToolkitError(f"{s.path} records no run spec (made by an older toolkit): re-extract it with --overwrite")
    if stored.get("interventions"):
        raise ToolkitError(f"{s.path} was made with interventions, which the store cannot replay: re-run that "
                           "extraction with --overwrite")
    meta = [b for b in report["bad"] if b.get("kind") == "metadata"]
    if meta:
        raise ToolkitError(f"{what}: {meta[0]['chunk']} {meta[0]['problem']}; repair re-extracts chunks, not "
                           f"metadata: re-extract the store with --overwrite ({UNCHANGED})")
    static = [b["chunk"] for b in report["bad"] if b["samples"] is None]
    if static:
        raise ToolkitError(f"{s.path}: chunk {static[0]} is a fixed coordinate written at creation; re-extract the "
                           "store with --overwrite")
    spec = RunSpec.from_store(stored)
    if spec.command != IMPORT:
        spec = RunSpec.build(spec, trust_remote_code=trust_remote_code)
    if getattr(get_dataset(spec.dataset), "closed_loop", False):
        raise ToolkitError(f"{what}: its samples come from a closed-loop simulator run (dataset {spec.dataset!r}), "
                           "which cannot be checked against the data without running the simulator again; "
                           f"re-extract it with --overwrite ({UNCHANGED})")
    start = min(b["samples"][0] for b in report["bad"])
    chunk = int(s.attrs["chunk_samples"])
    start -= start % chunk
    n, complete = s.n_samples, s.complete

    run = _prepare(spec, what)  # the data opened and the model loaded, or one line
    _check_run(run, s, stored, n, complete, what)

    lock = s.loc.lock()
    lock.acquire()
    try:
        attrs = json.loads(s.loc.get("zarr.json") or b"{}").get("attributes", {})
        if int(attrs.get("n_samples", -1)) != n or bool(attrs.get("complete")) != complete:
            raise ToolkitError(f"{what}: it changed while being checked (now {attrs.get('n_samples')} samples); "
                               "run `toolkit verify --repair` again")
        write_consolidated(s.path, start, False)  # roll back: the resume below truncates and redoes the rest
    finally:
        lock.release()
    write_run(run, s.path, resume=True, progress=progress)
    return start


def _prepare(spec: RunSpec, what: str) -> Run:
    """The store's run made ready (dataset opened, model built or loaded) before anything in the store changes."""
    try:
        return make_run(spec)
    except ToolkitError as e:
        raise ToolkitError(f"{what}: its run cannot be made again: {first_line(e, 400)} ({UNCHANGED})") from None
    except Exception as e:  # a model or dataset library's own error (a checkpoint gone, a file unreadable)
        raise ToolkitError(f"{what}: its run cannot be made again: {type(e).__name__}: {first_line(e, 300)} "
                           f"({UNCHANGED})") from None


def _check_run(run: Run, s: Store, stored: dict[str, Any], n: int, complete: bool, what: str) -> None:
    """The run records the store's spec, and the data gives exactly the store's samples (all of them when the store
    is complete, at least its ``n`` otherwise), before the store is rolled back."""
    diff = RunSpec.resume_difference(stored, jsonable(run.stored_spec()))  # as the writer compares them
    if diff:
        key, old, new = diff
        raise ToolkitError(f"{what}: it was made with {key}={old!r}, the run made again from it has {key}={new!r} "
                           f"({UNCHANGED})")
    data = run.spec.data
    try:
        check_samples(stored_identities(s.root, n, skip_bad=True), iter(run.samples()), n, exact=complete,
                      what=what, data=data)
    except ToolkitError as e:
        message = first_line(e, 600)
        if not message.startswith(what):  # the data itself failed while being read
            message = f"{what}: the data cannot be read: {message}"
        raise ToolkitError(f"{message} ({UNCHANGED})") from None
