"""Compute defaults: how many CPU threads torch (and the BLAS under numpy) may use.

torch sizes its thread pool from the host's core count, not from the container's CPU quota; on a
busy 2-core machine the README's main command took 275-308 s with the default pool and 12-26 s with
one thread.  So the default is the cgroup's quota (``/sys/fs/cgroup/cpu.max``), capped by the CPUs
this process may run on, and an ``OMP_NUM_THREADS`` the user set always wins.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from toolkit.sdk.errors import ToolkitError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_quota(path: Path = CPU_MAX) -> float | None:
    """CPUs the cgroup may use (``quota / period``), or None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def default_threads(cpu_max: Path = CPU_MAX) -> int:
    """``OMP_NUM_THREADS`` if set, else min(usable CPUs, the cgroup quota rounded up), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cpu_max)
    return max(1, min(usable, math.ceil(quota)) if quota else usable)


_BLAS = None


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
    """Use ``n`` threads (default: ``default_threads()``) in torch and, if not yet loaded, the BLAS libraries."""
    if n is not None and n < 1:
        raise ToolkitError(f"--threads must be at least 1, got {n}")
    n = n or default_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:  # already imported: its pool was sized at import, resize it
        sys.modules["torch"].set_num_threads(n)
    return n
