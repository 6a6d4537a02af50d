"""The Zarr v3 activation store: one self-describing store per extraction run.

Layout (every array carries ``dimension_names``; ``xarray.open_zarr(path)`` and
``xarray.open_zarr(path, group=SITE)`` open it with coordinates, ``dask.array.from_zarr`` reads it
lazily, neither needs this package)::

    store.zarr/                      attrs: toolkit version, model, dataset, capture spec, n_samples, complete
      episode, step, task, ...       (sample,)        per-sample coordinates
      dataset_action, policy_action  (sample, ...)    per-sample fields
      vlm/                           one group per capture site
        resid_post                   (sample, layer, token, feature)          or
                                     (sample, layer, denoise, token, feature) for denoising experts
        layer, token, denoise, t     static coordinates of the site
        episode, step, task, ...     the per-sample coordinates again, so the group stands alone

Samples (one policy call each) grow along ``sample``.  Chunks are ``(N samples, 1 layer, all the rest)``,
the probe's access pattern.  The caller fills a block buffer (one chunk along ``sample``); a
background thread writes each full block and commits it by raising ``n_samples`` in the root
attributes, while the caller fills the second buffer.  A resumed run truncates every array to
the committed count and continues from there, so nothing is lost or duplicated.
bfloat16 is stored losslessly as its 16-bit pattern (uint16, ``stored_dtype: bfloat16``).

Integrity: every chunk ends with a crc32c checksum (zarr's ``crc32c`` codec, last in the chain).  All reads
of sample-axis arrays go through one checked path: ``read_chunk(array, chunk)`` for fast readers (the probe,
stats, export) and ``CheckedArray`` (what ``Store.array`` returns) for zarr-style slicing.  A chunk inside the
committed range that is missing, truncated or fails its checksum raises ``CorruptStoreError``: one line
naming the array, the chunk key and the samples it holds, pointing at ``toolkit verify STORE``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import location, store_target

FORMAT = "toolkit-activations"
FORMAT_VERSION = 2  # 2: crc32c per chunk, consolidated metadata written at each commit
CODECS = ("auto", "zstd", "blosc", "blosc-lz4", "none")
CHUNK_TARGET_BYTES = 4 * 2**20
MAX_CHUNK_SAMPLES = 256
SAMPLE = "sample"


def codec_for(codec: str, stored_dtype: str) -> str:
    """The codec ``auto`` stands for, per stored dtype, from measurements on activation-like data
    (benchmarks/bench_write.py): bfloat16 and float32 bit patterns compress with blosc-lz4 + bitshuffle at
    close to memcpy speed (bf16: ~0.87 of the size); no fast codec shrinks float16 activations (zstd-1 saved
    6 % at half the throughput), so they are stored raw; small integer fields and strings get zstd."""
    if codec != "auto":
        return codec
    if stored_dtype in ("bfloat16", "float32", "float64"):
        return "blosc-lz4"
    if stored_dtype == "float16":
        return "none"
    return "zstd"


def compressors_for(codec: str, stored_dtype: str) -> list:
    """The bytes-to-bytes codec chain of an array: the compressor, then a crc32c checksum of the result."""
    codec = codec_for(codec, stored_dtype)
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if codec == "blosc":  # zstd with byte shuffle: smaller than blosc-lz4, several times slower
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    raise ToolkitError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")


def decode(values: np.ndarray, stored_dtype: str | None) -> np.ndarray:
    """Stored values -> numpy; bfloat16 bit patterns become float32 (exactly)."""
    if stored_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


@dataclass
class ArraySpec:
    """One sample-axis array: its per-sample shape, dtype and dimension names (after ``sample``)."""

    name: str  # path inside the store, e.g. "vlm/resid_post" or "episode"
    shape: tuple[int, ...]
    dtype: str  # numpy dtype as stored
    dims: tuple[str, ...]
    stored_dtype: str | None = None  # "bfloat16" when dtype is its uint16 bit pattern
    attrs: dict[str, Any] = field(default_factory=dict)
    chunk_inner: tuple[int, ...] | None = None  # chunk of the per-sample dims (default: whole)

    def per_sample_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def choose_chunk_samples(specs: list[ArraySpec], multiple_of: int = 1) -> int:
    """Samples per chunk: ~4 MiB for the largest per-layer slice, capped, a multiple of the batch size."""
    largest = 1
    for s in specs:
        inner = s.chunk_inner or s.shape
        largest = max(largest, int(np.prod(inner, dtype=np.int64)) * np.dtype(s.dtype).itemsize)
    n = max(1, min(MAX_CHUNK_SAMPLES, CHUNK_TARGET_BYTES // largest))
    return max(multiple_of, (n // multiple_of) * multiple_of)


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``.NAME.lock`` beside the store, held for the whole run.

    Taken before anything is created, truncated or replaced, so a second ``extract`` (create, --resume or
    --overwrite) fails with one line naming the holder instead of interleaving with it.  The lock file holds
    the holder's pid and host and is removed on release; the OS drops the lock if the holder dies.
    """

    def __init__(self, store: Path):
        self.path = store.parent / f".{store.name}.lock"
        self.store = store
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ToolkitError(f"cannot create {self.store}: {e.strerror} ({self.store.parent})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ToolkitError(f"cannot write {self.store}: {e.strerror} ({self.store.parent}); pick a "
                                   "writable --store") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ToolkitError(f"{self.store} is being written by {holder}; wait for that run to finish "
                                   "(or stop it) and use --resume") from None
            try:  # the file may have been released and unlinked between open and flock: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# How often a long run commits at the latest (a kill loses at most this much work); environment overrides.
COMMIT_SECONDS = float(os.environ.get("TOOLKIT_COMMIT_SECONDS", 60))
COMMIT_SAMPLES = int(os.environ.get("TOOLKIT_COMMIT_SAMPLES", 0)) or None  # default: one chunk


class StoreWriter:
    """Writes sample batches into a store from a background thread with a bounded queue.

    ``mode``: "create" (the path must not exist), "overwrite" (replace it) or "resume" (continue an
    existing store from its last committed sample).  ``spec``: the run's options that change the stored
    bytes (recorded at creation; a resume with any other value is refused, naming the first difference).
    The writer holds the store's lock (``StoreLock``) from construction until ``close``/``abort``/``release``.
    """

    # None: the store location's own lock (StoreLock locally, a lease on object stores); toolkit.run.ray's
    # unit writers write under their driver's lock instead
    lock_class: type | None = None

    def __init__(self, path: str | Path, mode: str = "create", codec: str = "auto",
                 spec: dict[str, Any] | None = None):
        self.path = store_target(path)  # a Path, or the URL of an object-store prefix
        self.loc = location(self.path)
        self.codec = codec
        compressors_for(codec, "")  # validate early
        self.spec = jsonable(spec) if spec is not None else None
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

    def _open(self, mode: str) -> None:
        loc = self.loc
        if mode == "resume" and loc.exists():
            if not loc.exists("zarr.json"):
                if loc.partial_upload():
                    raise ToolkitError(f"cannot resume: the creation of {self.path} was interrupted before any sample "
                                       "was stored; start it again with --overwrite")
                raise ToolkitError(f"cannot resume: {self.path} is not a store; remove it or pick another --store")
            self.root = zarr.open_group(loc.zarr_target(), mode="r+", zarr_format=3, use_consolidated=False)
            if self.root.attrs.get("format") != FORMAT:
                raise ToolkitError(f"{self.path} is not a toolkit store (no '{FORMAT}' format attribute)")
            stored = self.root.attrs.get("run_spec")
            if self.codec == "auto":  # the default continues the store's recorded codec (its arrays keep theirs)
                self.codec = str(self.root.attrs.get("codec", "zstd"))
                if isinstance(self.spec, dict) and "codec" in self.spec:
                    self.spec["codec"] = self.codec
            if stored is not None and self.spec is not None:
                diff = first_difference(stored, self.spec)
                if diff:
                    key, old, new = diff
                    raise ToolkitError(f"cannot resume {self.path}: it was made with {key}={old!r}, this run uses "
                                       f"{key}={new!r}; rerun with the store's options or use --overwrite")
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
                   group_attrs: dict[str, dict[str, Any]] | None = None) -> None:
        """Create the store's arrays (or check a resumed store has the same ones) and start writing.

        ``static`` holds fixed coordinate arrays (e.g. ``vlm/layer``); ``coordinates`` names the per-sample
        arrays that are coordinates and are repeated in every site group; ``group_attrs`` are each site
        group's attributes.
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
            extra = sorted(set(n for n, _ in _sample_arrays(self.root)) - set(self.specs))
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
            self.chunk_samples = chunk_samples or choose_chunk_samples(specs, batch_size)
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
            self.root = zarr.open_group(self.loc.zarr_target(), mode="r+", zarr_format=3, use_consolidated=False)
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
                compressors=compressors_for(self.codec if s.dtype != "str" else "zstd", s.stored_dtype or s.dtype),
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
        for name, arr in _sample_arrays(self.root):
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
                self._queue.put(("close", complete))
                self._thread.join()
                self._thread = None
            if self.defer_commits and not complete and self._error is None:
                self._truncate(self.committed)
            self._check()
        finally:
            if release:
                self.release()

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
                plan = _plan(arr)
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

    def _submit_chunks(self, arr, plan: _ChunkPlan, a: int, values: np.ndarray) -> list:
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
            futures.append(self._pool.submit(_write_chunk, folder + plan.meta.encode_chunk_key(coords),
                                             values[region], plan))
        return futures


WRITE_WORKERS = min(4, os.cpu_count() or 1)


def _block_buffer(n: int, spec: ArraySpec) -> np.ndarray:
    """A block buffer of ``n`` samples, indexed sample first like the batches copied into it.  Arrays chunked
    ``(N samples, 1 layer, all the rest)`` get layer-major memory behind that view, so each chunk of a block is
    one contiguous run that is checksummed and written as it lies (no gather into a copy per chunk)."""
    inner = spec.chunk_inner or spec.shape
    if spec.shape and spec.shape[0] > 1 and inner[0] == 1 and tuple(inner[1:]) == tuple(spec.shape[1:]):
        return np.moveaxis(np.empty((spec.shape[0], n, *spec.shape[1:]), dtype=_np_dtype(spec.dtype)), 0, 1)
    return np.empty((n, *spec.shape), dtype=_np_dtype(spec.dtype))


def _write_chunk(path: str, values: np.ndarray, plan: _ChunkPlan) -> None:
    """Encode one chunk (padded to the full chunk shape with the fill value 0) and write it the way zarr's
    local store does: a temporary ``.partial`` file renamed into place (object stores: one PUT by key)."""
    if values.shape != plan.chunks:
        full = np.zeros(plan.chunks, dtype=plan.dtype)
        full[tuple(slice(0, n) for n in values.shape)] = values
        values = full
    parts = encode_chunk(values.astype(plan.dtype, copy=False), plan.codecs)
    if plan.root is None:  # an object store: one PUT of the whole chunk (``path`` is its key)
        _set_key(plan.store, path, b"".join(bytes(p) for p in parts))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(tmp, "wb") as f:
            f.writelines(parts)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first place where two JSON values differ: (dotted key, old, new), or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            d = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if d:
                return d
        return None
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(v, (dict, list)) for v in old + new)):  # lists of plain values are named whole
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{key}[{i}]")
            if d:
                return d
        return None
    return None if old == new else (key, old, new)


def _node_metadata(loc, prefix: str = "") -> dict[str, Any]:
    """Every node's ``zarr.json`` under a group, keyed by its path (arrays' chunk folders are not walked)."""
    out: dict[str, Any] = {}
    for name in loc.children(prefix):
        raw = loc.get(f"{prefix}{name}/zarr.json")
        if raw is None:
            continue
        key = f"{prefix}{name}"
        meta = json.loads(raw)
        if meta.get("node_type") == "group":
            meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
            out[key] = meta
            out.update(_node_metadata(loc, key + "/"))
        else:
            out[key] = meta
    return out


def write_consolidated(target: Any, n: int, complete: bool) -> None:
    """The commit point: rewrite the root ``zarr.json`` atomically with ``n_samples``/``complete`` and the
    consolidated metadata of every node, sample-axis arrays cut to ``n`` samples.  Readers that use it
    (``Store``, ``xarray.open_zarr``/``open_datatree`` by default) see exactly the committed prefix, even while
    the writer has grown the arrays for the next block.  Each site group gets its own consolidated snapshot
    first, for ``xarray.open_zarr(path, group=SITE)``.  ``target``: a store path, URL or ``Location`` (locally a
    rename makes the rewrite atomic, on an object store a single PUT does)."""
    loc = target if hasattr(target, "children") else location(target)
    nodes = _node_metadata(loc)
    for meta in nodes.values():
        if meta.get("node_type") == "array" and (meta.get("dimension_names") or [None])[0] == SAMPLE:
            meta["shape"] = [min(n, meta["shape"][0]), *meta["shape"][1:]]
    raw = loc.get("zarr.json")
    if raw is None:
        raise ToolkitError(f"{loc.url} lost its root zarr.json while being written; use --overwrite")
    root = json.loads(raw)
    for key, meta in nodes.items():
        if meta.get("node_type") == "group" and "/" not in key:
            inner = {k[len(key) + 1:]: v for k, v in nodes.items() if k.startswith(key + "/")}
            group = {**{k: v for k, v in meta.items() if k != "consolidated_metadata"},
                     "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": inner}}
            loc.put(f"{key}/zarr.json", json.dumps(group, indent=2).encode())
    root["attributes"].update(n_samples=n, complete=complete)
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": nodes}
    loc.put("zarr.json", json.dumps(root, indent=2).encode())


def _np_dtype(dtype: str):
    return object if dtype == "str" else np.dtype(dtype)


def _sample_arrays(group) -> list[tuple[str, Any]]:
    out = []
    for name, arr in group.arrays():
        if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == SAMPLE:
            out.append((name, arr))
    for name, sub in group.groups():
        out += [(f"{name}/{n}", a) for n, a in _sample_arrays(sub)]
    return out


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# --------------------------------------------------------------------------- checked chunk reads


class CorruptStoreError(ToolkitError):
    """A chunk inside the committed range is missing, truncated or fails its checksum (one line, CLI exit 2).

    ``key`` (e.g. ``vlm/resid_post/c/3/0/0/0``), ``samples`` (first, last) and ``reason`` say which and why."""

    def __init__(self, message: str, key: str = "", samples: tuple[int, int] = (0, -1), reason: str = ""):
        super().__init__(message)
        self.key, self.samples, self.reason = key, samples, reason


def _local_root(arr) -> Path | None:
    store = arr.store_path.store
    root = getattr(store, "root", None)
    return Path(root) if root is not None else None


def _store_name(arr) -> str:
    """The store's path or URL, for messages (never credentials: fsspec URLs carry none)."""
    root = _local_root(arr)
    if root is not None:
        return str(root)
    store = arr.store_path.store
    fs, path = getattr(store, "fs", None), getattr(store, "path", "")
    protocol = getattr(fs, "protocol", "") if fs is not None else ""
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{path}" if protocol else str(store)


# Key access for stores that are not local directories (object stores), through zarr's own store object.
def _get_key(store, key: str) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _set_key(store, key: str, data: bytes) -> None:
    from zarr.core.buffer import cpu
    from zarr.core.sync import sync

    sync(store.set(key, cpu.Buffer.from_bytes(data)))


def _chunk_present(arr, coords: tuple[int, ...]) -> bool:
    root = _local_root(arr)
    if root is not None:
        return (root / chunk_key(arr, coords)).is_file()
    from zarr.core.sync import sync

    return bool(sync(arr.store_path.store.exists(chunk_key(arr, coords))))


def chunk_key(arr, coords: tuple[int, ...]) -> str:
    """``vlm/resid_post/c/3/0/0/0``: the chunk's key inside the store."""
    return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(tuple(coords))}"


def corrupt_error(arr, coords: tuple[int, ...], reason: str) -> CorruptStoreError:
    root = _store_name(arr)
    a = coords[0] * arr.chunks[0]
    b = min(a + arr.chunks[0], arr.shape[0]) - 1
    return CorruptStoreError(f"{root}: chunk {chunk_key(arr, coords)} (samples {a}-{b}) is {reason}; run "
                             f"`toolkit verify {root}` to list every bad chunk (`--repair` re-extracts them)",
                             chunk_key(arr, coords), (a, b), reason)


_CRC32C_RESIDUE = 0x48674BC7


def _crc32c(buf: Any) -> int:
    """crc32c of any buffer (bytes, memoryview, contiguous array) without copying it; releases the GIL."""
    import crc32c

    return crc32c.crc32c(buf)


_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass
class _ChunkPlan:
    """What direct chunk I/O of one array needs, worked out once per array version (not per chunk: that cost
    ~1 ms a call): the chunk files' folder, the numcodecs chain (innermost first for encoding), dtype and grid."""

    meta: Any  # the zarr metadata this plan was made for (kept so its id stays unique in the cache)
    store: Any
    root: str | None  # the local store folder; None: another store (object storage), read/written by key
    prefix: str  # "vlm/resid_post/"
    codecs: list | None  # numcodecs objects and "crc32c", in encoding order; None: go through zarr
    dtype: np.dtype
    chunks: tuple[int, ...]
    shape: tuple[int, ...]
    fill_value: Any


_PLANS: dict[tuple[int, int], _ChunkPlan] = {}


def _plan(arr) -> _ChunkPlan:
    """The cached ``_ChunkPlan`` of a zarr array (a resize makes new metadata, so a new plan)."""
    meta, store = arr.metadata, arr.store_path.store
    key = (id(meta), id(store))
    plan = _PLANS.get(key)
    if plan is None or plan.meta is not meta or plan.store is not store:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        root = _local_root(arr)
        dtype = np.dtype(meta.dtype.to_native_dtype()) if getattr(meta.dtype, "to_native_dtype", None) else None
        plan = _ChunkPlan(meta, store, None if root is None else str(root), f"{arr.store_path.path}/",
                          _numcodecs_chain(meta), dtype, tuple(arr.chunks),
                          tuple(arr.shape), getattr(meta, "fill_value", None))
        _PLANS[key] = plan
    return plan


def _numcodecs_chain(meta) -> list | None:
    """numcodecs-style codecs for the layouts this package writes (little-endian bytes, then zstd/blosc, then
    crc32c), in encoding order; None for anything else (read and written through zarr).  Configured exactly as
    zarr configures them, so a chunk encoded here is byte-identical to zarr's."""
    if getattr(meta, "zarr_format", 3) != 3 or meta.chunk_grid.__class__.__name__ != "RegularChunkGrid":
        return None
    codecs = list(meta.codecs)
    if not codecs or codecs[0].__class__.__name__ != "BytesCodec" or getattr(meta.dtype, "to_native_dtype", None) is None:
        return None
    if np.dtype(meta.dtype.to_native_dtype()).kind not in "biuf":
        return None
    endian = getattr(codecs[0], "endian", None)
    if endian is not None and getattr(endian, "value", endian) != "little":
        return None
    out: list = []
    for c in codecs[1:]:
        name = c.__class__.__name__
        if name == "Crc32cCodec":
            out.append("crc32c")
        elif name == "ZstdCodec":
            import numcodecs

            out.append(numcodecs.Zstd.from_config({"level": c.level, "checksum": c.checksum}))
        elif name == "BloscCodec":
            import numcodecs

            shuffle = getattr(c.shuffle, "name", c.shuffle)
            out.append(numcodecs.Blosc.from_config({"cname": getattr(c.cname, "name", c.cname), "clevel": c.clevel,
                                                    "shuffle": _BLOSC_SHUFFLE[shuffle], "blocksize": c.blocksize,
                                                    "typesize": c.typesize}))
        else:
            return None
    return out


def _fast_decoders(arr) -> list | None:
    """The decoding chain of ``_plan`` (innermost last), or None where reads go through zarr."""
    codecs = _plan(arr).codecs
    return None if codecs is None else codecs[::-1]


def encode_chunk(block: np.ndarray, codecs: list) -> list[Any]:
    """One full chunk as stored, in parts to write one after the other (no copy to join them): little-endian
    values through the chain (numcodecs and crc32c release the GIL, so a thread pool encodes chunks in
    parallel)."""
    data: Any = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    parts: list[Any] = []
    for c in codecs:
        if c == "crc32c":  # zarr's crc32c codec appends the checksum of everything before it, little-endian
            data = b"".join(parts) + bytes(data) if parts else data
            parts = [data, _crc32c(data).to_bytes(4, "little")]
            data = b""
        else:
            data = c.encode(b"".join(parts) + bytes(data) if parts else data)
            parts = []
    return parts + ([bytes(data)] if len(data) else [])


def _chunk_region(arr, coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, arr.chunks, arr.shape))


def read_chunk(array, chunk: int | tuple[int, ...]) -> np.ndarray:
    """One chunk of an array, checked: its values as stored, cut to the array's (committed) shape.

    ``chunk`` is the chunk's grid position (missing trailing positions are 0, so ``(c, layer_pos)`` reads
    sample-chunk ``c`` of one layer of a ``(sample, layer, ...)`` array).  A missing chunk, a short one, a
    checksum mismatch or a decoding failure raises ``CorruptStoreError`` naming the array and the chunk key.
    Local stores written by this package are read as files and decoded directly (no zarr per-chunk overhead).
    """
    arr = array.zarr if isinstance(array, CheckedArray) else array
    plan = _plan(arr)
    coords = (chunk,) if isinstance(chunk, (int, np.integer)) else tuple(chunk)
    coords = tuple(int(c) for c in coords) + (0,) * (len(plan.chunks) - len(coords))
    region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, plan.chunks, plan.shape))
    if any(r.start >= r.stop for r in region):
        raise ToolkitError(f"chunk {coords} lies outside {arr.store_path.path} (shape {arr.shape})")
    if plan.codecs is None:
        if not _chunk_present(arr, coords):
            raise corrupt_error(arr, coords, "missing")
        try:
            return np.asarray(arr[region])
        except (IndexError, TypeError, KeyError):
            raise
        except Exception as e:
            raise corrupt_error(arr, coords, f"unreadable ({type(e).__name__}: {_first_line(e)})") from None
    key = plan.prefix + plan.meta.encode_chunk_key(coords)
    if plan.root is None:
        data = _get_key(plan.store, key)
        if data is None:
            raise corrupt_error(arr, coords, "missing")
    else:
        try:
            with open(os.path.join(plan.root, key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise corrupt_error(arr, coords, "missing") from None
    for d in reversed(plan.codecs):
        if d == "crc32c":
            # A crc32c followed by its own little-endian checksum always has the same crc32c (the residue):
            # checked in one pass, without copying the body out first.
            if len(data) < 4 or _crc32c(data) != _CRC32C_RESIDUE:
                raise corrupt_error(arr, coords, f"damaged (crc32c checksum mismatch, {len(data)} bytes)")
            data = memoryview(data)[:-4]
        else:
            try:
                data = d.decode(data)
            except Exception as e:
                raise corrupt_error(arr, coords, f"undecodable ({_first_line(e)})") from None
    if len(data) != int(np.prod(plan.chunks)) * plan.dtype.itemsize:
        raise corrupt_error(arr, coords, f"the wrong size ({len(data)} bytes decoded)")
    out = np.frombuffer(data, dtype=plan.dtype).reshape(plan.chunks)
    local = tuple(slice(0, r.stop - r.start) for r in region)
    return out[local]


READ_WORKERS = min(4, os.cpu_count() or 1)


def _decoded_size(codec: Any, buf: memoryview) -> int | None:
    """The size a zstd frame or blosc buffer says it decodes to, from its header (None: not stated), so a chunk is
    decoded into the reader's output only when it fills it exactly."""
    name = getattr(codec, "codec_id", "")
    if name == "blosc" and len(buf) >= 16:  # blosc header: version, versionlz, flags, typesize, nbytes (int32 LE)
        return int.from_bytes(buf[4:8], "little")
    if name == "zstd" and len(buf) >= 6 and bytes(buf[:4]) == b"\x28\xb5\x2f\xfd":  # RFC 8878 frame header
        descriptor = buf[4]
        single_segment = (descriptor >> 5) & 1
        width = (single_segment, 2, 4, 8)[descriptor >> 6]
        pos = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
        if width and len(buf) >= pos + width:
            return int.from_bytes(buf[pos:pos + width], "little") + (256 if width == 2 else 0)
    return None


def read_samples(array, start: int, stop: int, layer_pos: int | None = None, workers: int | None = None,
                 ) -> np.ndarray:
    """Samples ``[start, stop)`` of an array, of one position along its second axis (``layer_pos``) or all, as
    stored: every chunk checked (crc32c) and decoded by a small thread pool straight into the output (file reads,
    crc32c and zstd/blosc release the GIL); whole chunks are read (uncompressed) or decoded (zstd/blosc) into the
    output and checked there, the rest go through ``read_chunk``."""
    arr = array.zarr if isinstance(array, CheckedArray) else array
    start, stop = max(0, start), min(stop, arr.shape[0])
    rest = arr.shape[2:] if layer_pos is not None else arr.shape[1:]
    out = np.empty((max(0, stop - start), *rest), dtype=np.dtype(arr.metadata.dtype.to_native_dtype()))
    if stop <= start:
        return out
    cs = arr.chunks
    axes = [range(start // cs[0], -(-stop // cs[0]))]
    if arr.ndim > 1:
        axes.append([layer_pos // cs[1]] if layer_pos is not None else range(-(-arr.shape[1] // cs[1])))
    axes += [range(-(-n // c)) for n, c in zip(arr.shape[2:], cs[2:])]

    plan = _plan(arr)
    # Chunks that land whole and contiguous in `out` go straight into it: uncompressed ones are read into it and
    # checked there (one copy, like a memmap read), compressed ones are checked and decoded into it (no decoded
    # copy); any failure is re-read through read_chunk, which names the problem.
    direct = (plan.root is not None and plan.codecs is not None and plan.codecs[-1:] == ["crc32c"]
              and len(plan.codecs) <= 2 and arr.ndim > 1 and cs[2:] == tuple(arr.shape[2:])
              and (cs[1] == 1 if layer_pos is not None else cs[1] == arr.shape[1]))

    def read_into(coords: tuple[int, ...], view: np.ndarray) -> bool:
        path = os.path.join(plan.root, plan.prefix + plan.meta.encode_chunk_key(coords))
        try:
            with open(path, "rb") as f:
                if len(plan.codecs) == 1:
                    got = f.readinto(memoryview(view).cast("B"))
                    tail = f.read(5)
                    return got == view.nbytes and len(tail) == 4 and _crc32c(view) == int.from_bytes(tail, "little")
                data = f.read()
            if len(data) < 4 or _crc32c(data) != _CRC32C_RESIDUE:
                return False
            body = memoryview(data)[:-4]
            if _decoded_size(plan.codecs[0], body) != view.nbytes:
                return False
            plan.codecs[0].decode(body, out=view)
            return True
        except Exception:  # unreadable or undecodable: read_chunk says which
            return False

    def place(coords: tuple[int, ...]) -> None:
        if direct:
            lo = coords[0] * cs[0]
            if lo >= start and lo + cs[0] <= stop and read_into(coords, out[lo - start:lo - start + cs[0]]):
                return
        block = read_chunk(arr, coords)
        region = _chunk_region(arr, coords)
        lo, hi = max(region[0].start, start), min(region[0].stop, stop)
        src: list[Any] = [slice(lo - region[0].start, hi - region[0].start)]
        dst: list[Any] = [slice(lo - start, hi - start)]
        for d, r in enumerate(region[1:], start=1):
            if d == 1 and layer_pos is not None:
                src.append(layer_pos - r.start)
            else:
                src.append(slice(None))
                dst.append(r)
        out[tuple(dst)] = block[tuple(src)]

    jobs = list(itertools.product(*axes))
    n = min(workers or READ_WORKERS, len(jobs))
    if n <= 1:
        for coords in jobs:
            place(coords)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(place, c) for c in jobs]:
                f.result()
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _touched(sel: Any, size: int, chunk: int) -> list[int]:
    """Chunk indices along one axis that a basic or integer-array selection touches."""
    n_chunks = -(-size // chunk)
    if isinstance(sel, slice):
        start, stop, step = sel.indices(size)
        if (stop - start) * step <= 0:
            return []
        last = start + ((stop - start - (1 if step > 0 else -1)) // step) * step
        lo, hi = sorted((start, last))
        return list(range(lo // chunk, hi // chunk + 1))
    if isinstance(sel, (int, np.integer)):
        return [(int(sel) % size) // chunk] if size else []
    a = np.asarray(sel)
    if a.dtype == bool:
        a = np.nonzero(a)[0]
    if a.dtype.kind in "iu":
        return sorted({int(v) // chunk for v in (a.ravel() % size if size else a.ravel())})
    return list(range(n_chunks))


class CheckedArray:
    """A zarr array whose reads are checked chunk by chunk (see ``read_chunk``); everything else is zarr's.

    Slicing checks that every touched chunk exists (zarr would hand back fill values for a missing one), then
    reads through zarr; a checksum or decoding failure is traced to its chunk and raised as
    ``CorruptStoreError``.
    """

    def __init__(self, arr):
        self.zarr = arr

    def __getattr__(self, name: str):
        return getattr(self.zarr, name)

    def __len__(self) -> int:
        return self.zarr.shape[0]

    def chunks_touched(self, sel: Any) -> list[tuple[int, ...]]:
        sel = sel if isinstance(sel, tuple) else (sel,)
        if any(s is Ellipsis for s in sel):
            i = next(i for i, s in enumerate(sel) if s is Ellipsis)
            sel = sel[:i] + (slice(None),) * (self.zarr.ndim - len(sel) + 1) + sel[i + 1:]
        sel = sel + (slice(None),) * (self.zarr.ndim - len(sel))
        per_axis = [_touched(s, n, c) for s, n, c in zip(sel, self.zarr.shape, self.zarr.chunks)]
        return list(itertools.product(*per_axis))

    def __getitem__(self, sel: Any) -> np.ndarray:
        touched = self.chunks_touched(sel)
        root = _store_name(self.zarr)
        for coords in touched:
            if not _chunk_present(self.zarr, coords):
                raise corrupt_error(self.zarr, coords, "missing")
        try:
            return self.zarr[sel]
        except (IndexError, TypeError, KeyError):
            raise
        except Exception as e:
            for coords in touched:  # find the chunk to blame
                read_chunk(self.zarr, coords)
            raise CorruptStoreError(f"reading {self.zarr.store_path.path} of {root} failed ({type(e).__name__}: "
                                    f"{_first_line(e)}); run `toolkit verify {root}`") from None


# --------------------------------------------------------------------------- reading


class Store:
    """Read access to a store: coordinates, sites, and decoded activation slices."""

    def __init__(self, path: str | Path, warn_incomplete: bool = True):
        self.path = store_target(path)  # a Path, or an object-store URL
        self.loc = location(self.path)
        if not self.loc.exists("zarr.json"):
            raise ToolkitError(f"{self.path} is not a store (no zarr.json); create one with `toolkit extract`")
        # The root's consolidated metadata is the committed snapshot (see StoreWriter.commit): shapes and
        # n_samples read together, so a store being written reads as its committed prefix.
        self.root = zarr.open_group(self.loc.zarr_target(), mode="r", zarr_format=3)
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ToolkitError(f"{self.path} is a Zarr store but not a toolkit store (no '{FORMAT}' attribute)")
        self.n_samples = int(self.attrs.get("n_samples", 0))
        if warn_incomplete and not self.complete:
            warnings.warn(f"{self.path} is incomplete: {self.n_samples} samples are committed (a run is writing it "
                          "or was interrupted; its extract command with --resume completes it); using those only",
                          stacklevel=2)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def sites(self) -> list[str]:
        return list(self.attrs.get("sites", []))

    def streams(self, site: str) -> list[str]:
        self._check_site(site)
        coords = set(self.attrs.get("coordinates", "").split())
        return sorted(n for n, a in self.root[site].arrays()
                      if a.metadata.dimension_names[0] == SAMPLE and n not in coords)

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise ToolkitError(f"store has no site {site!r}; sites: {', '.join(self.sites)}")

    def array(self, site: str, stream: str) -> CheckedArray:
        """A site's stream as stored (a zarr array whose reads are checked, see ``CheckedArray``)."""
        self._check_site(site)
        if stream not in self.streams(site):
            raise ToolkitError(f"site {site!r} has no stream {stream!r}; streams: {', '.join(self.streams(site))}")
        return CheckedArray(self.root[f"{site}/{stream}"])

    def dims(self, site: str, stream: str) -> tuple[str, ...]:
        return tuple(self.array(site, stream).metadata.dimension_names)

    def layers(self, site: str) -> list[int]:
        self._check_site(site)
        return [int(v) for v in self.root[f"{site}/layer"][:]]

    def static(self, name: str) -> np.ndarray:
        return self.root[name][...]

    def coord(self, name: str) -> np.ndarray:
        """A per-sample array (coordinate or field) from the root, cut to the committed samples."""
        try:
            arr = CheckedArray(self.root[name])
        except KeyError:
            raise ToolkitError(f"store has no per-sample field {name!r}; fields: {', '.join(self.fields())}") from None
        return decode(arr[: self.n_samples], arr.attrs.get("stored_dtype"))

    def fields(self) -> list[str]:
        return sorted(n for n, a in self.root.arrays() if a.metadata.dimension_names[0] == SAMPLE)

    def read(self, site: str, stream: str, layer: int | None = None, samples: slice | np.ndarray | None = None,
             ) -> np.ndarray:
        """Decoded values of one stream; ``layer`` is a model layer index (not a position).

        A run of samples (all, or a unit-step slice) is read chunk by chunk in parallel (``read_samples``);
        other selections go through zarr, checked (``CheckedArray``)."""
        arr = self.array(site, stream)
        pos = None
        if layer is not None:
            layers = self.layers(site)
            if layer not in layers:
                raise ToolkitError(f"site {site!r} holds layers {_ranges(layers)}, not {layer}")
            pos = layers.index(layer)
        if samples is None or (isinstance(samples, slice) and samples.step in (None, 1)):
            a, b, _ = (samples or slice(None)).indices(self.n_samples)
            values = read_samples(arr, a, b, pos)
        else:
            values = arr[(samples,) if pos is None else (samples, pos)]
        return decode(values, arr.attrs.get("stored_dtype"))

    def dataset(self, site: str):
        """One site as a lazy ``xarray.Dataset``: its streams as dask arrays over checked chunk reads (a bad
        chunk raises ``CorruptStoreError`` when computed), cut to the committed samples, bfloat16 as ml_dtypes'
        ``bfloat16`` (zero-copy); per-sample coordinates, ``layer``/``token``/``denoise`` and ``t`` as coordinates."""
        try:
            import dask.array as da
            import xarray as xr
        except ImportError:
            raise ToolkitError("Store.dataset needs xarray and dask: pip install 'toolkit[analysis]'") from None
        self._check_site(site)
        group = self.root[site]
        n = self.n_samples
        coords: dict[str, Any] = {c: ((SAMPLE,), self.coord(c)) for c in self.attrs.get("coordinates", "").split()
                                  if c in self.fields()}
        for name, arr in group.arrays():
            if (arr.metadata.dimension_names or (None,))[0] != SAMPLE:
                coords[name] = (tuple(arr.metadata.dimension_names), arr[...])
        data = {}
        for stream in self.streams(site):
            arr = self.array(site, stream)
            lazy = da.from_array(arr, chunks=arr.chunks, name=f"toolkit-{self.path}-{site}-{stream}-{n}",
                                 lock=False, asarray=True, fancy=False)[:n]
            if arr.attrs.get("stored_dtype") == "bfloat16":
                import ml_dtypes

                lazy = lazy.view(ml_dtypes.bfloat16)
            attrs = {k: v for k, v in arr.attrs.items() if k != "coordinates"}
            data[stream] = (tuple(arr.metadata.dimension_names), lazy, attrs)
        return xr.Dataset(data, coords=coords, attrs=dict(group.attrs))

    def summary(self) -> dict[str, Any]:
        """Everything `toolkit info` shows, from the store's own metadata."""
        out: dict[str, Any] = {
            "path": str(self.path),
            "n_samples": self.n_samples,
            "complete": self.complete,
            "toolkit_version": self.attrs.get("toolkit_version"),
            "model": _named(self.attrs.get("model")),
            "dataset": _named(self.attrs.get("dataset")),
            "codec": self.attrs.get("codec"),
            "chunk_samples": self.attrs.get("chunk_samples"),
        }
        if self.n_samples:
            ep = self.coord("episode")
            out["n_episodes"] = int(len(np.unique(ep)))
            if "task" in self.fields():
                out["n_tasks"] = int(len(np.unique(self.coord("task"))))
        out["fields"] = {n: {"dims": list(self.root[n].metadata.dimension_names),
                             "shape": [self.n_samples, *self.root[n].shape[1:]], "dtype": str(self.root[n].dtype)}
                         for n in self.fields()}
        sites = {}
        for site in self.sites:
            streams = {}
            for stream in self.streams(site):
                arr = self.array(site, stream)
                streams[stream] = {
                    "dims": list(arr.metadata.dimension_names),
                    "shape": [self.n_samples, *arr.shape[1:]],
                    "dtype": arr.attrs.get("stored_dtype") or str(arr.dtype),
                    "chunks": list(arr.chunks),
                    "stored_bytes": self.loc.size(f"{site}/{stream}"),
                    "codec": codec_name(arr),
                }
                raw = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize  # the committed samples
                streams[stream]["compression_ratio"] = raw / max(1, self.loc.size(f"{site}/{stream}/c"))
            group = self.root[site]
            info = {"layers": self.layers(site), "streams": streams, **dict(group.attrs)}
            info.pop("coordinates", None)
            if "t" in group:
                info["denoise_t"] = [round(float(v), 6) for v in group["t"][:]]
            sites[site] = info
        out["sites"] = sites
        out["capture"] = self.attrs.get("capture")
        return out


def codec_name(arr) -> str:
    """The ``--codec`` name of an array's compressor, read from its metadata (``auto`` resolves per array)."""
    for c in arr.metadata.codecs:
        name = c.__class__.__name__
        if name == "ZstdCodec":
            return "zstd"
        if name == "BloscCodec":
            return "blosc-lz4" if getattr(c.cname, "name", c.cname) == "lz4" else "blosc"
    return "none"


def _named(value: Any) -> dict[str, Any] | None:
    """Provenance attributes are dicts; a plain string (hand-made or benchmark stores) is just the name."""
    return value if isinstance(value, dict) or value is None else {"name": str(value)}


def _ranges(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def open_store(path: str | Path, warn_incomplete: bool = True) -> Store:
    """Open a store for reading (a warning names the committed count of an incomplete one)."""
    return Store(path, warn_incomplete)
