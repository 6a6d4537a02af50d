"""Statistics of a store on Dask: per-chunk sufficient statistics as tasks, merged by a tree reduction.

Two users: ``toolkit stats``/``compare`` (moments, histograms) and the ridge probe (per-fold XᵀX, XᵀY, sums,
counts of every cell of a layer: ``toolkit.analysis.probe.stats.probe_layer_statistics``).

Every task reads one chunk of samples of one layer through the store's checked chunk reader (``Store.read`` ->
``read_chunk``: crc32c, missing chunks raise) and reduces it to O(features) numbers (``RunningMoments``: count,
mean, M2, min, max, zero and non-finite counts; or ``Histograms`` counts); partials merge pairwise (Chan et al.
for the moments, sums for the counts).  A worker holds one chunk at a time, so memory is bounded by the chunk
size x the number of workers however large the store.  The results equal the serial path's up to the order of
floating-point additions (relative 1e-10 is tested).

``scheduler``: ``threads`` or ``processes`` (Dask's local schedulers), ``sync`` (one thread, for debugging), or
``tcp://host:port`` (any ``dask.distributed`` scheduler address; its workers need this package and read the store by path).
"""

from __future__ import annotations

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.moments import Histograms, RunningMoments, merge_histograms, merge_moments
from toolkit.store.reader import open_store, Store

LOCAL_SCHEDULERS = ("threads", "processes", "sync")


def check_scheduler(scheduler: str) -> str:
    if scheduler not in LOCAL_SCHEDULERS and "://" not in scheduler:
        raise ToolkitError(f"unknown --scheduler {scheduler!r}: use threads, processes, sync or tcp://host:port")
    return scheduler


def chunk_rows(path: str, site: str, stream: str, layer: int, a: int, b: int) -> np.ndarray:
    """Samples ``[a, b)`` of one layer as (rows, features) float64, read chunk by chunk, checked and decoded.
    The task opens the store itself (a few ms), so it runs in any process that can read the path."""
    x = open_store(path, warn_incomplete=False).read(site, stream, layer, samples=slice(a, b))
    return np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])


def _moments(path, site, stream, layer, a, b, n_features, dead_eps) -> RunningMoments:
    m = RunningMoments(n_features, dead_eps)
    m.update(chunk_rows(path, site, stream, layer, a, b))
    return m




def _histograms(path, site, stream, layer, a, b, lo, hi, bins) -> Histograms:
    h = Histograms(lo, hi, bins)
    h.update(chunk_rows(path, site, stream, layer, a, b))
    return h




def _ranges(store: Store, site: str, stream: str, block: int | None) -> list[tuple[int, int]]:
    step = block or int(store.array(site, stream).chunks[0])
    return [(a, min(store.n_samples, a + step)) for a in range(0, store.n_samples, step)]


def reduce_tree(leaves: list, merge, scheduler: str):
    """Pairwise tree of ``merge`` over the leaf tasks, computed on ``scheduler``."""
    import dask

    level = leaves
    while len(level) > 1:
        level = [dask.delayed(merge)(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    if "://" in scheduler:  # a dask.distributed scheduler (tcp://, tls://, inproc://)
        try:
            from dask.distributed import Client
        except ImportError:
            raise ToolkitError("--scheduler tcp://... needs dask.distributed: pip install 'toolkit[scale]'") from None
        try:
            client = Client(scheduler, timeout=30, set_as_default=False)
        except OSError as e:
            raise ToolkitError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            return client.compute(level[0]).result()
    if scheduler == "threads":  # one BLAS/torch thread per Dask thread, not the whole machine each
        import dask.system

        from toolkit.sdk.compute import threads_each

        with threads_each(dask.system.CPU_COUNT):
            return level[0].compute(scheduler=scheduler)
    return level[0].compute(scheduler=scheduler)


def layer_moments(store: Store, site: str, stream: str, layer: int, dead_eps: float, scheduler: str,
                  block: int | None = None) -> RunningMoments:
    """The per-feature moments of one layer (what ``stats.layer_stats`` accumulates serially), on Dask."""
    import dask

    check_scheduler(scheduler)
    n_features = int(store.array(site, stream).shape[-1])
    path = str(store.path)
    leaves = [dask.delayed(_moments)(path, site, stream, layer, a, b, n_features, dead_eps)
              for a, b in _ranges(store, site, stream, block)]
    return reduce_tree(leaves, merge_moments, scheduler) if leaves else RunningMoments(n_features, dead_eps)


def layer_histograms(store: Store, site: str, stream: str, layer: int, lo: np.ndarray, hi: np.ndarray, bins: int,
                     scheduler: str, block: int | None = None) -> Histograms:
    """Fixed-bin histograms of one layer (what ``stats.compare_layer`` fills serially), on Dask."""
    import dask

    check_scheduler(scheduler)
    path = str(store.path)
    leaves = [dask.delayed(_histograms)(path, site, stream, layer, a, b, lo, hi, bins)
              for a, b in _ranges(store, site, stream, block)]
    return reduce_tree(leaves, merge_histograms, scheduler) if leaves else Histograms(lo, hi, bins)
