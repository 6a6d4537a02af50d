"""``extract`` and ``import_latents``: a run from its ``RunSpec`` (or keyword arguments that build one), in this
process or on Ray workers (``spec.workers``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.capture.intervention import Intervention
from toolkit.run.pipeline import check_target, make_run, open_writer
from toolkit.run.spec import EXTRACT, IMPORT, RunSpec
from toolkit.sdk.adapters import ModelAdapter
from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import store_target

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


def _execute(spec: RunSpec, store: str | Path, resume: bool, overwrite: bool, progress: bool,
             adapter: ModelAdapter | None, interventions: Sequence[Intervention]) -> Path | str:
    path = store_target(store)
    if spec.workers:
        if adapter is not None or interventions:
            raise ToolkitError("a run on Ray workers loads the model in each worker: pass the model's options, not an "
                               "adapter or interventions")
        from toolkit.run.ray import extract_on_ray

        return extract_on_ray(spec, path, resume=resume, overwrite=overwrite, progress=progress)
    check_target(path, resume, overwrite)
    run = make_run(spec, adapter, interventions)
    writer = open_writer(path, spec, run.stored_spec(), resume, overwrite)
    run.write(writer, run.samples(writer), progress=progress, total=run.total())
    return path
