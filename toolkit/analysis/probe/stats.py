"""One-pass sufficient statistics for ridge, per cross-validation fold, and the chunked reader that feeds them.

A ridge probe needs only XᵀX, XᵀY, Σx, Σy, Σy² and n.  Keeping them per fold means the training
statistics of any fold are "total minus that fold", so one read of the activations serves every fold,
every target (only XᵀY differs) and every λ.  Products run in float32 (fast GEMM) and accumulate in
float64; rows are shifted by a fixed per-cell vector (the first chunk's mean) before the product, so
the huge-mean dimensions of residual streams do not cancel catastrophically when centring later.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from toolkit.analysis.probe.select import Resolved
from toolkit.analysis.parallel import check_scheduler, reduce_tree
from toolkit.store.chunks import read_chunk
from toolkit.store.codecs import decode
from toolkit.store.reader import open_store, Store


@dataclass
class Stats:
    """Sufficient statistics of (x - shift, y) for one group of rows."""

    G: np.ndarray  # (D, D) Σ xxᵀ
    B: np.ndarray  # (D, M) Σ xyᵀ
    sx: np.ndarray  # (D,)
    sy: np.ndarray  # (M,)
    yy: np.ndarray  # (M,) Σ y² per column
    n: float

    @classmethod
    def zeros(cls, d: int, m: int) -> "Stats":
        return cls(np.zeros((d, d)), np.zeros((d, m)), np.zeros(d), np.zeros(m), np.zeros(m), 0.0)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.G += x.T @ x
        self.B += x.T @ y
        self.sx += x.sum(0, dtype=np.float64)
        self.sy += y.sum(0, dtype=np.float64)
        self.yy += np.einsum("ij,ij->j", y, y, dtype=np.float64)
        self.n += len(x)

    def __add__(self, o: "Stats") -> "Stats":
        return Stats(self.G + o.G, self.B + o.B, self.sx + o.sx, self.sy + o.sy, self.yy + o.yy, self.n + o.n)

    def __sub__(self, o: "Stats") -> "Stats":
        return Stats(self.G - o.G, self.B - o.B, self.sx - o.sx, self.sy - o.sy, self.yy - o.yy, self.n - o.n)


def sum_stats(stats: list[Stats]) -> Stats:
    out = stats[0]
    for s in stats[1:]:
        out = out + s
    return out


class FoldStats:
    """Per-outer-fold statistics of one cell (layer × denoising step × step bucket).

    Every row belongs to one outer fold, so any training set of the nested cross-validation is a sum of
    folds.  A storage chunk splits into several folds, and GEMMs on a few dozen rows run far below peak,
    so rows are buffered per fold (a bounded few MB) and multiplied in blocks of ``block_rows``.
    ``shift`` is the vector subtracted from every row (default: the first rows' mean).  ``device`` runs the
    products with torch on that device (float32 products summed in float64 there, like the numpy path), so
    with ``cuda`` the XᵀX accumulation is on the GPU; None keeps numpy.
    """

    def __init__(self, d: int, m: int, n_folds: int, block_rows: int = 2048, shift: np.ndarray | None = None,
                 device: str | None = None):
        self.folds = [Stats.zeros(d, m) for _ in range(n_folds)]
        self.shift = None if shift is None else np.asarray(shift, dtype=np.float32)
        self.block_rows = block_rows
        self.device = device
        self._dev: list | None = None
        if device is not None:
            import torch

            self._dev = [(torch.zeros((d, d), dtype=torch.float64, device=device),
                          torch.zeros((d, m), dtype=torch.float64, device=device)) for _ in range(n_folds)]
        self._buf: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_folds)]
        self._rows = [0] * n_folds

    def add(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> None:
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        for g in np.unique(fold):
            m = fold == g
            self._buf[g].append((x[m], y[m]))
            self._rows[g] += int(m.sum())
            if self._rows[g] >= self.block_rows:
                self._flush(g)

    def _flush(self, g: int) -> None:
        if not self._buf[g]:
            return
        x = np.concatenate([b[0] for b in self._buf[g]])
        y = np.concatenate([b[1] for b in self._buf[g]])
        self._buf[g], self._rows[g] = [], 0
        if self._dev is None:
            self.folds[g].add(x, y)
            return
        import torch

        s, (G, B) = self.folds[g], self._dev[g]
        xt, yt = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        G += (xt.T @ xt).double()
        B += (xt.T @ yt).double()
        s.sx += x.sum(0, dtype=np.float64)
        s.sy += y.sum(0, dtype=np.float64)
        s.yy += np.einsum("ij,ij->j", y, y, dtype=np.float64)
        s.n += len(x)

    def finish(self) -> list[Stats]:
        """Flush the buffers; the per-fold statistics."""
        for g in range(len(self.folds)):
            self._flush(g)
        if self._dev is not None:
            for s, (G, B) in zip(self.folds, self._dev):
                s.G += G.cpu().numpy()
                s.B += B.cpu().numpy()
            self._dev = [(G.zero_(), B.zero_()) for G, B in self._dev]
        return self.folds


CellKey = tuple[int, int]  # (denoising position j, rollout-step bucket b)


@dataclass
class LayerInputs:
    """What accumulating one layer's cell statistics needs besides the activations, per selected row
    (aligned with ``rows``, positions into ``res.rows``): target matrix, outer fold, step bucket."""

    rows: np.ndarray
    Y: np.ndarray  # (len(rows), M) float32
    fold: np.ndarray
    bucket: np.ndarray
    n_folds: int
    n_denoise: int
    shifts: dict[CellKey, np.ndarray]

    def part(self, sel: np.ndarray) -> "LayerInputs":
        return LayerInputs(self.rows[sel], self.Y[sel], self.fold[sel], self.bucket[sel], self.n_folds,
                           self.n_denoise, self.shifts)


def cell_shifts(store: Store, res: Resolved, layer_index: int, n_denoise: int) -> dict[CellKey, np.ndarray]:
    """Per cell, the mean of its rows in the first chunk holding any of them: the fixed shift that keeps the
    huge-mean dimensions of residual streams from cancelling when centring (read once, before any task)."""
    want = set(np.unique(res.bucket).tolist())
    out: dict[CellKey, np.ndarray] = {}
    for pos, X in iter_blocks(store, res, layer_index):
        bk = res.bucket[pos]
        for b in set(np.unique(bk).tolist()) & want:
            m = bk == b
            for j in range(n_denoise):
                out[(j, b)] = X[m, j].mean(0)
        want -= set(np.unique(bk).tolist())
        if not want:
            break
    return out


GROUP_ROWS = 2048  # at least this many rows per chunk group (and at least K·D: see ``group_rows``)


def group_rows(n_folds: int, d: int) -> int:
    """Rows per chunk group: each fold's GEMM gets about D rows, so the D² float64 update per product costs
    no more than the product (measured at D=2048: 2.0 s per 8,192 rows in 400-row products vs 0.7 s in 2,048)."""
    return max(GROUP_ROWS, n_folds * d)


def chunk_groups(store: Store, res: Resolved, rows_per_group: int) -> list[np.ndarray]:
    """Positions into ``res.rows``, split at storage-chunk boundaries into groups of about ``rows_per_group``
    stored samples: the unit of work of ``cell_statistics``, serially and on Dask alike (both sum the same
    float32 products, so they agree to float64 rounding)."""
    cs = int(store.array(res.site, res.stream).chunks[0])
    chunk = res.rows // cs
    per = max(1, rows_per_group // cs)
    group = chunk // per
    cuts = np.flatnonzero(np.diff(group)) + 1
    return np.split(np.arange(len(res.rows)), cuts)


def cell_statistics(store: Store, res: Resolved, layer_index: int, inputs: LayerInputs, device: str | None = None,
                    into: dict[CellKey, FoldStats] | None = None) -> dict[CellKey, list[Stats]]:
    """Per-fold sufficient statistics of every cell of one layer over the rows ``inputs.rows`` (one group of
    storage chunks): the one place both the serial probe and its Dask tasks accumulate.  Partial results over
    disjoint rows add (``add_cell_stats``); ``into`` accumulates into existing FoldStats instead (the serial
    path: no D² allocation per group), flushed at the group's end so the products are the same as a task's."""
    D, M = res.n_features, inputs.Y.shape[1]
    acc = into if into is not None else {}
    for key, shift in inputs.shifts.items():
        if key not in acc:
            acc[key] = FoldStats(D, M, inputs.n_folds, shift=shift, device=device)
    for pos, X in iter_blocks(store, res, layer_index, inputs.rows):
        at = np.searchsorted(inputs.rows, pos)
        f, bk, Y = inputs.fold[at], inputs.bucket[at], inputs.Y[at]
        for b in np.unique(bk):
            m = bk == b
            for j in range(inputs.n_denoise):
                acc[(j, int(b))].add(X[m, j], Y[m], f[m])
    return {key: fs.finish() for key, fs in acc.items()}


def add_cell_stats(p: dict[CellKey, list[Stats]], q: dict[CellKey, list[Stats]]) -> dict[CellKey, list[Stats]]:
    """The statistics of the union of two disjoint row sets (a tree reduction's merge)."""
    return {key: [a + b for a, b in zip(p[key], q[key])] for key in p}


def layer_statistics(store: Store, res: Resolved, layer_index: int, inputs: LayerInputs,
                     device: str | None = None) -> dict[CellKey, list[Stats]]:
    """Every cell's per-fold statistics of one layer, serially: ``cell_statistics`` over each chunk group in
    turn, summed (the Dask path, ``probe_layer_statistics`` below, sums the same groups in a tree)."""
    acc: dict[CellKey, FoldStats] = {}
    out: dict[CellKey, list[Stats]] = {}
    for g in chunk_groups(store, res, group_rows(inputs.n_folds, res.n_features)):
        out = cell_statistics(store, res, layer_index, inputs.part(g), device, into=acc)
    return out


class ChunkReader:
    """Whole (samples × one layer) chunks of a stream, through the store's checked chunk reader.

    zarr's general read path costs about a millisecond per chunk in Python, which dominates a sweep over
    page-cached data; ``toolkit.store.chunks.read_chunk`` reads a chunk file directly and verifies its crc32c
    checksum, so a damaged chunk is an error naming the array and the chunk, never wrong numbers.
    """

    def __init__(self, store: Store, site: str, stream: str):
        self.arr = store.array(site, stream)
        self.chunks = tuple(self.arr.chunks)

    def read(self, chunk: int, layer_pos: int, n: int) -> np.ndarray:
        """The first ``n`` samples of sample-chunk ``chunk`` at layer position ``layer_pos``, as stored."""
        return read_chunk(self.arr, (chunk, layer_pos))[:n, 0]


def iter_blocks(store: Store, res: Resolved, layer_index: int, rows: np.ndarray | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions into res.rows, features (n, n_denoise, D) float32) chunk by chunk for one layer.

    Reads whole storage chunks along the sample axis (one layer each), so memory stays one chunk deep
    however large the store grows.  ``rows`` restricts reading to chunks holding those positions.
    """
    if "reader" not in res.extra:  # opening costs zarr metadata round trips: once per selection
        res.extra["reader"] = ChunkReader(store, res.site, res.stream)
    reader = res.extra["reader"]
    has_denoise = res.denoise_pos is not None
    cs = reader.chunks[0]
    wanted = res.rows if rows is None else res.rows[rows]
    pos_all = np.arange(len(res.rows)) if rows is None else np.asarray(rows)
    li = res.layer_pos[layer_index]
    chunk_ids = np.unique(wanted // cs)
    bounds = np.searchsorted(wanted, np.stack([chunk_ids * cs, (chunk_ids + 1) * cs]))  # rows are sorted
    for c, lo, hi in zip(chunk_ids, bounds[0], bounds[1]):
        a, b = int(c * cs), int(min((c + 1) * cs, store.n_samples))
        pos = pos_all[lo:hi]
        local = wanted[lo:hi] - a
        raw = reader.read(int(c), li, b - a)
        if len(local) != b - a:
            raw = raw[local]
        x = decode(raw, res.stored_dtype)
        if has_denoise:  # (n, denoise, token, feature)
            x = x[:, res.denoise_pos] if len(res.denoise_pos) != x.shape[1] else x
        else:
            x = x[:, None]
        yield pos, pool(x, res.token_pos, res.pool)


def pool(x: np.ndarray, token_pos: list[int], how: str) -> np.ndarray:
    """(n, k, token, feature) -> (n, k, D) float32: the pooled (or concatenated) kept token positions."""
    if len(token_pos) != x.shape[2]:
        x = x[:, :, token_pos]
    if how == "mean":
        out = x.mean(2, dtype=np.float32) if x.shape[2] > 1 else x[:, :, 0]
    elif how == "last":
        out = x[:, :, -1]
    elif how == "first":
        out = x[:, :, 0]
    else:
        out = x.reshape(x.shape[0], x.shape[1], -1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _probe_task(store: Store | str, res, layer_index: int, inputs, device):
    if isinstance(store, str):  # another process: open the store by path
        store = open_store(store, warn_incomplete=False)
    return cell_statistics(store, res, layer_index, inputs, device)


def probe_layer_statistics(store: Store, res, layer_index: int, inputs, scheduler: str, device: str | None = None):
    """The ridge probe's per-fold cell statistics of one layer (what ``layer_statistics`` sums serially) on Dask:
    one task per chunk group (``chunk_groups``, the same groups as the serial path, so both sum identical float32
    products and agree to float64 rounding), each reading through the store's checked chunk reader (threads share
    the open store; other processes open it by path), merged in a pairwise tree.  A task holds one group of
    chunks and its K·(D² + D·M) float64 partial sums."""
    from dataclasses import replace

    import dask

    check_scheduler(scheduler)
    if scheduler in ("threads", "sync"):  # this process: the open store and its reader, shared
        where, bare = store, res
    else:  # other processes: the path, and no open reader in the task graph
        where, bare = str(store.path), replace(res, extra={})
    leaves = [dask.delayed(_probe_task)(where, bare, layer_index, inputs.part(g), device)
              for g in chunk_groups(store, res, group_rows(inputs.n_folds, res.n_features))]
    return reduce_tree(leaves, add_cell_stats, scheduler) if leaves else {}
