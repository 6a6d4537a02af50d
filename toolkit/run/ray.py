"""Extraction on Ray: one model per actor, disjoint chunks per writer, one committer.

The run is cut into *units*: runs of whole chunks along ``sample`` (the first one may start inside a chunk
when a resumed store was committed mid-chunk; it is then that chunk's only writer).  Zarr's unit of safe
concurrent writing is the chunk, so two actors never touch the same chunk object.

* The **driver** (the process that called ``extract(..., workers=N)``) takes the store's lock (``StoreLock``)
  and holds it for the whole run, creates the store (or truncates a resumed one to its committed prefix),
  sizes every sample-axis array to the run's length once, hands units to the actors and is the **one
  committer**: it advances ``n_samples`` (``StoreWriter.commit``, the atomic root ``zarr.json``) over the
  contiguous prefix of finished units.  No actor ever writes metadata.
* Each **actor** loads the model once and runs ``extract`` itself for one unit at a time (the same sample
  loop, capture, per-sample seeded noise and block writer as a one-process run) through a ``UnitWriter``:
  a ``StoreWriter`` that takes no lock (it writes under the driver's), never resizes and never commits.
  The stored values are therefore the ones a one-process run with the same options stores.
* A killed actor is restarted by Ray (``max_restarts``) and its unit rerun (``max_task_retries``): the unit
  writes the same chunks again, so nothing is lost or duplicated.  A killed driver leaves the committed
  prefix; chunks past it are dropped by ``--resume`` (``StoreWriter`` truncates to ``n_samples``), which
  finishes the run with or without ``--workers``.  Ray ends a dead driver's actors with its job.
* **Closed loop** (a simulator, e.g. ``libero-sim``): an episode's length is known only once it has run, so
  units are whole episodes instead.  An actor runs one episode (skipping the others without running them, as a
  resume does) into an ``EpisodeRecorder`` and returns its batches; the driver writes finished episodes in
  episode order and commits at each episode's end, exactly what a one-process run writes (each call's noise is
  seeded by episode and call, not by sample index).  The activations travel through Ray's object store.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import location, store_target
from toolkit.store.core import StoreWriter, _sample_arrays

ACTOR_RESTARTS = 3  # a unit whose actor dies more often than this fails the run (resumable)
UNITS_PER_WORKER = 4  # finer units balance load and bound the work a killed actor loses


class DriverLock:
    """A unit writer's lock: none of its own, the driver holds the store's lock (or lease) for the whole run."""

    def __init__(self, path: Path):
        self.path = path

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class UnitWriter(StoreWriter):
    """Writes samples ``[start, stop)`` of an existing store, already sized by the driver: whole chunks only
    (blocks end on chunk boundaries), no resize, no commit (the driver commits)."""

    lock_class = DriverLock

    def __init__(self, path: str | Path, start: int, stop: int):
        self.start, self.stop = start, stop
        super().__init__(path, mode="unit")

    def _open(self, mode: str) -> None:
        import zarr

        # the arrays' own metadata (sized to the whole run), not the committed snapshot
        self.root = zarr.open_group(self.loc.zarr_target(), mode="r+", zarr_format=3, use_consolidated=False)
        self.committed = 0  # nothing of this unit is committed; the run loop checks no prefix
        self._complete = False

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)  # checks the arrays match this run's capture
        for name, arr in self._arrays.items():
            if arr.shape[0] < self.stop:
                raise ToolkitError(f"internal: {name} holds {arr.shape[0]} samples, unit ends at {self.stop}")
        self._block_start = self.start

    def commit(self, n: int, complete: bool = False) -> None:
        pass  # the driver is the one committer

    def _truncate(self, n: int) -> None:
        pass  # array metadata has one writer: the driver


class _Layout(Exception):
    """Raised by ``LayoutWriter.initialize`` to hand the store's layout back without writing anything."""

    def __init__(self, layout: dict[str, Any]):
        super().__init__("layout")
        self.layout = layout


class _StandInWriter:
    """What extract's sample loop asks of a store writer, for writers that write nothing themselves (the driver
    does): nothing committed or created, and closing, flushing or aborting is a no-op."""

    committed = 0
    created = False
    started = False
    root = None
    bytes_added = 0
    defer_commits = False

    def flush(self) -> None:
        pass

    def mark_complete(self) -> None:
        pass

    def close(self, complete: bool = True, release: bool = True) -> None:
        pass

    def abort(self, release: bool = True) -> None:
        pass

    def release(self) -> None:
        pass


class LayoutWriter(_StandInWriter):
    """Stands in for the store writer while an actor runs the first batch: records what ``StoreWriter.initialize``
    would be given (attributes, arrays, static coordinates) and the run spec, for the driver to create the store."""

    def __init__(self, path: Path, spec: dict[str, Any]):
        import zarr

        self.path, self.spec = path, spec
        # a resumed store: extract's own checks compare its model, dataset and selection with this run's
        loc = location(path)
        self.root = (zarr.open_group(loc.zarr_target(), mode="r", zarr_format=3, use_consolidated=False)
                     if loc.exists("zarr.json") else None)

    def initialize(self, attrs, specs, static, coordinates, chunk_samples=None, batch_size=1, group_attrs=None):
        raise _Layout({"spec": self.spec, "init": {"attrs": attrs, "specs": specs, "static": static,
                                                    "coordinates": coordinates, "chunk_samples": chunk_samples,
                                                    "batch_size": batch_size, "group_attrs": group_attrs}})


@dataclasses.dataclass
class Unit:
    """One actor's share of a run, handed to ``extract(unit=...)``: which samples, and the writer for them."""

    start: int
    stop: int
    layout: bool = False  # True: run the first batch only and return the store's layout
    last: bool = False  # the run's last unit: the data must end here
    seen: int = 0

    def writer(self, path: Path, spec: dict[str, Any]):
        return LayoutWriter(path, spec) if self.layout else UnitWriter(path, self.start, self.stop)

    def samples(self, samples: Iterator) -> Iterator:
        """The unit's samples; the run's length came from the dataset's ``length_hint``, so a dataset that gives
        fewer or more samples than it announced fails in one line instead of leaving a gap or a short store."""
        for s in itertools.islice(samples, self.start, self.stop):
            self.seen += 1
            yield s
        if not self.layout and (self.seen != self.stop - self.start or (self.last and next(samples, None))):
            raise ToolkitError("the dataset gives another number of samples than its length_hint() announced; "
                               "run without --workers (or fix the dataset adapter's length_hint)")


class EpisodeRecorder(_StandInWriter):
    """Stands in for the store writer while an actor runs one closed-loop episode: records what a one-process
    run hands its writer (the layout on the first append, then every appended batch) for the driver to replay
    into the store in episode order (its episode-end ``flush`` is a no-op: the driver commits the episode when
    every earlier one is in)."""

    def __init__(self):
        self.layout: tuple[tuple, dict] | None = None
        self.batches: list[dict[str, Any]] = []

    @property
    def started(self) -> bool:
        return self.layout is not None

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        self.layout = (args, kwargs)

    def append(self, arrays: dict[str, Any]) -> None:
        self.batches.append(dict(arrays))


@dataclasses.dataclass
class EpisodeUnit:
    """One closed-loop episode for an actor (``episode`` None: only report the run spec)."""

    episode: int | None = None
    recorder: EpisodeRecorder | None = None

    def writer(self, path: Path, spec: dict[str, Any]):
        if self.episode is None:
            raise _Layout({"spec": spec})
        self.recorder = EpisodeRecorder()
        return self.recorder

    def samples(self, samples: Iterator) -> Iterator:
        return samples


class ExtractWorker:
    """A Ray actor: loads the model once, then extracts unit after unit into the shared store."""

    def __init__(self, options: dict[str, Any]):
        import warnings

        from toolkit.sdk.plugins import get_model

        self.options = dict(options, workers=0, progress=False, resume=True, overwrite=False)
        o = self.options
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights notice: the driver's run says it
            self.options["adapter"] = get_model(o["model"])(
                checkpoint=o["checkpoint"], device=o["device"], dtype=o["model_dtype"], seed=o["seed"],
                trust_remote_code=o["trust_remote_code"], allow_missing=o["allow_missing"],
                random_weights=o["random_weights"], **(o["model_options"] or {}))

    def layout(self, batch_size: int) -> dict[str, Any]:
        from toolkit.run.pipeline import extract

        try:
            extract(**self.options, unit=Unit(0, batch_size, layout=True))
        except _Layout as e:
            return e.layout
        raise ToolkitError("the dataset selection is empty: no episode has a step to process "
                           "(check --data, --max-episodes, --max-steps and --stride)")

    def run_unit(self, start: int, stop: int, last: bool = False) -> tuple[int, int]:
        from toolkit.run.pipeline import extract

        extract(**self.options, unit=Unit(start, stop, last=last))
        return start, stop

    def run_spec(self) -> dict[str, Any]:
        from toolkit.run.pipeline import extract

        try:
            extract(**self.options, unit=EpisodeUnit())
        except _Layout as e:
            return e.layout["spec"]
        raise ToolkitError("internal: no run spec")

    def run_episode(self, episode: int) -> dict[str, Any]:
        """Run one closed-loop episode; its layout and batches as the one-process run would write them."""
        from toolkit.run.pipeline import extract

        unit = EpisodeUnit(episode)
        extract(**self.options, unit=unit)
        rec = unit.recorder
        return {"layout": rec.layout, "batches": rec.batches}


def units(committed: int, total: int, chunk_samples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Cut samples ``[committed, total)`` into runs of whole chunks whose boundaries are also batch boundaries
    (so every batch is the one a one-process run forms), about ``UNITS_PER_WORKER`` per worker."""
    step = math.lcm(chunk_samples, batch_size)
    per_unit = max(1, round((total - committed) / (workers * UNITS_PER_WORKER) / step)) * step
    out, a = [], committed
    while a < total:
        b = min(total, (a // per_unit + 1) * per_unit)
        out.append((a, b))
        a = b
    return out


def _reachable(address: str) -> None:
    """Fail in one line on a cluster address nobody answers at (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise ToolkitError(f"cannot reach the Ray cluster at {address}: nothing answers there (start it with "
                           "`ray start --head`, or leave out --ray-address for a local one)") from None


def _connect(address: str | None, workers: int, gpus: float):
    try:
        import ray
    except ImportError:
        raise ToolkitError("--workers needs Ray: pip install 'toolkit[scale]'") from None
    started = False
    if not ray.is_initialized():
        if address:
            _reachable(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ToolkitError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        else:  # a local cluster sized to this machine
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = True
    have = ray.cluster_resources()
    if have.get("CPU", 0) < workers or have.get("GPU", 0) < gpus * workers:
        if started:
            ray.shutdown()
        raise ToolkitError(f"--workers {workers} with --gpus-per-worker {gpus:g} needs {workers} CPUs and "
                           f"{gpus * workers:g} GPUs; the Ray cluster has {have.get('CPU', 0):g} CPUs and "
                           f"{have.get('GPU', 0):g} GPUs")
    return ray, started


def extract_on_ray(spec: Any) -> Path:
    """The driver of ``extract(..., workers=N)``: see the module docstring."""
    from toolkit.run.pipeline import (
        Interrupted,
        Progress,
        _check_resume_prefix,
        _check_target,
        _writer,
        closed_loop_options,
        expected_samples,
        iter_samples,
    )
    from toolkit.sdk.plugins import get_dataset

    o = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    workers, gpus = int(o["workers"]), float(o["gpus_per_worker"] or 0)
    if workers < 1 or gpus < 0:
        raise ToolkitError(f"--workers must be at least 1 and --gpus-per-worker at least 0, got {workers} and {gpus:g}")
    if o["adapter"] is not None:
        raise ToolkitError("extract(workers=...) loads the model in each Ray actor; pass model options, not adapter=")
    if o["batch_size"] < 1:
        raise ToolkitError(f"--batch-size must be at least 1, got {o['batch_size']}")
    dataset_cls = get_dataset(o["dataset"])
    closed = bool(getattr(dataset_cls, "closed_loop", False))
    path = store_target(o["store"])
    _check_target(path, o["resume"], o["overwrite"])
    if closed:  # episodes spread over the actors, written and committed in episode order by the driver
        ds = dataset_cls(o["data"], **closed_loop_options(o["dataset"], o["batch_size"], o["seed"], o["max_steps"],
                                                          o["dataset_options"]))
        keys = [ep.key for ep in itertools.islice(ds.episodes(), o["max_episodes"])]  # no episode runs
    else:
        ds = dataset_cls(o["data"], **(o["dataset_options"] or {}))
        total = expected_samples(ds, o["max_episodes"], o["max_steps"], o["stride"])
        if total is None:  # the dataset does not know its size: count it (no model runs)
            total = sum(1 for _ in iter_samples(ds, o["max_episodes"], o["max_steps"], o["stride"]))
    ray, started = _connect(o["ray_address"], workers, gpus)
    actor_cls = ray.remote(ExtractWorker)
    run_id = uuid.uuid4().hex[:8]
    options = {k: v for k, v in o.items() if k != "unit"}
    actors = [actor_cls.options(name=f"toolkit-extract-{run_id}-{i}", num_cpus=1, num_gpus=gpus,
                                max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS).remote(options)
              for i in range(workers)]
    writer = None
    try:
        if closed:
            writer = _writer(path, o["resume"], o["overwrite"], o["codec"], _get(ray, actors[0].run_spec.remote()))
            _run_episodes(ray, actors, writer, keys, Progress(o["progress"], writer, writer.committed))
        else:
            layout = _get(ray, actors[0].layout.remote(o["batch_size"]))
            writer = _writer(path, o["resume"], o["overwrite"], o["codec"], layout["spec"])
            if writer.committed:
                _check_resume_prefix(writer, iter_samples(ds, o["max_episodes"], o["max_steps"], o["stride"]),
                                     writer.committed)
            writer.initialize(**layout["init"])
            for _, arr in _sample_arrays(writer.root):  # the one resize: every actor writes inside this shape
                if arr.shape[0] != total:
                    arr.resize((total, *arr.shape[1:]))
            _run_units(ray, actors, writer, units(writer.committed, total, writer.chunk_samples, o["batch_size"],
                                                  workers), Progress(o["progress"], writer, writer.committed, total))
        if writer.started:
            writer.close(complete=True, release=False)
        else:  # a resumed closed-loop store whose episodes were all committed already
            writer.mark_complete()
    except BaseException as e:
        if writer is not None:
            writer.abort(release=False)
            if writer.created and writer.committed == 0:
                writer.loc.remove()  # nothing useful was written
        if isinstance(e, KeyboardInterrupt) and writer is not None:
            import signal

            num = getattr(e, "signum", signal.SIGINT)
            raise Interrupted(num, f"interrupted by {signal.Signals(num).name}: {writer.committed} samples are "
                                   f"committed in {path}") from None
        raise
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if writer is not None:
            writer.release()
        if started:
            ray.shutdown()
    return path


def _run_episodes(ray, actors, writer: StoreWriter, keys: list[str], bar) -> None:
    """Closed loop: one episode per actor task; finished episodes are written and committed in episode order
    (``flush`` with deferred commits, as a one-process run does at each episode's end).  At most two episodes per
    actor wait in the driver for an earlier one, so memory stays bounded whatever the episode lengths."""
    from toolkit.run.pipeline import _stored_episodes

    done = _stored_episodes(writer)
    if keys[:len(done)] != done:
        raise ToolkitError(f"cannot resume {writer.path}: it holds episodes {done[:3]}..., the dataset gives "
                           f"{keys[:3]}...; the store was made from other options (use --overwrite)")
    todo = list(range(len(done), len(keys)))
    results: dict[int, dict[str, Any]] = {}
    pending: dict[Any, tuple[Any, int]] = {}
    idle = list(actors)
    nxt = len(done)
    while todo or pending:
        while todo and idle and len(results) + len(pending) < 2 * len(actors):
            actor = idle.pop()
            e = todo.pop(0)
            pending[actor.run_episode.remote(e)] = (actor, e)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            actor, e = pending.pop(ref)
            idle.append(actor)
            results[e] = _get(ray, ref)
        while nxt in results:
            episode = results.pop(nxt)
            if not writer.started:  # the first episode in order gives the layout, as in a one-process run
                args, kwargs = episode["layout"]
                writer.initialize(*args, **kwargs)
                writer.defer_commits = True
            for arrays in episode["batches"]:
                writer.append(arrays)
            writer.flush()
            nxt += 1
            if bar.bar is not None:
                bar.bar.update(len(episode["batches"]))
                bar.bar.set_postfix(workers=len(actors), busy=len(pending), episodes=nxt, refresh=False)


def _get(ray, ref):
    """``ray.get`` with a worker's ToolkitError surfacing as itself (one line), other failures as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, ToolkitError):
            raise ToolkitError(str(cause).splitlines()[0]) from None
        raise
    except ray.exceptions.RayActorError as e:
        raise ToolkitError(f"a Ray worker died {ACTOR_RESTARTS + 1} times ({str(e).splitlines()[0][:200]}); "
                           "the committed samples are kept: rerun with --resume") from None


def _run_units(ray, actors, writer: StoreWriter, todo: list[tuple[int, int]], bar) -> None:
    """Keep every actor busy; commit the contiguous prefix of finished units as it grows."""
    todo = list(todo)
    ends = {a: b for a, b in todo}
    finished: set[int] = set()
    pending: dict[Any, Any] = {}
    idle = list(actors)
    prefix = writer.committed
    total = todo[-1][1] if todo else prefix
    while todo or pending:
        while todo and idle:
            actor = idle.pop()
            a, b = todo.pop(0)
            pending[actor.run_unit.remote(a, b, b == total)] = actor
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            idle.append(pending.pop(ref))
            a, b = _get(ray, ref)
            finished.add(a)
            if bar.bar is not None:
                bar.bar.update(b - a)
                bar.bar.set_postfix(workers=len(actors), busy=len(pending), committed=prefix, refresh=False)
        advanced = prefix
        while advanced in finished:
            advanced = ends[advanced]
        if advanced != prefix:
            writer.commit(advanced)
            prefix = advanced
