"""Threads on a busy machine: the README's main command (tiny pi0 over the embedded LIBERO sample) alone and beside
busy processes, with the toolkit's thread default against the former one and against one thread.

Variants, each a fresh `toolkit extract` process (the command the README's first block runs):

* ``default``: no flag; the toolkit picks the threads (usable CPUs less the busy ones) and passive OpenMP waits;
* ``all-cores``: the former default, every usable CPU with spinning OpenMP waits (``--threads N``,
  ``OMP_WAIT_POLICY=ACTIVE``);
* ``one``: ``--threads 1``.

Loads: ``idle`` (nothing else running) and ``busy`` (as many pure-Python busy loops as usable CPUs, started
``--warmup`` seconds before, so the load average has seen them).  The ratios are each variant's wall time against
the ``default`` variant *alone* (the fair share beside N busy processes on N CPUs is 2x).  Repeats are interleaved
(every variant × load once per round, in a rotated order); medians with min-max.

    python benchmarks/bench_threads.py [--repeats 3] [--warmup 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_LOOP = "while True: pass"


def _usable() -> int:
    from toolkit.sdk.compute import usable_cpus

    return usable_cpus()


def run_extract(variant: str, workdir: Path) -> float:
    store = workdir / f"{variant}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    threads: list[str] = []
    if variant == "all-cores":
        threads, env["OMP_WAIT_POLICY"] = ["--threads", str(_usable())], "ACTIVE"
    elif variant == "one":
        threads = ["--threads", "1"]
    cmd = [sys.executable, "-m", "toolkit", *threads, "extract", "--model", "pi0", "--dataset", "libero",
           "--store", str(store), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Busy:
    """``n`` busy loops for the duration of a ``with`` block, started ``warmup`` seconds before it."""

    def __init__(self, n: int, warmup: float):
        self.n, self.warmup, self.procs = n, warmup, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.n)]
        time.sleep(self.warmup)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds the busy loops run before a measurement")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    variants = ["default", "all-cores", "one"]
    n = _usable()
    times: dict[tuple[str, str], list[float]] = {}
    load_seen: dict[str, list[float]] = {"idle": [], "busy": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_extract("one", work)  # warm the file cache and the imports once
        for r in range(a.repeats):
            order = variants[r % 3:] + variants[:r % 3]
            for load in ("idle", "busy") if r % 2 == 0 else ("busy", "idle"):
                if load == "idle":
                    time.sleep(a.warmup / 2)  # let the load average fall after a busy block
                ctx = Busy(n, a.warmup) if load == "busy" else Busy(0, 0)
                with ctx:
                    load_seen[load].append(os.getloadavg()[0])
                    for v in order:
                        times.setdefault((v, load), []).append(run_extract(v, work))
    ref = statistics.median(times[("default", "idle")])
    rows = []
    print(f"# {n} usable CPUs, {a.repeats} interleaved repeats; load average at the start of each block: "
          f"idle {min(load_seen['idle']):.1f}-{max(load_seen['idle']):.1f}, "
          f"busy {min(load_seen['busy']):.1f}-{max(load_seen['busy']):.1f}")
    print(f"{'variant':<10} {'load':<5} {'median s':>9} {'min-max s':>13} {'vs default alone':>17}")
    for load in ("idle", "busy"):
        for v in variants:
            t = times[(v, load)]
            med = statistics.median(t)
            rows.append({"variant": v, "load": load, "median_s": med, "min_s": min(t), "max_s": max(t),
                         "ratio": med / ref, "ratio_min": min(t) / ref, "ratio_max": max(t) / ref})
            print(f"{v:<10} {load:<5} {med:9.1f} {min(t):6.1f}-{max(t):6.1f} "
                  f"{med / ref:8.2f}x ({min(t) / ref:.2f}-{max(t) / ref:.2f})")
    if a.out:
        a.out.write_text(json.dumps({"usable_cpus": n, "rows": rows, "load": load_seen}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
