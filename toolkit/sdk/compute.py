"""Compute defaults: how many CPU threads torch (and the BLAS under numpy) may use, and how they wait.

torch sizes its thread pool from the host's core count, not from the CPUs this process may really use; on a
busy 2-core machine the README's main command took 275-308 s with torch's default pool and 12-26 s with one
thread, and beside two busy processes it took 3.6x its idle time with two threads against 1.63x with one (alone,
one thread was only 1.05x slower than two).  OpenMP's threads also spin while they wait for work, which on a
shared machine burns the CPU time the other processes need.  So the default is:

* the CPUs this process may run on (its affinity mask), capped by the cgroup's CPU quota (cgroup v2
  ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up;
* less the CPUs other processes keep busy now (the 1-minute load average, rounded), at least one;
* with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep while they wait), unless the user set it, and OpenBLAS's own
  (pthreads) helpers told to sleep at once (``OPENBLAS_THREAD_TIMEOUT=4``): by default each spins 2^28 cycles
  (~0.1 s) after every multi-threaded GEMM, measured taking ~30 ms of the other core per call and slowing the
  probe's Dask statistics right after a serial pass from 0.36 s to 0.44 s; back-to-back GEMMs (D = 256-2048) ran
  at the same speed with and without it;

and an ``OMP_NUM_THREADS`` the user set, or ``--threads``, always wins.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from toolkit.sdk.errors import ToolkitError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2
CFS_DIRS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"))  # cgroup v1 mount points


def cpu_quota(path: Path = CPU_MAX, v1_dirs: tuple[Path, ...] = CFS_DIRS) -> float | None:
    """CPUs the cgroup may use (``quota / period``), or None when unlimited or unknown: cgroup v2's ``cpu.max``,
    else cgroup v1's CFS quota (-1: unlimited)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return _cfs_quota(v1_dirs)
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _cfs_quota(dirs: tuple[Path, ...]) -> float | None:
    for d in dirs:
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus(cpu_max: Path = CPU_MAX, v1_dirs: tuple[Path, ...] = CFS_DIRS) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cpu_max, v1_dirs)
    return max(1, min(usable, math.ceil(quota)) if quota else usable)


def busy_cpus() -> int:
    """CPUs other processes keep busy now: the 1-minute load average, rounded (0 where unknown)."""
    try:
        return max(0, round(os.getloadavg()[0]))
    except (OSError, AttributeError):
        return 0


def default_threads(cpu_max: Path = CPU_MAX, v1_dirs: tuple[Path, ...] = CFS_DIRS, busy: int | None = None) -> int:
    """``OMP_NUM_THREADS`` if set, else the usable CPUs less the busy ones (``busy_cpus``), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    busy = busy_cpus() if busy is None else busy
    return max(1, usable_cpus(cpu_max, v1_dirs) - busy)


_BLAS = None


def passive_waits() -> None:
    """Idle OpenMP and OpenBLAS threads sleep rather than spin, unless the user set otherwise.  Both runtimes read
    these when they load (torch's OpenMP, numpy's OpenBLAS), so call it before importing them."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles: OpenBLAS's minimum


@contextlib.contextmanager
def threads_each(workers: int) -> Iterator[int]:
    """While ``workers`` threads compute side by side, give each its share of the thread budget: torch and the
    BLAS libraries under numpy get ``budget // workers`` threads (at least 1), restored afterwards.  Without it
    every worker's GEMM or eigh asks for the whole machine and they oversubscribe it (measured: probe statistics
    on 2 Dask threads 0.83 s with 2 BLAS threads each vs 0.64 s with one)."""
    import torch

    global _BLAS
    if _BLAS is None:  # finding the BLAS libraries walks the loaded ones: once per process
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    total = torch.get_num_threads()
    per = max(1, total // max(1, workers))
    torch.set_num_threads(per)
    try:
        with _BLAS.limit(limits=per):
            yield per
    finally:
        torch.set_num_threads(total)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: ``default_threads()``) in torch and, if not yet loaded, the BLAS libraries;
    idle OpenMP and OpenBLAS threads sleep (``passive_waits``) unless the user's environment says otherwise."""
    if n is not None and n < 1:
        raise ToolkitError(f"--threads must be at least 1, got {n}")
    n = n or default_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    passive_waits()
    if "torch" in sys.modules:  # already imported: its pool was sized at import, resize it
        sys.modules["torch"].set_num_threads(n)
    return n
