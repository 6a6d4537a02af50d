"""Extraction on Ray: one model per actor, disjoint chunks per writer, one committer.

The run is cut into *units*: runs of whole chunks along ``sample`` (the first one may start inside a chunk
when a resumed store was committed mid-chunk; it is then that chunk's only writer).  Zarr's unit of safe
concurrent writing is the chunk, so two actors never touch the same chunk object.

* The **driver** (the process that called ``extract`` with ``workers=N``) takes the store's lock (``StoreLock``)
  and holds it for the whole run, creates the store (or truncates a resumed one to its committed prefix),
  sizes every sample-axis array to the run's length once, hands units to the actors and is the **one
  committer**: it advances ``n_samples`` (``StoreWriter.commit``, the atomic root ``zarr.json``) over the
  contiguous prefix of finished units.  No actor ever writes metadata.
* Each **actor** receives the run's ``RunSpec``, makes its ``Run`` once (the model loads once) and writes one
  unit at a time with ``Run.write`` (the same sample loop, capture, per-sample seeded noise and block writer as a
  one-process run) through a ``UnitWriter``: a ``StoreWriter`` that takes no lock (it writes under the
  driver's), never resizes and never commits.  The first actor also gives the driver the store's layout
  (``Run.first_layout``), worked out from the first batch.
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

import itertools
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.run.layout import StoreLayout
from toolkit.run.pipeline import Run, check_target, make_run, open_writer
from toolkit.run.progress import Progress
from toolkit.run.samples import check_resume_prefix, iter_samples, run_episodes, stored_episodes
from toolkit.run.signals import interrupted
from toolkit.run.spec import RunSpec
from toolkit.sdk.errors import ToolkitError
from toolkit.store.layout import sample_arrays
from toolkit.store.location import refuse_process_local
from toolkit.store.writer import StoreWriter

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
        self.root = zarr.open_group(self.loc.zarr_store(read_only=False), mode="r+", zarr_format=3,
                                    use_consolidated=False)
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


class _StandInWriter:
    """What ``Run.write`` asks of a store writer, for a writer that writes nothing itself (the driver does): nothing
    committed or created, and closing, flushing or aborting is a no-op."""

    committed = 0
    created = False
    started = False
    root = None
    path = None  # no store of its own
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


def unit_samples(samples: Iterator, start: int, stop: int, last: bool) -> Iterator:
    """Samples ``[start, stop)`` of a run.  Its length came from the dataset's ``length_hint``, so a dataset that gives
    fewer or more samples than it announced fails in one line instead of leaving a gap or a short store."""
    seen = 0
    for s in itertools.islice(samples, start, stop):
        seen += 1
        yield s
    if seen != stop - start or (last and next(samples, None) is not None):
        raise ToolkitError("the dataset gives another number of samples than its length_hint() announced; "
                           "run without --workers (or fix the dataset adapter's length_hint)")


class ExtractWorker:
    """A Ray actor: makes the run once (the model loads once), then writes unit after unit into the shared store."""

    def __init__(self, spec: dict[str, Any], path: str, cwd: str | None = None):
        import warnings

        if cwd and os.path.isdir(cwd):  # relative --data, --checkpoint, store paths mean what they mean to the driver
            os.chdir(cwd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights notice: the driver's run says it
            self.run: Run = make_run(RunSpec.model_validate(spec))
        self.path = path

    def layout(self) -> tuple[dict[str, Any], StoreLayout]:
        """The run's ``run_spec`` attribute and its store's layout (from the first batch; nothing is written)."""
        return self.run.stored_spec(), self.run.first_layout()

    def stored_spec(self) -> dict[str, Any]:
        return self.run.stored_spec()

    def run_unit(self, start: int, stop: int, last: bool = False) -> tuple[int, int]:
        writer = UnitWriter(self.path, start, stop)
        self.run.write(writer, unit_samples(self.run.samples(), start, stop, last))
        return start, stop

    def run_episode(self, episode: int) -> dict[str, Any]:
        """Run one closed-loop episode; its layout and batches as the one-process run would write them."""
        recorder = EpisodeRecorder()
        self.run.write(recorder, self.run.samples(only=episode))
        return {"layout": recorder.layout, "batches": recorder.batches}


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


_watchdogs: list = []  # the watchdogs (toolkit/run/ray_watchdog.py) started; kept, so that a finished watchdog is reaped (and no ResourceWarning is raised)


def _watch_driver(ray, session_dir: str) -> None:
    """Start the watchdog (``toolkit/run/ray_watchdog.py``, a script of its own) of the local cluster this process
    just started: it ends the cluster's processes if this process dies (see that file)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):  # elsewhere Ray's own reaper ends the process group
        return
    _watchdogs[:] = [w for w in _watchdogs if w.poll() is None]
    ray_dir = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep  # as Ray spells its commands
    session = os.path.realpath(session_dir) + os.sep  # as /proc/PID/fd spells open files
    try:
        _watchdogs.append(subprocess.Popen(
            [sys.executable, "-I", os.path.join(os.path.dirname(__file__), "ray_watchdog.py"), str(os.getpid()),
             session, ray_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))  # out of the terminal's process group: Ctrl-C reaches the driver, not this
    except OSError:
        pass  # no interpreter to start (an embedded Python): Ray's own cleanup only, the run goes on


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
        else:  # a local cluster sized to this machine, which ends with this process (_watch_driver)
            context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            _watch_driver(ray, context.address_info["session_dir"])
        started = True
    have = ray.cluster_resources()
    if have.get("CPU", 0) < workers or have.get("GPU", 0) < gpus * workers:
        if started:
            ray.shutdown()
        raise ToolkitError(f"--workers {workers} with --gpus-per-worker {gpus:g} needs {workers} CPUs and "
                           f"{gpus * workers:g} GPUs; the Ray cluster has {have.get('CPU', 0):g} CPUs and "
                           f"{have.get('GPU', 0):g} GPUs")
    return ray, started


def extract_on_ray(spec: RunSpec, path: Path | str, resume: bool = False, overwrite: bool = False,
                   progress: bool = False) -> Path | str:
    """The driver of a run with ``spec.workers`` actors: see the module docstring."""
    workers, gpus = spec.workers, spec.gpus_per_worker
    refuse_process_local(path, "Ray workers (processes of their own) cannot write it")
    check_target(path, resume, overwrite)
    plan = Run(spec)  # the dataset only: the driver loads no model
    ds = plan.open_dataset()
    if plan.closed:  # episodes spread over the actors, written and committed in episode order by the driver
        keys = [ep.key for ep in run_episodes(ds, spec)]  # no episode runs
    else:
        total = plan.total()
        if total is None:  # the dataset does not know its size: count it (no model runs)
            total = sum(1 for _ in plan.samples())
    ray, started = _connect(spec.ray_address, workers, gpus)
    actor_cls = ray.remote(ExtractWorker)
    run_id = uuid.uuid4().hex[:8]
    actors = [actor_cls.options(name=f"toolkit-extract-{run_id}-{i}", num_cpus=1, num_gpus=gpus,
                                max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
              .remote(spec.model_dump(), str(path), os.getcwd()) for i in range(workers)]
    writer = None
    try:
        if plan.closed:
            writer = open_writer(path, spec, _get(ray, actors[0].stored_spec.remote()), resume, overwrite)
            _run_episodes(ray, actors, writer, keys, Progress(progress, writer, writer.committed))
        else:
            stored, layout = _get(ray, actors[0].layout.remote())
            writer = open_writer(path, spec, stored, resume, overwrite)
            if writer.committed:
                check_resume_prefix(writer, iter_samples(ds, spec), writer.committed)
            layout.create(writer, spec.chunk_samples, spec.batch_size)
            for _, arr in sample_arrays(writer.root):  # the one resize: every actor writes inside this shape
                if arr.shape[0] != total:
                    arr.resize((total, *arr.shape[1:]))
            _run_units(ray, actors, writer, units(writer.committed, total, writer.chunk_samples, spec.batch_size,
                                                  workers), Progress(progress, writer, writer.committed, total))
        if writer.started:
            writer.close(complete=True, release=False)
        else:  # a resumed closed-loop store whose episodes were all committed already
            writer.mark_complete()
    except BaseException as e:
        if writer is not None:
            writer.abort(release=False)
            writer.discard()  # nothing useful was written (and the store is still ours)
        if isinstance(e, KeyboardInterrupt) and writer is not None:
            raise interrupted(e, writer.committed, path) from None
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
    done = stored_episodes(writer)
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
            bar.advance(len(episode["batches"]), workers=len(actors), busy=len(pending), episodes=nxt)


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
            bar.advance(b - a, workers=len(actors), busy=len(pending), committed=prefix)
        advanced = prefix
        while advanced in finished:
            advanced = ends[advanced]
        if advanced != prefix:
            writer.commit(advanced)
            prefix = advanced
