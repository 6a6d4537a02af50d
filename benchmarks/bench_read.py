"""Read throughput of `Store.read(site, stream, layer=k)` against a per-layer (layer-major) memmap of the same bytes.

The baseline is the strongest simple reader of one layer: one `.npy` file per layer (so a layer is one contiguous
file), opened with `np.load(mmap_mode="r")` and copied into memory.  The store is read through its public API
(`Store.read`: every chunk checked with crc32c, decoded by a small thread pool) and, for reference, through zarr's
own slicing (`zarr.Array[:, k]`, no checks).  Cold reads evict the files from the page cache first
(`posix_fadvise(DONTNEED)` on every file); warm reads follow a read of the same layer.  Methods are interleaved in
each repeat, in an order rotated by one each repeat; medians with min-max; load average before and after.  Imports
and data generation are outside the timed regions.  For the compressed codecs the single-thread decode speed of one
chunk (no I/O, no checksum) is measured too: a reader of compressed chunks cannot beat it times the cores.

    python benchmarks/bench_read.py [--samples 1024] [--layers 4] [--tokens 16] [--features 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from toolkit.store.layout import ArraySpec
from toolkit.store.reader import open_store
from toolkit.store.writer import StoreWriter


def evict(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode_speed(chunk: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """MB/s of decoding one chunk in one thread, median of ``repeats``, for the store's compressed codecs (configured
    as ``compressors_for`` configures them)."""
    out = {}
    for name, codec in (("zstd", numcodecs.Zstd(level=1)), ("blosc-lz4", numcodecs.Blosc("lz4", 5, 2))):
        encoded = codec.encode(chunk)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            codec.decode(encoded)
            times.append(time.perf_counter() - t0)
        out[name] = chunk.nbytes / 1e6 / statistics.median(times)
    return out


def make_data(n: int, layers: int, tokens: int, features: int) -> np.ndarray:
    """Activation-like fp16: per-feature scales, a few large features, noise."""
    rng = np.random.default_rng(0)
    scale = rng.lognormal(0, 1, features).astype(np.float32)
    x = rng.standard_normal((n, layers, tokens, features), dtype=np.float32) * scale
    return x.astype(np.float16)


def write_store(path: Path, data: np.ndarray, codec: str) -> None:
    n, layers, tokens, features = data.shape
    w = StoreWriter(path, mode="create", codec=codec)
    w.initialize({"model": "synthetic"},
                 [ArraySpec("site/resid_post", data.shape[1:], "float16", ("layer", "token", "feature"),
                            chunk_inner=(1, tokens, features)), ArraySpec("episode", (), "int32", ())],
                 {"site/layer": (("layer",), np.arange(layers, dtype=np.int32))}, ["episode"])
    for a in range(0, n, 64):
        w.append({"site/resid_post": data[a:a + 64], "episode": np.arange(a, min(n, a + 64), dtype=np.int32)})
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_read_"))
    data = make_data(a.samples, a.layers, a.tokens, a.features)
    k = a.layers // 2
    layer_mb = data[:, k].nbytes / 1e6
    for layer in range(a.layers):  # the baseline's layout: one contiguous file per layer
        np.save(work / f"layer{layer}.npy", np.ascontiguousarray(data[:, layer]))
    codecs = ("none", "zstd", "blosc-lz4")
    for codec in codecs:
        write_store(work / f"{codec}.zarr", data, codec)
    stores = {codec: open_store(work / f"{codec}.zarr") for codec in codecs}
    ratio = {c: data.nbytes / sum(f.stat().st_size for f in (work / f"{c}.zarr" / "site" / "resid_post").rglob("*")
                                  if f.is_file()) for c in stores}

    def memmap():
        return np.array(np.load(work / f"layer{k}.npy", mmap_mode="r"))

    methods = {
        "memmap (layer-major .npy)": (memmap, work / f"layer{k}.npy"),
        "Store.read, codec none": (lambda: stores["none"].read("site", "resid_post", layer=k), work / "none.zarr"),
        "Store.read, zstd": (lambda: stores["zstd"].read("site", "resid_post", layer=k), work / "zstd.zarr"),
        "Store.read, blosc-lz4": (lambda: stores["blosc-lz4"].read("site", "resid_post", layer=k),
                                  work / "blosc-lz4.zarr"),
        "zarr slicing, codec none": (lambda: zarr.open_array(work / "none.zarr" / "site" / "resid_post",
                                                              mode="r")[:, k], work / "none.zarr"),
    }
    expected = data[:, k]
    for name, (fn, _) in methods.items():
        got = fn()
        assert np.array_equal(got.astype(np.float16) if got.dtype != np.float16 else got, expected), name
    times: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": []} for m in methods}
    load = [os.getloadavg()]
    names = list(methods)
    for rep in range(a.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            fn, path = methods[name]
            evict(path)
            t0 = time.perf_counter()
            fn()
            times[name]["cold"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn()
            times[name]["warm"].append(time.perf_counter() - t0)
    load.append(os.getloadavg())
    decode = decode_speed(np.ascontiguousarray(data[:stores["zstd"].attrs["chunk_samples"], k]))
    base = {c: statistics.median(times["memmap (layer-major .npy)"][c]) for c in ("cold", "warm")}
    print(f"# one layer of {a.samples} x {a.tokens} x {a.features} fp16 = {layer_mb:.1f} MB; compression ratio "
          f"none {ratio['none']:.3f}, zstd {ratio['zstd']:.3f}, blosc-lz4 {ratio['blosc-lz4']:.3f}; load average "
          f"{load[0][0]:.1f} -> {load[1][0]:.1f}")
    print("# decode alone, one chunk, one thread: " + ", ".join(f"{c} {v:.0f} MB/s" for c, v in decode.items()))
    print("| reader | cold MB/s median (min-max) | vs memmap | warm MB/s median (min-max) | vs memmap |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in methods:
        cells = []
        for c in ("cold", "warm"):
            t = times[name][c]
            med = statistics.median(t)
            cells += [f"{layer_mb / med:.0f} ({layer_mb / max(t):.0f}-{layer_mb / min(t):.0f})", f"{base[c] / med:.2f}x"]
            rows.setdefault(name, {})[c] = {"median_s": med, "min_s": min(t), "max_s": max(t), "vs_memmap": base[c] / med}
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "load": load, "rows": rows,
                                     "compression_ratio": ratio, "decode_MB_s": decode}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
