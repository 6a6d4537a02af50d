"""Small LeRobot datasets written the way lerobot lays them out (pyarrow/pandas parquet, PyAV mp4), to try the adapter
without a download and for its tests and benchmark: v2.0 (PNG images inside the parquet, openpi's LIBERO keys), v2.1
(one parquet and one mp4 per episode and camera) and v3.0 (several episodes per parquet and per mp4 file, the episode
table under meta/episodes/); videos in AV1 as lerobot encodes them (SVT-AV1, yuv420p), else H.264 or MPEG-4.

``write_dataset`` returns what it wrote (per episode: task, rows, each camera's file and offset), so a test compares
the adapter's output with the parquet and with an independent decode of the files::

    python -m toolkit_plugins.lerobot.sample data/lerobot_libero v3.0
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ["put the bowl on the plate", "open the top drawer", "pick up the ketchup"]
LEROBOT_CAMERAS = ("observation.images.image", "observation.images.wrist_image")
OPENPI_CAMERAS = ("image", "wrist_image")


def video_codec() -> str:
    """lerobot's default codec (AV1 through SVT-AV1) when this PyAV encodes it, else H.264, else MPEG-4."""
    import av

    for name in ("libsvtav1", "h264", "libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - not in this build
            continue
        return name
    raise RuntimeError("this PyAV build encodes none of AV1, H.264, MPEG-4")


def frame_image(episode: int, i: int, cam: int, size: tuple[int, int]) -> np.ndarray:
    """A frame that differs per episode, step and camera (smooth enough for a lossy codec to keep apart)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 4 + i * 23) % 256, (y * 5 + episode * 61) % 256, np.full_like(x, (cam * 120 + i * 9) % 256)],
                   axis=-1)
    img[: 4 + i % 8, : 4 + episode % 8] = 255
    return img.astype(np.uint8)


def encode_video(path: Path, frames: list[np.ndarray], fps: int, codec: str | None = None) -> str:
    import av

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1's encoder: errors only (its banner goes to stderr otherwise)
    codec = codec or video_codec()
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": "2", "crf": "30", "preset": "12"} if codec == "libsvtav1" else {"g": "4"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return codec


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class WrittenEpisode:
    index: int
    length: int
    task: str
    task_index: int
    state: np.ndarray
    action: np.ndarray
    timestamp: np.ndarray  # per row, from 0
    reward: np.ndarray
    success: np.ndarray
    data_path: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # camera -> (file, offset in seconds)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # v2.0: camera -> the PNG-encoded frames


@dataclass
class Written:
    root: Path
    version: str
    fps: int
    cameras: tuple[str, ...]
    episodes: list[WrittenEpisode]
    codec: str | None = None


def _features(version: str, cameras: tuple[str, ...], size: tuple[int, int], state_key: str, action_key: str,
              codec: str | None, fps: int) -> dict:
    h, w = size
    cam = {"dtype": "image" if version == "v2.0" else "video", "shape": [h, w, 3],
           "names": ["height", "width", "channel"]}
    if version != "v2.0":
        cam["info"] = {"video.fps": fps, "video.height": h, "video.width": w, "video.channels": 3,
                       "video.codec": {"libsvtav1": "av1", "libx264": "h264"}.get(codec, codec),
                       "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "has_audio": False}
    feats = {k: dict(cam) for k in cameras}
    feats[state_key] = {"dtype": "float32", "shape": [8], "names": ["state"]}
    feats[action_key] = {"dtype": "float32", "shape": [7], "names": ["actions"]}
    if version != "v2.0":
        feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
        feats["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
    for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                  ("index", "int64"), ("task_index", "int64")):
        feats[k] = {"dtype": dt, "shape": [1], "names": None}
    return feats


def _table(eps: list[WrittenEpisode], cameras, version, state_key, action_key, start: int):
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in (state_key, action_key, "timestamp", "frame_index", "episode_index",
                                             "index", "task_index", "next.reward", "next.success", *cameras)}
    idx = start
    for ep in eps:
        for i in range(ep.length):
            cols[state_key].append(ep.state[i].tolist())
            cols[action_key].append(ep.action[i].tolist())
            cols["timestamp"].append(float(ep.timestamp[i]))
            cols["frame_index"].append(i)
            cols["episode_index"].append(ep.index)
            cols["index"].append(idx)
            cols["task_index"].append(ep.task_index)
            cols["next.reward"].append(float(ep.reward[i]))
            cols["next.success"].append(bool(ep.success[i]))
            for c in cameras:
                if version == "v2.0":
                    cols[c].append({"bytes": png(ep.images[c][i]), "path": f"frame_{i:06d}.png"})
            idx += 1
    arrays = {state_key: pa.array(cols[state_key], pa.list_(pa.float32())),
              action_key: pa.array(cols[action_key], pa.list_(pa.float32())),
              "timestamp": pa.array(cols["timestamp"], pa.float32()),
              "frame_index": pa.array(cols["frame_index"], pa.int64()),
              "episode_index": pa.array(cols["episode_index"], pa.int64()),
              "index": pa.array(cols["index"], pa.int64()),
              "task_index": pa.array(cols["task_index"], pa.int64())}
    if version == "v2.0":
        for c in cameras:
            arrays[c] = pa.array(cols[c], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        arrays["next.reward"] = pa.array(cols["next.reward"], pa.float32())
        arrays["next.success"] = pa.array(cols["next.success"], pa.bool_())
    return pa.table(arrays)


def write_dataset(root: str | Path, version: str = "v2.1", lengths: tuple[int, ...] = (6, 5, 7), fps: int = 10,
                  size: tuple[int, int] = (48, 64), per_file: int = 2, codec: str | None = None,
                  seed: int = 0) -> Written:
    """A dataset of ``len(lengths)`` episodes (episode ``e`` has task ``e % 2``; the last frame of even episodes
    succeeds).  v3.0 puts ``per_file`` episodes into each data and video file.  v2.0 uses openpi's LIBERO keys
    (``image``, ``wrist_image``, ``state``, ``actions``), v2.1 and v3.0 lerobot's (``observation.images.image``,
    ``observation.images.wrist_image``, ``observation.state``, ``action``)."""
    import pyarrow.parquet as pq

    root = Path(root)
    rng = np.random.default_rng(seed)
    openpi = version == "v2.0"
    cameras = OPENPI_CAMERAS if openpi else LEROBOT_CAMERAS
    state_key, action_key = ("state", "actions") if openpi else ("observation.state", "action")
    codec = None if openpi else (codec or video_codec())
    eps = []
    for e, n in enumerate(lengths):
        ep = WrittenEpisode(index=e, length=n, task=TASKS[e % 2], task_index=e % 2,
                            state=rng.normal(size=(n, 8)).astype(np.float32),
                            action=rng.uniform(-1, 1, size=(n, 7)).astype(np.float32),
                            timestamp=(np.arange(n) / fps).astype(np.float32),
                            reward=np.zeros(n, np.float32), success=np.zeros(n, bool), data_path=root)
        if e % 2 == 0:
            ep.reward[-1], ep.success[-1] = 1.0, True
        ep.images = {c: [frame_image(e, i, k, size) for i in range(n)] for k, c in enumerate(cameras)}
        eps.append(ep)
    feats = _features(version, cameras, size, state_key, action_key, codec, fps)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    info = {"codebase_version": version, "robot_type": "panda", "total_episodes": len(eps),
            "total_frames": int(sum(lengths)), "total_tasks": 2, "chunks_size": 1000, "fps": fps,
            "splits": {"train": f"0:{len(eps)}"}, "features": feats}
    if version == "v3.0":
        _write_v3(root, eps, cameras, info, state_key, action_key, fps, codec, per_file)
    else:
        info.update(total_chunks=1, total_videos=0 if openpi else len(eps) * len(cameras),
                    data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path=None if openpi else
                    "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
        start = 0
        for ep in eps:
            ep.data_path = root / f"data/chunk-000/episode_{ep.index:06d}.parquet"
            ep.data_path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_table([ep], cameras, version, state_key, action_key, start), ep.data_path)
            start += ep.length
            for c in () if openpi else cameras:
                path = root / f"videos/chunk-000/{c}/episode_{ep.index:06d}.mp4"
                encode_video(path, ep.images[c], fps, codec)
                ep.videos[c] = (path, 0.0)
        with open(root / "meta/tasks.jsonl", "w") as f:
            for i in range(2):
                f.write(json.dumps({"task_index": i, "task": TASKS[i]}) + "\n")
        with open(root / "meta/episodes.jsonl", "w") as f:
            for ep in eps:
                f.write(json.dumps({"episode_index": ep.index, "tasks": [ep.task], "length": ep.length}) + "\n")
        if version == "v2.1":
            with open(root / "meta/episodes_stats.jsonl", "w") as f:
                for ep in eps:
                    f.write(json.dumps({"episode_index": ep.index, "stats": {
                        state_key: {"min": ep.state.min(0).tolist(), "max": ep.state.max(0).tolist(),
                                    "mean": ep.state.mean(0).tolist(), "std": ep.state.std(0).tolist(),
                                    "count": [ep.length]}}}) + "\n")
        else:
            (root / "meta/stats.json").write_text(json.dumps({}))
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    return Written(root, version, fps, cameras, eps, codec)


def _write_v3(root: Path, eps, cameras, info, state_key, action_key, fps, codec, per_file) -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    info.update(data_files_size_in_mb=100, video_files_size_in_mb=200,
                data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    rows = []
    start = 0
    for f, first in enumerate(range(0, len(eps), per_file)):
        group = eps[first:first + per_file]
        data = root / f"data/chunk-000/file-{f:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(group, cameras, "v3.0", state_key, action_key, start), data)
        offsets = np.cumsum([0] + [ep.length for ep in group]) / fps
        for c in cameras:
            encode_video(root / f"videos/{c}/chunk-000/file-{f:03d}.mp4",
                         [img for ep in group for img in ep.images[c]], fps, codec)
        for k, ep in enumerate(group):
            ep.data_path = data
            row = {"episode_index": ep.index, "tasks": [ep.task], "length": ep.length,
                   "data/chunk_index": 0, "data/file_index": f, "dataset_from_index": start,
                   "dataset_to_index": start + ep.length}
            for c in cameras:
                ep.videos[c] = (root / f"videos/{c}/chunk-000/file-{f:03d}.mp4", float(offsets[k]))
                row.update({f"videos/{c}/chunk_index": 0, f"videos/{c}/file_index": f,
                            f"videos/{c}/from_timestamp": float(offsets[k]),
                            f"videos/{c}/to_timestamp": float(offsets[k + 1])})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                        f"stats/{state_key}/mean": ep.state.mean(0).tolist()})
            rows.append(row)
            start += ep.length
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "meta/episodes/chunk-000/file-000.parquet")
    tasks = pd.DataFrame({"task_index": [0, 1]}, index=pd.Index(TASKS[:2], name="task"))
    tasks.to_parquet(root / "meta/tasks.parquet")
    (root / "meta/stats.json").write_text(json.dumps({}))



if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print("usage: python -m toolkit_plugins.lerobot.sample DIR [v2.0|v2.1|v3.0]")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    w = write_dataset(args[0], *args[1:2])
    print(f"wrote a {w.version} LeRobot dataset of {len(w.episodes)} episodes to {w.root}")
