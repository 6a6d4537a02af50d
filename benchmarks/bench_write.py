"""Store write throughput against what the ad-hoc scripts do, on the same activation-like arrays.

Baselines, each fed the same arrays step by step (one policy call = one sample of (layer, token, feature)):
- seed-style: one `np.save` per step per layer (what the seed scripts did);
- plain sequential `f.write` of the same bytes into one file (the floor of any writer);
- the same bytes written bare into the store's own file layout (one file per chunk of N samples x 1 layer under
  zarr's nested `c/<sample chunk>/<layer>/0/0` folders, each sample's slice written straight from the input: no
  checksum, no metadata, no commit): what the layout itself costs on this filesystem, the floor of any writer of
  these chunk files.
The store (`StoreWriter`, chunks of N samples x 1 layer, crc32c per chunk, compression in a thread pool) is run
with the default codec (`auto`: none for float16, blosc-lz4 + bitshuffle for bfloat16), `none` and `zstd`.
Everything is timed until the data is handed to the OS (no fsync on any side; `os.sync()` before each, untimed,
so no method is throttled by the previous one's writeback).  Methods are interleaved in each repeat, in an order
rotated by one each repeat (on the development VM a writer can run several times slower right after another
method's output was written and deleted, so no method may always follow the same one); medians with min-max;
process CPU seconds (user + system, all threads) per method, steadier than wall time on a busy machine; bytes on
disk per method; load average before and after.  Imports and data generation are outside the timed regions.
Targets (issue 12): default codec >= 1.0x seed-style with no more bytes on disk; `--codec none` >= 80 % of
`f.write`.

`--rss` measures instead whether memory stays flat in store size: the peak RSS above the RSS after imports, each in
a fresh process, of (a) `StoreWriter` fed one reused step array for 2x and 16x `--samples` steps and (b)
`toolkit.run.pipeline` of the tiny random pi0 on the bundled LIBERO sample, every VLM token kept (`pool="none"`, 8-sample
chunks so the store grows with the samples), 2 and 20 episodes.

    python benchmarks/bench_write.py [--samples 128] [--layers 18] [--tokens 16] [--features 1024] [--repeats 3]
    python benchmarks/bench_write.py --rss
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.store.layout import ArraySpec, choose_chunk_samples
from toolkit.store.reader import open_store
from toolkit.store.writer import StoreWriter


def make_data(n: int, layers: int, tokens: int, features: int, dtype: str) -> np.ndarray:
    """Activation-like values: per-feature log-normal scales, a few large features; bf16 as its bit pattern."""
    rng = np.random.default_rng(0)
    scale = rng.lognormal(0, 1, features).astype(np.float32)
    x = rng.standard_normal((n, layers, tokens, features), dtype=np.float32) * scale
    if dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: the store keeps any bit pattern as is
    return x.astype(np.float16)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (the store's writer pool included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def seed_style(data: np.ndarray, out: Path) -> None:
    out.mkdir()
    for i in range(len(data)):
        for layer in range(data.shape[1]):
            np.save(out / f"step{i:06d}_layer{layer:02d}.npy", data[i, layer])


def plain_write(data: np.ndarray, out: Path) -> None:
    with open(out, "wb") as f:
        for i in range(len(data)):
            f.write(data[i])  # what arrives per step: the sample's bytes (buffer protocol, no copy)


def bare_chunk_files(data: np.ndarray, out: Path) -> None:
    n, layers, tokens, features = data.shape
    spec = ArraySpec("x", data.shape[1:], str(data.dtype), (), chunk_inner=(1, tokens, features))
    chunk = choose_chunk_samples([spec])
    for a in range(0, n, chunk):
        for layer in range(layers):
            folder = out / "c" / str(a // chunk) / str(layer) / "0"
            folder.mkdir(parents=True)
            with open(folder / "0", "wb") as f:
                for i in range(a, min(n, a + chunk)):
                    f.write(data[i, layer])


def store(data: np.ndarray, out: Path, codec: str, stored_dtype: str | None) -> None:
    n, layers, tokens, features = data.shape
    w = StoreWriter(out, codec=codec)
    w.initialize({"model": "synthetic"},
                 [ArraySpec("vlm/resid_post", data.shape[1:], str(data.dtype), ("layer", "token", "feature"),
                            stored_dtype=stored_dtype, chunk_inner=(1, tokens, features)),
                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32))}, ["episode"])
    for i in range(n):
        w.append({"vlm/resid_post": data[i:i + 1], "episode": np.array([i], np.int32)})
    w.close()


RSS_CHILD = """
import resource, sys
import numpy as np
import toolkit
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter
kind, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
layers, tokens, features = (int(v) for v in sys.argv[4:7])
step = np.random.default_rng(0).standard_normal((1, layers, tokens, features)).astype(np.float16)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "writer":
    w = StoreWriter(path, codec="none")
    w.initialize({"model": "synthetic"},
                 [ArraySpec("vlm/resid_post", step.shape[1:], "float16", ("layer", "token", "feature"),
                            chunk_inner=(1, tokens, features)), ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32))}, ["episode"])
    for i in range(n):
        w.append({"vlm/resid_post": step, "episode": np.array([i], np.int32)})
    w.close()
else:
    toolkit.extract(model="pi0", dataset="libero", store=path, max_episodes=n, sites=["vlm"], pool="none",
                    chunk_samples=8)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(kind: str, n: int, path: Path, shape: tuple[int, int, int]) -> tuple[float, int, float]:
    """(peak RSS MB above the RSS after imports, samples written, store MB) of one run in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(n), str(path), *map(str, shape)], env=env,
                         check=True, capture_output=True, text=True)
    base, peak = (int(v) for v in res.stdout.split()[-2:])
    samples = open_store(path).n_samples
    mb = disk_bytes(path) / 1e6
    shutil.rmtree(path)
    return (peak - base) / 1024, samples, mb


def rss_report(a: argparse.Namespace, work: Path) -> None:
    print(f"# peak RSS above the RSS after imports, fresh process each; load average {os.getloadavg()[0]:.1f}")
    print("| run | samples | store MB | peak RSS growth MB |")
    print("|---|---|---|---|")
    shape = (a.layers, a.tokens, a.features)
    for kind, sizes in (("writer", (2 * a.samples, 16 * a.samples)), ("extract", (2, 20))):
        for n in sizes:
            grow, samples, mb = peak_rss(kind, n, work / "rss.zarr", shape)
            print(f"| {kind} | {samples} | {mb:.1f} | {grow:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rss", action="store_true", help="measure peak RSS against store size instead of speed")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_write_"))
    if a.rss:
        try:
            rss_report(a, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    results: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "load": [os.getloadavg()], "dtypes": {}}
    try:
        for dtype in a.dtypes.split(","):
            data = make_data(a.samples, a.layers, a.tokens, a.features, dtype)
            sd = "bfloat16" if dtype == "bfloat16" else None
            methods = {
                "seed-style np.save per step per layer": lambda o: seed_style(data, o),
                "plain sequential f.write": lambda o: plain_write(data, o),
                "bare chunk files (the store's layout)": lambda o: bare_chunk_files(data, o),
                "store, default codec (auto)": lambda o: store(data, o, "auto", sd),
                "store, codec none": lambda o: store(data, o, "none", sd),
                "store, codec zstd": lambda o: store(data, o, "zstd", sd),
            }
            times: dict[str, list[float]] = {m: [] for m in methods}
            cpu: dict[str, list[float]] = {m: [] for m in methods}
            size: dict[str, int] = {}
            names = list(methods)
            for rep in range(a.repeats + 1):  # the first round warms up (page cache, allocator) and is dropped
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    out = work / "out"
                    os.sync()  # no method pays for the previous one's dirty-page writeback
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    methods[name](out)
                    dt, c1 = time.perf_counter() - t0, cpu_seconds()
                    size[name] = disk_bytes(out)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
                    if rep:
                        times[name].append(dt)
                        cpu[name].append(c1 - c0)
            mb = data.nbytes / 1e6
            rows = {}
            for name, t in times.items():
                rows[name] = {"MB_s": mb / statistics.median(t), "MB_s_min": mb / max(t), "MB_s_max": mb / min(t),
                              "cpu_s": statistics.median(cpu[name]), "disk_bytes": size[name], "times_s": t,
                              "cpu_times_s": cpu[name]}
            results["dtypes"][dtype] = {"MB": mb, "rows": rows}
        results["load"].append(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# {a.samples} steps x ({a.layers}, {a.tokens}, {a.features}) per dtype, {a.repeats} interleaved repeats; "
          f"load average {results['load'][0][0]:.1f} -> {results['load'][1][0]:.1f}")
    print("| dtype | writer | MB/s median (min-max) | vs seed-style | vs f.write | vs bare chunk files | "
          "CPU s (f.write's / this) | size vs raw |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, r in results["dtypes"].items():
        seed = r["rows"]["seed-style np.save per step per layer"]["MB_s"]
        plain = r["rows"]["plain sequential f.write"]["MB_s"]
        plain_cpu = r["rows"]["plain sequential f.write"]["cpu_s"]
        bare = r["rows"]["bare chunk files (the store's layout)"]["MB_s"]
        for name, row in r["rows"].items():
            print(f"| {dtype} | {name} | {row['MB_s']:.0f} ({row['MB_s_min']:.0f}-{row['MB_s_max']:.0f}) | "
                  f"{row['MB_s'] / seed:.2f}x | {100 * row['MB_s'] / plain:.0f} % | {100 * row['MB_s'] / bare:.0f} % | "
                  f"{row['cpu_s']:.2f} ({100 * plain_cpu / max(row['cpu_s'], 1e-9):.0f} %) | "
                  f"{row['disk_bytes'] / (r['MB'] * 1e6):.3f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
