"""Writing a store: ``StoreWriter`` creates (or resumes) one run's store and appends sample batches from a
background thread, committing whole blocks by rewriting the root ``zarr.json`` (see ``toolkit.store.layout``).

Samples (one policy call each) grow along ``sample``.  Chunks are ``(N samples, 1 layer, all the rest)``, the
probe's access pattern.  The caller fills a block buffer (one chunk along ``sample``); the writer thread writes
each full block and commits it by raising ``n_samples``, while the caller fills the second buffer.  A resumed
run truncates every array to the committed count and continues from there, so nothing is lost or duplicated.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from toolkit.sdk.errors import ToolkitError
from toolkit.store.chunks import ChunkPlan, chunk_plan, write_chunk
from toolkit.store.codecs import compressors_for
from toolkit.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    SAMPLE,
    ArraySpec,
    choose_chunk_samples,
    first_difference,
    jsonable,
    np_dtype,
    sample_arrays,
    write_consolidated,
)
from toolkit.store.location import location, store_target

# How often a long run commits at the latest (a kill loses at most this much work); environment overrides.
COMMIT_SECONDS = float(os.environ.get("TOOLKIT_COMMIT_SECONDS", 60))


COMMIT_SAMPLES = int(os.environ.get("TOOLKIT_COMMIT_SAMPLES", 0)) or None  # default: one chunk


# The longest close() waits for the writer thread's last block and commit before it gives up on it.
CLOSE_SECONDS = float(os.environ.get("TOOLKIT_CLOSE_SECONDS", 300))


class StoreWriter:
    """Writes sample batches into a store from a background thread with a bounded queue.

    ``mode``: "create" (the path must not exist), "overwrite" (replace it) or "resume" (continue an
    existing store from its last committed sample).  ``spec``: the run that writes it (recorded at creation as the
    ``run_spec`` attribute); a resume is refused, naming the first difference, when ``differ(stored, spec)``
    (default: any difference) finds one.
    The writer holds the store's lock (``StoreLock``) from construction until ``close``/``abort``/``release``.
    """

    # None: the store location's own lock (StoreLock locally, a lease on object stores); toolkit.run.ray's
    # unit writers write under their driver's lock instead
    lock_class: type | None = None

    def __init__(self, path: str | Path, mode: str = "create", codec: str = "auto",
                 spec: dict[str, Any] | None = None,
                 differ: Callable[[dict, dict], tuple[str, Any, Any] | None] = first_difference):
        self.path = store_target(path)  # a Path, or the URL of an object-store prefix
        self.loc = location(self.path)
        self.codec = codec
        compressors_for(codec, "")  # validate early
        self.spec = jsonable(spec) if spec is not None else None
        self.differ = differ
        self.created = False
        self.overwrite = mode == "overwrite"
        self.lock = self.lock_class(self.path) if self.lock_class else self.loc.lock()
        self.lock.acquire()
        try:
            self._open(mode)
        except OSError as e:  # e.g. a read-only store directory
            self.lock.release()
            raise ToolkitError(f"cannot write {self.path}: {e.strerror or e} ({e.filename or self.path})") from None
        except BaseException:
            self.lock.release()
            raise
        self.specs: dict[str, ArraySpec] = {}
        self.chunk_samples = 0
        self.bytes_written = 0  # raw bytes the writer thread has written
        self.bytes_added = 0  # raw bytes handed to append (what the progress bar shows)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pool = None  # the chunk encoders (see _write_block), started with the first block
        # True: full blocks are written as they fill but committed (n_samples raised) only by flush() or a
        # complete close(), so a reader or a resume sees whole units (e.g. closed-loop episodes) only.
        self.defer_commits = False
        self.commit_seconds = COMMIT_SECONDS
        self.commit_samples = COMMIT_SAMPLES
        self.close_seconds = CLOSE_SECONDS

    def _open(self, mode: str) -> None:
        loc = self.loc
        if mode == "resume" and loc.exists():
            if not loc.exists("zarr.json"):
                if loc.partial_upload():
                    raise ToolkitError(f"cannot resume: the creation of {self.path} was interrupted before any sample "
                                       "was stored; start it again with --overwrite")
                raise ToolkitError(f"cannot resume: {self.path} is not a store; remove it or pick another --store")
            from toolkit.store.reader import Store

            Store(self.path, warn_incomplete=False)  # a damaged root zarr.json is one line here, before any write
            self.root = zarr.open_group(loc.zarr_store(read_only=False), mode="r+", zarr_format=3,
                                        use_consolidated=False)
            if self.root.attrs.get("format") != FORMAT:
                raise ToolkitError(f"{self.path} is not a toolkit store (no '{FORMAT}' format attribute)")
            stored = self.root.attrs.get("run_spec")
            if stored is not None and self.spec is not None:
                diff = self.differ(stored, self.spec)
                if diff:
                    key, old, new = diff
                    raise ToolkitError(f"cannot resume {self.path}: it was made with {key}={old!r}, this run uses "
                                       f"{key}={new!r}; rerun with the store's options or use --overwrite")
            if self.codec == "auto":  # the default continues the store's recorded codec (its arrays keep theirs)
                self.codec = str(self.root.attrs.get("codec", "zstd"))
            self.committed = int(self.root.attrs.get("n_samples", 0))
            self._complete = bool(self.root.attrs.get("complete"))
            if not loc.remote:  # temp files of a killed zarr write (object stores have none: a PUT is whole)
                for stale in self.path.rglob("*.partial"):
                    stale.unlink(missing_ok=True)
            self._truncate(self.committed)
        else:  # a new store (--resume of a store that was never created starts one too)
            if loc.exists():
                if mode != "overwrite":
                    raise ToolkitError(f"{self.path} already exists: pass --resume to continue it or --overwrite "
                                       "to replace it")
                if (not loc.remote and self.path.is_file()) or not (loc.exists("zarr.json") or loc.is_empty()
                                                                   or loc.partial_upload()):
                    raise ToolkitError(f"refusing to overwrite {self.path}: it exists and is not a zarr store")
            self.root = None
            self.committed = 0
            self._complete = False

    @property
    def started(self) -> bool:
        """True once ``initialize`` has run and until ``close``."""
        return self._thread is not None

    # creation ------------------------------------------------------------------------------
    def initialize(self, attrs: dict[str, Any], specs: list[ArraySpec], static: dict[str, tuple[tuple[str, ...], Any]],
                   coordinates: list[str], chunk_samples: int | None = None, batch_size: int = 1,
                   group_attrs: dict[str, dict[str, Any]] | None = None, expected: int | None = None) -> None:
        """Create the store's arrays (or check a resumed store has the same ones) and start writing.

        ``static`` holds fixed coordinate arrays (e.g. ``vlm/layer``); ``coordinates`` names the per-sample
        arrays that are coordinates and are repeated in every site group; ``group_attrs`` are each site
        group's attributes.  ``expected``: the run's sample count (or an upper bound), which caps the default
        chunk length (``choose_chunk_samples``).
        """
        sites = sorted({s.name.split("/")[0] for s in specs if "/" in s.name})
        # Copies of the per-sample coordinates in every site group: xarray.open_zarr(path, group=SITE) then has
        # them, and DataTree would not give them (it inherits only indexed coordinates).  They are small.
        expanded = list(specs)
        for c in coordinates:
            base = next(s for s in specs if s.name == c)
            expanded += [ArraySpec(f"{site}/{c}", base.shape, base.dtype, base.dims, base.stored_dtype, base.attrs)
                         for site in sites]
        specs = expanded
        self.specs = {s.name: s for s in specs}
        if self.root is not None:  # resume: same arrays, same shapes
            self.chunk_samples = int(self.root.attrs["chunk_samples"])
            extra = sorted(set(n for n, _ in sample_arrays(self.root)) - set(self.specs))
            if extra:
                raise ToolkitError(f"cannot resume {self.path}: it holds arrays this run does not write ({extra[0]}, "
                                   "e.g. made by an older toolkit); use --overwrite")
            for s in specs:
                arr = self._array(s.name)
                same_dtype = s.dtype == "str" or str(arr.dtype) == s.dtype if arr is not None else False
                if arr is None or tuple(arr.shape[1:]) != s.shape or not same_dtype:
                    raise ToolkitError(f"cannot resume {self.path}: array {s.name!r} does not match this run's "
                                       "capture (different model, selection or dtype); use --overwrite")
        else:
            self.chunk_samples = chunk_samples or choose_chunk_samples(specs, batch_size, expected)
            self._create(attrs, specs, static, coordinates, sites, group_attrs or {})
        self._sites = sites
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):
            self._free.put({n: _block_buffer(self.chunk_samples, s) for n, s in self.specs.items()})
        self._current: dict[str, np.ndarray] | None = None
        # Dense activations: skip zarr's per-chunk "all fill value?" scan (a runtime setting, not stored).
        self._arrays = {n: self.root[n].with_config({"write_empty_chunks": True}) for n in self.specs}
        self._filled = 0
        self._block_start = self.committed
        self._last_handover = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="toolkit-store-writer", daemon=True)
        self._thread.start()

    def _create(self, attrs, specs, static, coordinates, sites, group_attrs) -> None:
        """Build the store under a temporary name and rename it into place: a run killed while
        creating leaves no half-made store behind, and --overwrite replaces the old one only now.
        Called under the store's lock, so any other ``.creating-*`` of this path is a dead run's.
        On an object store (no rename) it is built in a local folder and uploaded, root ``zarr.json`` last."""
        if self.loc.remote:
            tmp = self.loc.build_folder()
            try:
                self._build(tmp, attrs, specs, static, coordinates, sites, group_attrs)
                if self.loc.exists():  # --overwrite, validated in _open
                    self.loc.remove()
                self.loc.upload(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.created = True
            self.root = zarr.open_group(self.loc.zarr_store(read_only=False), mode="r+", zarr_format=3,
                                        use_consolidated=False)
            return
        for stale in self.path.parent.glob(f".{self.path.name}.creating-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.parent / f".{self.path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self._build(tmp, attrs, specs, static, coordinates, sites, group_attrs)
            if self.path.exists():  # --overwrite, validated in __init__: move the old one aside, then delete it
                old = self.path.parent / f".{self.path.name}.replaced-{uuid.uuid4().hex[:8]}"
                os.rename(self.path, old)
                os.rename(tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, self.path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ToolkitError(f"cannot create {self.path}: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.created = True
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=3, use_consolidated=False)

    def _build(self, tmp: Path, attrs, specs, static, coordinates, sites, group_attrs) -> None:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root_attrs = dict(attrs)
        root_attrs.update(format=FORMAT, format_version=FORMAT_VERSION, n_samples=0, complete=False,
                          chunk_samples=self.chunk_samples, codec=self.codec, sites=sites,
                          coordinates=" ".join(coordinates))
        if self.spec is not None:
            root_attrs["run_spec"] = self.spec
        root.attrs.update(jsonable(root_attrs))
        for site in sites:
            root.create_group(site, attributes=jsonable(group_attrs.get(site, {})))
        # non-dimension coordinates of a site, e.g. the denoising time `t` (dims ("denoise",))
        site_coords = {site: [n.split("/")[1] for n in static if n.startswith(f"{site}/")
                              and static[n][0] != (n.split("/")[1],)] for site in sites}
        for s in specs:
            inner = s.chunk_inner or s.shape
            extra = {"stored_dtype": s.stored_dtype} if s.stored_dtype else {}
            if s.name.split("/")[-1] not in coordinates:
                names = coordinates + (site_coords.get(s.name.split("/")[0], []) if "/" in s.name else [])
                extra["coordinates"] = " ".join(names)
            root.create_array(
                s.name, shape=(0, *s.shape), dtype=str if s.dtype == "str" else s.dtype,
                chunks=(self.chunk_samples, *inner), dimension_names=(SAMPLE, *s.dims), fill_value=0,
                compressors=compressors_for(s.codec or (self.codec if s.dtype != "str" else "zstd"),
                                            s.stored_dtype or s.dtype),
                attributes=jsonable({**s.attrs, **extra}),
            )
        for name, (dims, values) in static.items():
            values = np.asarray(values)
            arr = root.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape or (1,),
                                    dimension_names=dims, fill_value=0, compressors=compressors_for("none", ""))
            arr.with_config({"write_empty_chunks": True})[...] = values
        write_consolidated(tmp, 0, False)

    def _array(self, name: str):
        try:
            return self.root[name]
        except KeyError:
            return None

    def _truncate(self, n: int) -> None:
        """Drop everything past the committed sample count (a killed run's half-written block)."""
        for name, arr in sample_arrays(self.root):
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    # committing ----------------------------------------------------------------------------
    def commit(self, n: int, complete: bool = False) -> None:
        """Make the first ``n`` samples visible: one atomic rewrite of the root ``zarr.json`` (``n_samples``,
        ``complete`` and the consolidated metadata of every node, sample arrays cut to ``n``)."""
        check = getattr(self.lock, "check", None)
        if check is not None:  # a lease lost to another run: commit nothing more
            check()
        write_consolidated(self.loc, n, complete)
        self.committed = n
        self._complete = complete

    def mark_complete(self) -> None:
        """A resumed store whose samples were all committed already: just mark it finished."""
        try:
            self.commit(self.committed, complete=True)
        except OSError as e:
            raise ToolkitError(f"cannot write {self.path}: {e.strerror or e} ({e.filename or self.path})") from None

    def release(self) -> None:
        """Give up the store's lock (after close/abort; safe to call twice)."""
        self.lock.release()

    # writing -------------------------------------------------------------------------------
    # The caller's thread copies samples into a block buffer (one chunk along `sample`); a full block
    # goes to the writer thread, which writes and commits it while the caller fills the other buffer.
    # Two buffers in all: memory stays flat however long the run.  A block also goes early when
    # `commit_seconds` have passed or `commit_samples` are waiting, so a kill never loses more than that.

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """Add one batch: every array of the store, each with the batch as leading axis."""
        self._check()
        full = dict(arrays)
        for n, v in arrays.items():
            if "/" not in n:
                for site in self._sites:
                    if f"{site}/{n}" in self.specs:
                        full[f"{site}/{n}"] = v
        missing = set(self.specs) - set(full)
        if missing:
            raise ToolkitError(f"internal: batch is missing arrays {sorted(missing)}")
        size = len(next(iter(full.values())))
        self.bytes_added += sum(v.nbytes for v in arrays.values() if v.dtype != object)
        i = 0
        while i < size:
            if self._current is None:
                self._current = self._wait(self._free.get)
            take = min(self._block_end() - (self._block_start + self._filled), size - i)
            for n, buf in self._current.items():
                buf[self._filled:self._filled + take] = full[n][i:i + take]
            self._filled += take
            i += take
            if self._block_start + self._filled == self._block_end():
                self._hand_over()
        if self._filled and (time.monotonic() - self._last_handover >= self.commit_seconds
                             or (self.commit_samples and self._filled >= self.commit_samples)):
            self._hand_over()

    def _hand_over(self) -> None:
        if self._filled:
            block = ("block", self._block_start, self._filled, self._current, not self.defer_commits)
            self._wait(lambda timeout: self._queue.put(block, timeout=timeout))
            self._block_start += self._filled
            self._filled, self._current = 0, None
            self._last_handover = time.monotonic()

    def _wait(self, call):
        """Block on a queue operation, but surface a writer-thread failure instead of hanging."""
        while True:
            try:
                return call(timeout=0.5)
            except (queue.Empty, queue.Full):
                self._check()
                if self._thread is None or not self._thread.is_alive():
                    self._check()
                    raise ToolkitError(f"the writer of {self.path} stopped unexpectedly")

    def flush(self) -> None:
        """Write what is buffered and commit every sample appended so far (e.g. at an episode boundary)."""
        if self._thread is None:
            return
        self._check()
        self._hand_over()
        if self.defer_commits:
            end = self._block_start
            self._wait(lambda timeout: self._queue.put(("commit", end), timeout=timeout))

    def close(self, complete: bool = True, release: bool = True) -> None:
        """Write what is buffered, commit it and (if ``complete``) mark the store finished; release the lock
        (unless ``release`` is False: the caller still has work to do under it, then calls ``release``).

        With ``defer_commits`` an incomplete close commits nothing more, and drops the uncommitted tail."""
        try:
            if self._thread is None:
                return
            try:
                if complete:
                    self.flush()
                else:
                    self._hand_over()
            finally:
                self._stop_thread(complete)
            if self.defer_commits and not complete and self._error is None:
                self._truncate(self.committed)
            self._check()
        finally:
            if release:
                self.release()

    def _stop_thread(self, complete: bool) -> None:
        """Ask the writer thread to finish (commit, and mark complete if ``complete``) and wait for it, never
        longer than ``close_seconds``: a thread that died is not waited for, one that is stuck (a stalled disk
        or object store) is left behind with an error, so the run ends and its lock is released."""
        thread, self._thread = self._thread, None
        deadline = time.monotonic() + self.close_seconds
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(("close", complete), timeout=0.5)
                break
            except queue.Full:
                continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive() and self._error is None:
            self._error = ToolkitError(f"the writer of {self.path} did not finish within {self.close_seconds:.0f} s "
                                       f"(a stalled disk or object store?); {self.committed} samples are committed: "
                                       "continue with --resume")

    def discard(self) -> None:
        """Remove the store when this run created it and committed nothing to it (nothing useful to keep), but
        only while this run still holds its lock: a store another run has taken over is never touched."""
        held = getattr(self.lock, "held", None)
        if not self.created or self.committed or (held is not None and not held()):
            return
        try:
            self.loc.remove()
        except ToolkitError:
            pass

    def abort(self, release: bool = True) -> None:
        """Commit what was already added, without marking the store complete (extraction failed)."""
        try:
            if self._thread is not None:
                self.close(complete=False, release=release)
        except ToolkitError:
            pass
        finally:
            if release:
                self.release()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, ToolkitError):
                raise err
            if isinstance(err, OSError):
                raise ToolkitError(f"writing {self.path} failed: {err.strerror or err} ({self.committed} samples "
                                   "committed; free the space and continue with --resume)") from err
            raise ToolkitError(f"writing {self.path} failed: {type(err).__name__}: {err}") from err

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item[0] == "close":
                    if item[1] and self._error is None:
                        self.commit(self.committed, complete=True)
                    return
                if item[0] == "commit":
                    if self._error is None:
                        self.commit(item[1])
                    continue
                if self._error is None:  # after a failure, drain without writing
                    self._write_block(*item[1:])
        except BaseException as e:  # surfaced on the caller's thread by _check()
            self._error = e
            _settle_zarr()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _block_end(self) -> int:
        # Blocks end on chunk boundaries, so every write after the first (possibly partial) one is whole chunks.
        n = self.chunk_samples
        return (self._block_start // n + 1) * n

    def _write_block(self, a: int, filled: int, buffers: dict[str, np.ndarray], commit: bool = True) -> None:
        """Write one block into every array, then commit it.  A block that starts on a chunk boundary is cut
        into whole chunks (the last one padded with the fill value, as zarr pads it), each encoded and written
        as its own file by a small thread pool; other blocks (the partial chunk after an early commit) and
        arrays with a chain this package does not encode go through zarr."""
        b = a + filled
        futures: list = []
        try:
            for n, buf in buffers.items():
                arr = self._arrays[n]
                if arr.shape[0] < b:
                    arr.resize((b, *arr.shape[1:]))
                plan = chunk_plan(arr)
                whole = filled % plan.chunks[0] == 0 or b >= arr.shape[0]  # padding overwrites nothing
                if plan.codecs is not None and a % plan.chunks[0] == 0 and whole and plan.fill_value == 0:
                    futures += self._submit_chunks(arr, plan, a, buf[:filled])
                else:
                    arr[a:b] = buf[:filled]
                self.bytes_written += buf[:filled].nbytes
            for f in futures:
                f.result()
            if commit:
                self.commit(b)  # the commit point: written after every array holds the block
        finally:
            for f in futures:  # a failed block: let the other chunks finish before the buffer is reused
                f.cancel() or f.exception()
            self._free.put(buffers)

    def _submit_chunks(self, arr, plan: ChunkPlan, a: int, values: np.ndarray) -> list:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(WRITE_WORKERS, thread_name_prefix="toolkit-store-encode")
        folder = plan.prefix if plan.root is None else os.path.join(plan.root, plan.prefix)
        grid = [range(-(-s // c)) for s, c in zip(values.shape[1:], plan.chunks[1:])]
        c0 = a // plan.chunks[0]
        futures = []
        for inner in itertools.product(*grid):
            coords = (c0, *inner)
            region = (slice(0, values.shape[0]),) + tuple(slice(i * c, (i + 1) * c)
                                                         for i, c in zip(inner, plan.chunks[1:]))
            futures.append(self._pool.submit(write_chunk, folder + plan.meta.encode_chunk_key(coords),
                                             values[region], plan))
        return futures


WRITE_WORKERS = min(4, os.cpu_count() or 1)


def _settle_zarr(timeout: float = 30.0) -> None:
    """After a failed zarr write, let zarr's other operations of that call (reads of a read-modify-write, writes
    of sibling chunks: zarr gathers them and returns at the first failure) finish on its event loop, so the run
    ends with its one line and nothing is cut off mid-request at exit."""
    import asyncio

    try:
        from zarr.core.sync import sync
    except ImportError:
        return

    async def drain() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    try:
        sync(drain(), timeout=timeout + 5)
    except Exception:
        pass


def _block_buffer(n: int, spec: ArraySpec) -> np.ndarray:
    """A block buffer of ``n`` samples, indexed sample first like the batches copied into it.  Arrays chunked
    ``(N samples, 1 layer, all the rest)`` get layer-major memory behind that view, so each chunk of a block is
    one contiguous run that is checksummed and written as it lies (no gather into a copy per chunk)."""
    inner = spec.chunk_inner or spec.shape
    if spec.shape and spec.shape[0] > 1 and inner[0] == 1 and tuple(inner[1:]) == tuple(spec.shape[1:]):
        return np.moveaxis(np.empty((spec.shape[0], n, *spec.shape[1:]), dtype=np_dtype(spec.dtype)), 0, 1)
    return np.empty((n, *spec.shape), dtype=np_dtype(spec.dtype))
