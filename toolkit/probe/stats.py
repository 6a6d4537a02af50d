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

from toolkit.probe.select import Resolved
from toolkit.store import Store, decode, read_chunk


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
    """

    def __init__(self, d: int, m: int, n_folds: int, block_rows: int = 2048):
        self.folds = [Stats.zeros(d, m) for _ in range(n_folds)]
        self.shift: np.ndarray | None = None
        self.block_rows = block_rows
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
        if self._buf[g]:
            self.folds[g].add(np.concatenate([b[0] for b in self._buf[g]]),
                              np.concatenate([b[1] for b in self._buf[g]]))
            self._buf[g], self._rows[g] = [], 0

    def finish(self) -> list[Stats]:
        """Flush the buffers; the per-fold statistics."""
        for g in range(len(self.folds)):
            self._flush(g)
        return self.folds


class ChunkReader:
    """Whole (samples × one layer) chunks of a stream, through the store's checked chunk reader.

    zarr's general read path costs about a millisecond per chunk in Python, which dominates a sweep over
    page-cached data; ``toolkit.store.read_chunk`` reads a chunk file directly and verifies its crc32c
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
