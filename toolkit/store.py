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
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from toolkit.errors import ToolkitError

FORMAT = "toolkit-activations"
FORMAT_VERSION = 1
CODECS = ("zstd", "blosc", "none")
CHUNK_TARGET_BYTES = 4 * 2**20
MAX_CHUNK_SAMPLES = 256
SAMPLE = "sample"


def compressors_for(codec: str, stored_dtype: str):
    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=1)]
    if codec == "blosc":  # byte shuffle helps bfloat16 bit patterns most
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]
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


class StoreWriter:
    """Writes sample batches into a store from a background thread with a bounded queue.

    ``mode``: "create" (the path must not exist), "overwrite" (replace it) or "resume" (continue an
    existing store from its last committed sample).
    """

    def __init__(self, path: str | Path, mode: str = "create", codec: str = "zstd"):
        self.path = Path(path)
        self.codec = codec
        compressors_for(codec, "")  # validate early
        self.created = False
        self.overwrite = mode == "overwrite"
        if mode == "resume" and self.path.exists():
            if not (self.path / "zarr.json").exists():
                raise ToolkitError(f"cannot resume: {self.path} is not a store; remove it or pick another --store")
            self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
            if self.root.attrs.get("format") != FORMAT:
                raise ToolkitError(f"{self.path} is not a toolkit store (no '{FORMAT}' format attribute)")
            self.committed = int(self.root.attrs.get("n_samples", 0))
            self._truncate(self.committed)
        else:  # a new store (--resume of a store that was never created starts one too)
            if self.path.exists():
                if mode != "overwrite":
                    raise ToolkitError(f"{self.path} already exists: pass --resume to continue it or --overwrite "
                                       "to replace it")
                if (self.path.is_file() or not ((self.path / "zarr.json").exists() or not any(self.path.iterdir()))):
                    raise ToolkitError(f"refusing to overwrite {self.path}: it exists and is not a zarr store")
            self.root = None
            self.committed = 0
        self.specs: dict[str, ArraySpec] = {}
        self.chunk_samples = 0
        self.bytes_written = 0  # raw bytes the writer thread has written
        self.bytes_added = 0  # raw bytes handed to append (what the progress bar shows)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # True: full blocks are written as they fill but committed (n_samples raised) only by flush() or a
        # complete close(), so a reader or a resume sees whole units (e.g. closed-loop episodes) only.
        self.defer_commits = False

    @property
    def started(self) -> bool:
        """True once ``initialize`` has run and until ``close``."""
        return self._thread is not None

    # creation ------------------------------------------------------------------------------
    def initialize(self, attrs: dict[str, Any], specs: list[ArraySpec], static: dict[str, tuple[tuple[str, ...], Any]],
                   coordinates: list[str], chunk_samples: int | None = None, batch_size: int = 1) -> None:
        """Create the store's arrays (or check a resumed store has the same ones) and start writing.

        ``static`` holds fixed coordinate arrays (e.g. ``vlm/layer``); ``coordinates`` names the
        per-sample arrays that are coordinates and are repeated in every site group.
        """
        sites = sorted({s.name.split("/")[0] for s in specs if "/" in s.name})
        expanded = list(specs)
        for c in coordinates:
            base = next(s for s in specs if s.name == c)
            expanded += [ArraySpec(f"{site}/{c}", base.shape, base.dtype, base.dims, base.stored_dtype, base.attrs)
                         for site in sites]
        self.specs = {s.name: s for s in expanded}
        if self.root is not None:  # resume: same arrays, same shapes
            self.chunk_samples = int(self.root.attrs["chunk_samples"])
            for s in expanded:
                arr = self._array(s.name)
                same_dtype = s.dtype == "str" or str(arr.dtype) == s.dtype if arr is not None else False
                if arr is None or tuple(arr.shape[1:]) != s.shape or not same_dtype:
                    raise ToolkitError(f"cannot resume {self.path}: array {s.name!r} does not match this run's "
                                       "capture (different model, selection or dtype); use --overwrite")
        else:
            self.chunk_samples = chunk_samples or choose_chunk_samples(expanded, batch_size)
            self._create(attrs, expanded, static, coordinates, sites)
        self._sites = sites
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):
            self._free.put({n: np.empty((self.chunk_samples, *s.shape), dtype=_np_dtype(s.dtype))
                            for n, s in self.specs.items()})
        self._current: dict[str, np.ndarray] | None = None
        # Dense activations: skip zarr's per-chunk "all fill value?" scan (a runtime setting, not stored).
        self._arrays = {n: self.root[n].with_config({"write_empty_chunks": True}) for n in self.specs}
        self._filled = 0
        self._block_start = self.committed
        self._thread = threading.Thread(target=self._run, name="toolkit-store-writer", daemon=True)
        self._thread.start()

    def _create(self, attrs, specs, static, coordinates, sites) -> None:
        """Build the store under a temporary name and rename it into place: a run killed while
        creating leaves no half-made store behind, and --overwrite replaces the old one only now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.creating-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.parent / f".{self.path.name}.creating-{os.getpid()}"
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root_attrs = dict(attrs)
        root_attrs.update(format=FORMAT, format_version=FORMAT_VERSION, n_samples=0, complete=False,
                          chunk_samples=self.chunk_samples, codec=self.codec, sites=sites,
                          coordinates=" ".join(coordinates))
        root.attrs.update(jsonable(root_attrs))
        for site in sites:
            root.create_group(site, attributes={"coordinates": " ".join(coordinates)})
        for s in specs:
            inner = s.chunk_inner or s.shape
            extra = {"stored_dtype": s.stored_dtype} if s.stored_dtype else {}
            if s.name.split("/")[-1] not in coordinates:
                extra["coordinates"] = " ".join(coordinates)
            root.create_array(
                s.name, shape=(0, *s.shape), dtype=str if s.dtype == "str" else s.dtype,
                chunks=(self.chunk_samples, *inner), dimension_names=(SAMPLE, *s.dims), fill_value=0,
                compressors=compressors_for(self.codec, s.stored_dtype or s.dtype) if s.dtype != "str" else "auto",
                attributes=jsonable({**s.attrs, **extra}),
            )
        for name, (dims, values) in static.items():
            values = np.asarray(values)
            root.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape or (1,),
                              dimension_names=dims, fill_value=0)
            root[name][...] = values
        if self.path.exists():  # --overwrite, validated in __init__
            shutil.rmtree(self.path)
        os.rename(tmp, self.path)
        self.created = True
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)

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

    # writing -------------------------------------------------------------------------------
    # The caller's thread copies samples into a block buffer (one chunk along `sample`); a full block
    # goes to the writer thread, which writes and commits it while the caller fills the other buffer.
    # Two buffers in all: memory stays flat however long the run.

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

    def _hand_over(self) -> None:
        if self._filled:
            block = ("block", self._block_start, self._filled, self._current, not self.defer_commits)
            self._wait(lambda timeout: self._queue.put(block, timeout=timeout))
            self._block_start += self._filled
            self._filled, self._current = 0, None

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

    def close(self, complete: bool = True) -> None:
        """Write what is buffered, commit it and (if ``complete``) mark the store finished.

        With ``defer_commits`` an incomplete close commits nothing more, and drops the uncommitted tail."""
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

    def abort(self) -> None:
        """Commit what was already added, without marking the store complete (extraction failed)."""
        if self._thread is not None:
            try:
                self.close(complete=False)
            except ToolkitError:
                pass

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, ToolkitError):
                raise err
            raise ToolkitError(f"writing {self.path} failed: {type(err).__name__}: {err}") from err

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item[0] == "close":
                    if item[1] and self._error is None:
                        self.root.attrs["complete"] = True
                    return
                if item[0] == "commit":
                    if self._error is None:
                        self.root.attrs["n_samples"] = item[1]
                        self.committed = item[1]
                    continue
                if self._error is None:  # after a failure, drain without writing
                    self._write_block(*item[1:])
        except BaseException as e:  # surfaced on the caller's thread by _check()
            self._error = e

    def _block_end(self) -> int:
        # Blocks end on chunk boundaries, so every write after the first (possibly partial) one is whole chunks.
        n = self.chunk_samples
        return (self._block_start // n + 1) * n

    def _write_block(self, a: int, filled: int, buffers: dict[str, np.ndarray], commit: bool = True) -> None:
        b = a + filled
        try:
            for n, buf in buffers.items():
                arr = self._arrays[n]
                arr.resize((b, *arr.shape[1:]))
                arr[a:b] = buf[:filled]
                self.bytes_written += buf[:filled].nbytes
            if commit:
                self.root.attrs["n_samples"] = b  # the commit point: written after every array holds the block
                self.committed = b
        finally:
            self._free.put(buffers)


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


# --------------------------------------------------------------------------- reading


class Store:
    """Read access to a store: coordinates, sites, and decoded activation slices."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise ToolkitError(f"{self.path} is not a store (no zarr.json); create one with `toolkit extract`")
        self.root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ToolkitError(f"{self.path} is a Zarr store but not a toolkit store (no '{FORMAT}' attribute)")
        self.n_samples = int(self.attrs.get("n_samples", 0))

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

    def array(self, site: str, stream: str):
        """The raw zarr array of a site's stream (values as stored)."""
        self._check_site(site)
        if stream not in self.streams(site):
            raise ToolkitError(f"site {site!r} has no stream {stream!r}; streams: {', '.join(self.streams(site))}")
        return self.root[f"{site}/{stream}"]

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
            arr = self.root[name]
        except KeyError:
            raise ToolkitError(f"store has no per-sample field {name!r}; fields: {', '.join(self.fields())}") from None
        return decode(arr[: self.n_samples], arr.attrs.get("stored_dtype"))

    def fields(self) -> list[str]:
        return sorted(n for n, a in self.root.arrays() if a.metadata.dimension_names[0] == SAMPLE)

    def read(self, site: str, stream: str, layer: int | None = None, samples: slice | np.ndarray | None = None,
             ) -> np.ndarray:
        """Decoded values of one stream; ``layer`` is a model layer index (not a position)."""
        arr = self.array(site, stream)
        sel: list[Any] = [slice(0, self.n_samples) if samples is None else samples]
        if layer is not None:
            layers = self.layers(site)
            if layer not in layers:
                raise ToolkitError(f"site {site!r} holds layers {_ranges(layers)}, not {layer}")
            sel.append(layers.index(layer))
        return decode(arr[tuple(sel)], arr.attrs.get("stored_dtype"))

    def summary(self) -> dict[str, Any]:
        """Everything `toolkit info` shows, from the store's own metadata."""
        out: dict[str, Any] = {
            "path": str(self.path),
            "n_samples": self.n_samples,
            "complete": self.complete,
            "toolkit_version": self.attrs.get("toolkit_version"),
            "model": self.attrs.get("model"),
            "dataset": self.attrs.get("dataset"),
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
                    "stored_bytes": _stored_bytes(self.path / site / stream),
                }
            group = self.root[site]
            info = {"layers": self.layers(site), "streams": streams, **dict(group.attrs)}
            info.pop("coordinates", None)
            if "t" in group:
                info["denoise_t"] = [round(float(v), 6) for v in group["t"][:]]
            sites[site] = info
        out["sites"] = sites
        out["capture"] = self.attrs.get("capture")
        return out


def _stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ranges(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def open_store(path: str | Path) -> Store:
    """Open a store for reading."""
    return Store(path)
