"""Scale-out throughput, side by side in one run: extraction on 2 Ray workers vs 1, Dask statistics on 2 workers
vs the serial path, and raw Zarr write throughput to a local S3 server (moto) vs local disk.

* Extraction: the built-in pi0 (random weights) with ``--model-option size=...`` over the LIBERO sample, one Ray
  local cluster for all runs (its ~15 s start is not timed); each timed run includes its actors' model loads.
  Torch uses one thread per actor (Ray sets OMP_NUM_THREADS=1 per CPU), so the model is compute-bound per actor.
* Statistics: ``store_stats`` of a synthetic float32 store, serial vs ``scheduler="threads"`` (2 workers).
* S3: the same array written with zarr to a ``FsspecStore`` on a ``ThreadedMotoServer`` (loopback) and to a
  ``LocalStore``; zstd-1 + crc32c, whole chunks.
Methods are interleaved in each repeat; medians with min-max.  The load average is recorded: this machine is
shared, so ratios understate what idle cores give.

    python benchmarks/bench_scale.py [--repeats 3] [--episodes 2] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def med(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_ray(tmp: Path, repeats: int, episodes: int) -> dict:
    import sys

    import ray

    from toolkit.extract import extract

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_extract import medium_checkpoint  # the mid-size pi0 (~150 M parameters): compute-bound on CPU

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    opts = dict(model="pi0", checkpoint=medium_checkpoint(tmp), dataset="libero", max_episodes=episodes,
                chunk_samples=2, streams="resid_post", layers="-1", progress=False)
    times: dict[int, list[float]] = {1: [], 2: []}
    n = 0
    try:
        for r in range(repeats):
            for workers in (1, 2):
                store = tmp / f"ray{workers}_{r}.zarr"
                t = time.perf_counter()
                extract(store=store, workers=workers, **opts)
                times[workers].append(time.perf_counter() - t)
                import toolkit

                n = toolkit.open_store(store).n_samples
                shutil.rmtree(store)
    finally:
        ray.shutdown()
    return {"model": "pi0 medium (~150M params)", "samples": n, "seconds_1_worker": med(times[1]), "seconds_2_workers": med(times[2]),
            "speedup": statistics.median(times[1]) / statistics.median(times[2])}


def bench_dask(tmp: Path, repeats: int) -> dict:
    from toolkit.stats import store_stats
    from toolkit.store import ArraySpec, StoreWriter, open_store

    n, layers, tokens, features, chunk = 2048, 2, 16, 512, 256
    rng = np.random.default_rng(0)
    path = tmp / "stats.zarr"
    w = StoreWriter(path, mode="create", codec="zstd")
    w.initialize({"model": {"name": "synthetic"}}, [ArraySpec("s/x", (layers, tokens, features), "float32",
                                                                ("layer", "token", "feature"), chunk_inner=(1, tokens, features)),
                                          ArraySpec("episode", (), "int32", ())],
                 {"s/layer": (("layer",), np.arange(layers, dtype=np.int32)),
                  "s/token": (("token",), np.arange(tokens, dtype=np.int32))}, ["episode"], chunk_samples=chunk)
    for a in range(0, n, chunk):
        w.append({"s/x": rng.normal(size=(chunk, layers, tokens, features)).astype(np.float32),
                  "episode": np.arange(a, a + chunk, dtype=np.int32)})
    w.close()
    store = open_store(path)
    times: dict[str, list[float]] = {"serial": [], "threads": [], "processes": []}
    for _ in range(repeats):
        for method in times:
            t = time.perf_counter()
            store_stats(store, "s", "x", scheduler=None if method == "serial" else method)
            times[method].append(time.perf_counter() - t)
    mb = n * layers * tokens * features * 4 / 1e6
    serial = statistics.median(times["serial"])
    return {"store_MB": mb, "chunk_MB": chunk * tokens * features * 4 / 1e6, "seconds_serial": med(times["serial"]),
            "seconds_dask_threads_2": med(times["threads"]), "seconds_dask_processes_2": med(times["processes"]),
            "speedup_threads": serial / statistics.median(times["threads"]),
            "speedup_processes": serial / statistics.median(times["processes"])}


def bench_s3(tmp: Path, repeats: int) -> dict:
    import boto3
    import s3fs
    import zarr
    import logging

    from moto.server import ThreadedMotoServer
    from zarr.codecs import Crc32cCodec, ZstdCodec

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, asynchronous=True)
        x = np.random.default_rng(0).normal(size=(512, 4, 16, 512)).astype(np.float16)  # 33.6 MB, 16 chunks
        times: dict[str, list[float]] = {"local": [], "s3": []}
        for r in range(repeats):
            for where in times:
                store = (zarr.storage.FsspecStore(fs, path=f"bench/w{r}.zarr") if where == "s3"
                         else zarr.storage.LocalStore(tmp / f"w{r}.zarr"))
                t = time.perf_counter()
                arr = zarr.create_array(store, shape=x.shape, dtype=x.dtype, chunks=(128, 1, 16, 512),
                                        compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0)
                arr[...] = x
                times[where].append(time.perf_counter() - t)
    finally:
        server.stop()
    mb = x.nbytes / 1e6
    return {"MB": mb, "local_MB_s": med([mb / t for t in times["local"]]), "s3_moto_MB_s": med([mb / t for t in times["s3"]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out["dask_stats"] = bench_dask(tmp, args.repeats)
        out["s3_write"] = bench_s3(tmp, args.repeats)
        if not args.skip_ray:
            out["ray_extract"] = bench_ray(tmp, args.repeats, args.episodes)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    dest = Path(__file__).parent / "out"
    dest.mkdir(exist_ok=True)
    (dest / "bench_scale.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
