"""LeRobot reading benchmark: frames decoded per second by the ``lerobot`` dataset adapter against plain PyAV on the
same files and the same frames, and (``--extract``) extraction from a LeRobot dataset against the same episodes
stored as RLDS.

The data is written here (``toolkit_plugins.lerobot.sample``): LIBERO-sized 256x256 cameras, two per step, AV1 as
lerobot encodes it (SVT-AV1, yuv420p, a key frame every 2 frames) in the v2.1 and v3.0 layouts, and the v2.0 layout
(PNG images inside the parquet).  Each case reads every ``stride``-th step of the first ``max_steps`` of each episode,
both cameras:

* adapter: ``LeRobotDataset.episodes()`` / ``steps()`` as ``toolkit extract`` walks them (a step it skips is never
  decoded), reading each kept step's two images (and state/action from the parquet);
* plain PyAV: for each episode and camera, open the file, seek to the episode's first wanted frame, decode forward
  and convert the wanted frames to RGB (lerobot's own PyAV path does the same: seek, then decode forward); for
  v2.0, ``PIL`` decoding the PNG bytes of the wanted rows read with pyarrow.

Repeats are interleaved (adapter, baseline, adapter, ...); the table gives the median frames/s and the min-max.

    python benchmarks/bench_lerobot.py [--repeats 5] [--episodes 4] [--length 100] [--extract] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit_plugins.lerobot import LeRobotDataset
from toolkit_plugins.lerobot.sample import write_dataset

CASES = [  # (name, version, stride, max_steps)
    ("v3.0 every frame", "v3.0", 1, None),
    ("v3.0 stride 5", "v3.0", 5, None),
    ("v3.0 first 20, stride 2", "v3.0", 2, 20),
    ("v2.1 every frame", "v2.1", 1, None),
    ("v2.1 stride 5", "v2.1", 5, None),
    ("v2.0 PNG in parquet, stride 5", "v2.0", 5, None),
]


def kept(length: int, stride: int, max_steps: int | None) -> list[int]:
    return list(range(0, length if max_steps is None else min(length, max_steps), stride))


def adapter_pass(root: Path, stride: int, max_steps: int | None) -> int:
    """Frames read through the adapter, walking steps as toolkit.run.samples.iter_samples does."""
    ds = LeRobotDataset(str(root))
    n = 0
    for ep in ds.episodes():
        for k, step in enumerate(itertools.islice(ep.steps(), max_steps)):
            if k % stride:
                continue
            for cam in step.images:
                assert step.images[cam].shape[-1] == 3
                n += 1
    ds._videos.close()
    return n


def pyav_pass(written, stride: int, max_steps: int | None) -> int:
    """The same frames with plain PyAV: per episode and camera, seek to the first wanted frame, decode forward."""
    import av

    n = 0
    for ep in written.episodes:
        want = kept(ep.length, stride, max_steps)
        for cam in written.cameras:
            path, offset = ep.videos[cam]
            times = {round(offset + float(ep.timestamp[i]), 4) for i in want}
            last = max(times)
            with av.open(str(path)) as c:
                s = c.streams.video[0]
                c.seek(int(min(times) / s.time_base), stream=s, backward=True, any_frame=False)
                for frame in c.decode(s):
                    t = round(float(frame.pts * s.time_base), 4)
                    if t in times:
                        frame.to_ndarray(format="rgb24")
                        n += 1
                    if t >= last:
                        break
    return n


def png_pass(written, stride: int, max_steps: int | None) -> int:
    """v2.0: the wanted rows' PNG bytes read with pyarrow and decoded with PIL."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    n = 0
    for ep in written.episodes:
        table = pq.read_table(ep.data_path, columns=list(written.cameras))
        for cam in written.cameras:
            cells = table.column(cam).to_pylist()
            for i in kept(ep.length, stride, max_steps):
                np.asarray(Image.open(io.BytesIO(cells[i]["bytes"])).convert("RGB"))
                n += 1
    return n


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def bench_decode(tmp: Path, repeats: int, episodes: int, length: int) -> list[dict]:
    data = {}
    for version in sorted({c[1] for c in CASES}):
        t = time.perf_counter()
        data[version] = write_dataset(tmp / version, version, lengths=(length,) * episodes, size=(256, 256))
        print(f"wrote {version}: {episodes} episodes x {length} frames x 2 cameras 256x256 "
              f"({data[version].codec or 'PNG'}) in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for name, version, stride, max_steps in CASES:
        w = data[version]
        base = png_pass if version == "v2.0" else pyav_pass
        frames = 2 * sum(len(kept(e.length, stride, max_steps)) for e in w.episodes)
        a_rates, b_rates = [], []
        for r in range(repeats):
            order = [("a", adapter_pass, (w.root, stride, max_steps)), ("b", base, (w, stride, max_steps))]
            for who, fn, args in order if r % 2 == 0 else order[::-1]:
                dt, n = timed(fn, *args)
                assert n == frames, (name, who, n, frames)  # the same frames on both sides
                (a_rates if who == "a" else b_rates).append(n / dt)
        rows.append({"case": name, "frames": frames, "adapter_fps": a_rates, "baseline_fps": b_rates,
                     "baseline": "PIL+pyarrow" if version == "v2.0" else "PyAV"})
    return rows


def write_rlds_like(written, root: Path) -> Path:
    """The same episodes as an RLDS dataset in OpenVLA's modified_libero_rlds layout (JPEG images, as there)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow_datasets as tfds

    f = tfds.features
    size = written.episodes[0].images[written.cameras[0]][0].shape
    features = f.FeaturesDict({"steps": f.Dataset({
        "observation": f.FeaturesDict({"image": f.Image(shape=size, encoding_format="jpeg"),
                                       "wrist_image": f.Image(shape=size, encoding_format="jpeg"),
                                       "state": f.Tensor(shape=(8,), dtype=np.float32)}),
        "action": f.Tensor(shape=(7,), dtype=np.float32),
        "language_instruction": f.Text()})})
    eps = [(f"ep{ep.index}", {"steps": [{
        "observation": {"image": ep.images[written.cameras[0]][i], "wrist_image": ep.images[written.cameras[1]][i],
                        "state": ep.state[i]},
        "action": ep.action[i], "language_instruction": ep.task} for i in range(ep.length)]})
        for ep in written.episodes]
    tfds.dataset_builders.store_as_tfds_dataset(name="lerobot_twin", version="1.0.0", features=features,
                                                split_datasets={"train": eps}, data_dir=str(root),
                                                file_format="tfrecord", disable_shuffling=True)
    return root / "lerobot_twin" / "1.0.0"


def bench_extract(tmp: Path, repeats: int, episodes: int, length: int) -> dict:
    """`toolkit extract --model pi0` (the tiny random pi0, every 5th frame) over the same episodes as a LeRobot v3.0
    dataset and as RLDS, each run a process of its own as a user runs it (imports and model build included; one
    torch thread): the difference is the reading, TensorFlow's import included."""
    import os
    import subprocess
    import sys

    w = write_dataset(tmp / "x3", "v3.0", lengths=(length,) * episodes, size=(256, 256))
    rlds_dir = write_rlds_like(w, tmp / "rlds")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    times: dict[str, list[float]] = {"lerobot": [], "rlds": []}
    for r in range(repeats):
        for name in (["lerobot", "rlds"] if r % 2 == 0 else ["rlds", "lerobot"]):
            data = w.root if name == "lerobot" else rlds_dir
            cmd = [sys.executable, "-m", "toolkit", "extract", str(tmp / f"{name}{r}.zarr"), "--model", "pi0",
                   "--dataset", name, "--data", str(data), "--stride", "5", "--sites", "vlm", "--layers", "-1",
                   "--dtype", "float32", "--no-progress"]
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t)
    return {"samples": episodes * len(kept(length, 5, None)), "seconds": times}


def _fmt(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--length", type=int, default=100, help="frames per episode")
    p.add_argument("--extract", action="store_true", help="also time extraction: LeRobot against RLDS")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = bench_decode(Path(d), a.repeats, a.episodes, a.length)
        print(f"\n{'case':32} {'frames':>6}  {'adapter frames/s':>22}  {'baseline frames/s':>22}  ratio")
        for r in rows:
            ratio = statistics.median(r["adapter_fps"]) / statistics.median(r["baseline_fps"])
            print(f"{r['case']:32} {r['frames']:6d}  {_fmt(r['adapter_fps']):>22}  {_fmt(r['baseline_fps']):>22}  "
                  f"{ratio:.2f}x  ({r['baseline']})")
        out = {"decode": rows, "repeats": a.repeats}
        if a.extract:
            ex = bench_extract(Path(d), a.repeats, a.episodes, a.length)
            lr, rl = (statistics.median(ex["seconds"][k]) for k in ("lerobot", "rlds"))
            print(f"\n`toolkit extract --model pi0` (tiny), {ex['samples']} samples, one process each: lerobot "
                  f"{_fmt(ex['seconds']['lerobot'], 2)} s, rlds {_fmt(ex['seconds']['rlds'], 2)} s "
                  f"(lerobot/rlds {lr / rl:.2f}x)")
            out["extract"] = ex
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
