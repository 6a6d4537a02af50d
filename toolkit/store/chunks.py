"""Checked chunk I/O: every chunk ends with a crc32c checksum, and every read of a sample-axis array goes through
``read_chunk`` / ``read_samples`` (fast readers) or ``CheckedArray`` (zarr-style slicing).  A chunk inside the
committed range that is missing, truncated or fails its checksum raises ``CorruptStoreError``: one line naming the
array, the chunk key and the samples it holds.  Chunks of local stores are read and written as files; chunks on
object storage by key through the store's ``Location``."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.store.codecs import CRC32C_RESIDUE, crc32c, decoded_size, encode_chunk, numcodecs_chain
from toolkit.store.location import Location, location

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


def store_url(arr) -> str:
    """The path or URL of the store an array lives in (never credentials: fsspec URLs carry none)."""
    root = _local_root(arr)
    if root is not None:
        return str(root)
    store = arr.store_path.store
    fs, path = getattr(store, "fs", None), getattr(store, "path", "")
    protocol = getattr(fs, "protocol", "") if fs is not None else ""
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{path}" if protocol else str(store)


def chunk_present(arr, coords: tuple[int, ...]) -> bool:
    plan = chunk_plan(arr)
    if plan.root is not None:
        return os.path.isfile(os.path.join(plan.root, chunk_key(arr, coords)))
    return plan.loc.exists(chunk_key(arr, coords))


def chunk_key(arr, coords: tuple[int, ...]) -> str:
    """``vlm/resid_post/c/3/0/0/0``: the chunk's key inside the store."""
    return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(tuple(coords))}"


def corrupt_error(arr, coords: tuple[int, ...], reason: str) -> CorruptStoreError:
    root = store_url(arr)
    a = coords[0] * arr.chunks[0]
    b = min(a + arr.chunks[0], arr.shape[0]) - 1
    return CorruptStoreError(f"{root}: chunk {chunk_key(arr, coords)} (samples {a}-{b}) is {reason}; run "
                             f"`toolkit verify {root}` to list every bad chunk (`--repair` re-extracts them)",
                             chunk_key(arr, coords), (a, b), reason)


@dataclass
class ChunkPlan:
    """What direct chunk I/O of one array needs, worked out once per array version (not per chunk: that cost
    ~1 ms a call): the chunk files' folder, the numcodecs chain (innermost first for encoding), dtype and grid."""

    meta: Any  # the zarr metadata this plan was made for (kept so its id stays unique in the cache)
    store: Any  # the zarr store object (likewise)
    root: str | None  # the local store folder; None: object storage, read and written by key through ``loc``
    loc: Location | None
    prefix: str  # "vlm/resid_post/"
    codecs: list | None  # numcodecs objects and "crc32c", in encoding order; None: go through zarr
    dtype: np.dtype
    chunks: tuple[int, ...]
    shape: tuple[int, ...]
    fill_value: Any


_PLANS: dict[tuple[int, int], ChunkPlan] = {}


def chunk_plan(arr) -> ChunkPlan:
    """The cached ``ChunkPlan`` of a zarr array (a resize makes new metadata, so a new plan)."""
    meta, store = arr.metadata, arr.store_path.store
    key = (id(meta), id(store))
    plan = _PLANS.get(key)
    if plan is None or plan.meta is not meta or plan.store is not store:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        root = _local_root(arr)
        dtype = np.dtype(meta.dtype.to_native_dtype()) if getattr(meta.dtype, "to_native_dtype", None) else None
        plan = ChunkPlan(meta, store, None if root is None else str(root),
                         None if root is not None else location(store_url(arr)), f"{arr.store_path.path}/",
                         numcodecs_chain(meta), dtype, tuple(arr.chunks), tuple(arr.shape),
                         getattr(meta, "fill_value", None))
        _PLANS[key] = plan
    return plan


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
    plan = chunk_plan(arr)
    coords = (chunk,) if isinstance(chunk, (int, np.integer)) else tuple(chunk)
    coords = tuple(int(c) for c in coords) + (0,) * (len(plan.chunks) - len(coords))
    region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, plan.chunks, plan.shape))
    if any(r.start >= r.stop for r in region):
        raise ToolkitError(f"chunk {coords} lies outside {arr.store_path.path} (shape {arr.shape})")
    if plan.codecs is None:
        if not chunk_present(arr, coords):
            raise corrupt_error(arr, coords, "missing")
        _check_crc(arr, plan, coords)  # strings: zarr would say "Stored and computed checksum do not match: b'..'"
        try:
            return np.asarray(arr[region])
        except (IndexError, TypeError, KeyError):
            raise
        except Exception as e:
            raise corrupt_error(arr, coords, f"unreadable ({type(e).__name__}: {first_line(e)})") from None
    key = plan.prefix + plan.meta.encode_chunk_key(coords)
    summed = None  # the crc32c of ``data`` as read, where the read computed it
    if plan.root is None:
        data = plan.loc.get(key)
        if data is None:
            raise corrupt_error(arr, coords, "missing")
    else:
        try:
            with open(os.path.join(plan.root, key), "rb") as f:
                data, summed = _read_file(f)
        except FileNotFoundError:
            raise corrupt_error(arr, coords, "missing") from None
    for d in reversed(plan.codecs):
        if d == "crc32c":
            # A crc32c followed by its own little-endian checksum always has the same crc32c (the residue):
            # checked in one pass, without copying the body out first (a local file's, as it was read).
            crc, summed = (crc32c(data) if summed is None else summed), None
            if len(data) < 4 or crc != CRC32C_RESIDUE:
                raise corrupt_error(arr, coords, f"damaged (crc32c checksum mismatch, {len(data)} bytes)")
            data = memoryview(data)[:-4]
        else:
            summed = None
            try:
                data = d.decode(data)
            except Exception as e:
                raise corrupt_error(arr, coords, f"undecodable ({first_line(e)})") from None
    if len(data) != int(np.prod(plan.chunks)) * plan.dtype.itemsize:
        raise corrupt_error(arr, coords, f"the wrong size ({len(data)} bytes decoded)")
    out = np.frombuffer(data, dtype=plan.dtype).reshape(plan.chunks)
    local = tuple(slice(0, r.stop - r.start) for r in region)
    return out[local]


def _check_crc(arr, plan: ChunkPlan, coords: tuple[int, ...]) -> None:
    """A chunk read through zarr (strings: vlen-utf8) whose chain ends in crc32c: its checksum, checked first, so a
    damaged one is named like any other (``damaged (crc32c checksum mismatch, N bytes)``)."""
    codecs = list(getattr(arr.metadata, "codecs", ()) or ())
    if not codecs or codecs[-1].__class__.__name__ != "Crc32cCodec":
        return
    key = chunk_key(arr, coords)
    if plan.root is not None:
        try:
            with open(os.path.join(plan.root, key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise corrupt_error(arr, coords, "missing") from None
    else:
        data = plan.loc.get(key)
        if data is None:
            raise corrupt_error(arr, coords, "missing")
    if len(data) < 4 or crc32c(data) != CRC32C_RESIDUE:
        raise corrupt_error(arr, coords, f"damaged (crc32c checksum mismatch, {len(data)} bytes)")


READ_WORKERS = min(4, os.cpu_count() or 1)


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

    plan = chunk_plan(arr)
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
                    return _read_checked(f, memoryview(view).cast("B"))
                data, crc = _read_file(f)
            if len(data) < 4 or crc != CRC32C_RESIDUE:
                return False
            body = memoryview(data)[:-4]
            if decoded_size(plan.codecs[0], body) != view.nbytes:
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


# Uncompressed chunks are read in pieces this size, each checksummed while it is still in the CPU's cache (one pass
# over memory, as a plain read, instead of a read and then a checksum pass).
READ_PIECE = 1 << 20


def _read_summed(f, out: memoryview) -> tuple[int, int]:
    """Fill ``out`` from ``f`` piece by piece, each piece checksummed while it is in cache: (crc32c, bytes read)."""
    crc, at = 0, 0
    while at < len(out):
        got = f.readinto(out[at:at + READ_PIECE])
        if not got:
            break
        crc = crc32c(out[at:at + got], crc)
        at += got
    return crc, at


def _read_file(f) -> tuple[memoryview, int]:
    """A whole open file and its crc32c, read in checksummed pieces into uninitialised memory (a zero-filled
    buffer would cost one more pass over it)."""
    data = memoryview(np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8))
    crc, got = _read_summed(f, data)
    return data[:got], crc  # a file cut short while it was read: its checksum fails


def _read_checked(f, out: memoryview) -> bool:
    """Fill ``out`` from ``f`` and check that exactly a little-endian crc32c of it follows."""
    crc, got = _read_summed(f, out)
    tail = f.read(5)
    return got == len(out) and len(tail) == 4 and crc == int.from_bytes(tail, "little")


def write_chunk(path: str, values: np.ndarray, plan: ChunkPlan) -> None:
    """Encode one chunk (padded to the full chunk shape with the fill value 0) and write it the way zarr's
    local store does: a temporary ``.partial`` file renamed into place (object stores: one PUT by key)."""
    if values.shape != plan.chunks:
        full = np.zeros(plan.chunks, dtype=plan.dtype)
        full[tuple(slice(0, n) for n in values.shape)] = values
        values = full
    parts = encode_chunk(values.astype(plan.dtype, copy=False), plan.codecs)
    if plan.root is None:  # an object store: one PUT of the whole chunk (``path`` is its key)
        plan.loc.put(path, b"".join(bytes(p) for p in parts))
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
        root = store_url(self.zarr)
        for coords in touched:
            if not chunk_present(self.zarr, coords):
                raise corrupt_error(self.zarr, coords, "missing")
        try:
            return self.zarr[sel]
        except (IndexError, TypeError, KeyError):
            raise
        except Exception as e:
            for coords in touched:  # find the chunk to blame
                read_chunk(self.zarr, coords)
            raise CorruptStoreError(f"reading {self.zarr.store_path.path} of {root} failed ({type(e).__name__}: "
                                    f"{first_line(e)}); run `toolkit verify {root}`") from None
