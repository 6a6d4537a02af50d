"""``extract`` and ``import_latents``: a run from its ``RunSpec`` (or keyword arguments that build one), in this
process or on Ray workers (``spec.workers``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from toolkit.capture.intervention import Intervention
from toolkit.run.pipeline import Run, check_target, make_run, open_writer
from toolkit.run.spec import EXTRACT, IMPORT, RunSpec
from toolkit.sdk.adapters import ModelAdapter
from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import location, store_target

DEFAULT_STORE = Path("stores/libero.zarr")


def extract(spec: RunSpec | None = None, /, store: str | Path = DEFAULT_STORE, *, resume: bool = False,
            overwrite: bool = False, progress: bool = False, adapter: ModelAdapter | None = None,
            interventions: Sequence[Intervention] | None = None, **fields: Any) -> Path | str:
    """Run a policy over a dataset and stream the selected hidden states into ``store``.

    The run is ``spec`` (a ``RunSpec``), or built from ``fields`` (``extract(model="pi0", dataset="libero",
    layers="-1")``), or ``spec`` changed by ``fields``.  ``resume`` continues an interrupted store of the same run
    (nothing lost or duplicated); ``overwrite`` replaces an existing one.  ``adapter``: an already loaded model to
    reuse (a sweep loads it once; its checkpoint and options are then its own).  ``interventions``
    (``toolkit.capture.intervention``) change the model while it runs; the store then holds the intervened
    activations and actions and records the interventions.  With ``spec.workers`` the run is split over that many
    Ray actors (``toolkit.run.ray``); the store is identical to a one-process run's.  Returns the store's path
    (or URL)."""
    spec = RunSpec.build(spec, **fields)
    if spec.command != EXTRACT:
        spec = RunSpec.build(spec, command=EXTRACT)
    return _execute(spec, store, resume, overwrite, progress, adapter, interventions or ())


def import_latents(spec: RunSpec | None = None, /, store: str | Path = "stores/libero_latents.zarr", *,
                   resume: bool = False, overwrite: bool = False, progress: bool = False, **fields: Any) -> Path | str:
    """Store the activations a dataset already carries (e.g. LIBERO latent pickles), running no model.  The run is
    ``spec`` or built from ``fields`` as in ``extract`` (its model fields are not used)."""
    spec = RunSpec.build(spec, **{**fields, "command": IMPORT})
    return _execute(spec, store, resume, overwrite, progress, None, ())


class Written(NamedTuple):
    """What one ``execute`` did: the store's path (or URL), the samples it added (None: not counted, a Ray run) and
    whether the store was complete before (a resume of a complete store adds nothing)."""

    path: Path | str
    added: int | None
    was_complete: bool


def execute(spec: RunSpec, store: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = False, adapter: ModelAdapter | None = None,
            interventions: Sequence[Intervention] = ()) -> Written:
    """Run ``spec`` (its ``command``: extract or import) into ``store``, as ``extract``/``import_latents`` do, and
    say what was written (the CLI's last line)."""
    path = store_target(store)
    if spec.workers:
        if adapter is not None or interventions:
            raise ToolkitError("a run on Ray workers loads the model in each worker: pass the model's options, not an "
                               "adapter or interventions")
        from toolkit.run.ray import extract_on_ray

        was_complete = resume and _complete(path)  # a complete store gets nothing added (check_resume_prefix)
        return Written(extract_on_ray(spec, path, resume=resume, overwrite=overwrite, progress=progress), None,
                       was_complete)
    check_target(path, resume, overwrite)
    return write_run(make_run(spec, adapter, interventions), path, resume=resume, overwrite=overwrite,
                     progress=progress)


def write_run(run: Run, store: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = False) -> Written:
    """Write a prepared ``Run`` (its dataset open, its model loaded) into ``store``: ``toolkit verify --repair``
    makes the run first and changes the store only once it has everything the run needs."""
    path = store_target(store)
    check_target(path, resume, overwrite)
    writer = open_writer(path, run.spec, run.stored_spec(), resume, overwrite)
    try:  # the writer holds the store's lock; until Run.write's own cleanup starts, a failure must release it
        was_complete = bool(writer.committed and writer.root is not None and writer.root.attrs.get("complete"))
        samples, total = run.samples(writer), run.total()  # total: the dataset's length_hint() reads (and may fail)
    except BaseException:
        writer.abort()  # nothing is created before Run.write: this gives the lock back
        raise
    added = run.write(writer, samples, progress=progress, total=total)
    return Written(path, added, was_complete)


def _complete(path: Path | str) -> bool:
    loc = location(path)
    try:
        raw = loc.get("zarr.json")
        return bool(raw and json.loads(raw).get("attributes", {}).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _execute(spec: RunSpec, store: str | Path, resume: bool, overwrite: bool, progress: bool,
             adapter: ModelAdapter | None, interventions: Sequence[Intervention]) -> Path | str:
    return execute(spec, store, resume=resume, overwrite=overwrite, progress=progress, adapter=adapter,
                   interventions=interventions).path
