"""A LeRobot dataset's metadata: ``meta/info.json``, the tasks and the episodes, in the v2.0, v2.1 and v3.0 layouts.

The layouts, as lerobot writes them (``src/lerobot/datasets/utils.py``, ``dataset_metadata.py``, ``io_utils.py``):

* every version: ``meta/info.json`` with ``codebase_version``, ``fps``, ``features`` (dtype and shape per key;
  cameras have dtype ``video`` or ``image``), ``chunks_size`` and the ``data_path`` / ``video_path`` templates;
* v2.0 and v2.1: ``meta/tasks.jsonl`` (``task_index``, ``task``), ``meta/episodes.jsonl`` (``episode_index``,
  ``tasks``, ``length``); one parquet file per episode (``data_path`` with ``episode_chunk`` = episode //
  ``chunks_size``) and one mp4 per episode and camera (``video_path``, frames from 0 s); v2.1 adds
  ``meta/episodes_stats.jsonl`` (not needed to read frames);
* v3.0: ``meta/tasks.parquet`` (the task text as the ``task`` column, pandas' index, and ``task_index``),
  ``meta/episodes/chunk-XXX/file-XXX.parquet`` with one row per episode: ``episode_index``, ``tasks``, ``length``,
  ``data/chunk_index``, ``data/file_index``, ``dataset_from_index``, ``dataset_to_index`` and per camera
  ``videos/<key>/chunk_index``, ``file_index``, ``from_timestamp``, ``to_timestamp``; many episodes per data file
  and per video file, an episode's frame at ``from_timestamp`` + its ``timestamp``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.sdk import fields
from toolkit.sdk.errors import ToolkitError

VERSIONS = ("v2.0", "v2.1", "v3.0")
INFO = "meta/info.json"
CAMERA_DTYPES = ("video", "image")


@dataclass(frozen=True)
class VideoRef:
    """Where one camera's frames of one episode are: the file, and the offset added to a frame's ``timestamp``."""

    path: Path
    offset: float = 0.0  # v3.0: the episode's from_timestamp in that file
    end: float | None = None  # v3.0: its to_timestamp


@dataclass
class EpisodeMeta:
    """One episode as the metadata describes it (nothing of its data read)."""

    index: int  # episode_index
    length: int  # frames
    tasks: list[str]
    data_path: Path
    videos: dict[str, VideoRef] = field(default_factory=dict)  # camera key -> its video


@dataclass
class Meta:
    """The dataset's metadata: version, fps, features, tasks (task_index -> text) and episodes in index order."""

    root: Path
    version: str
    fps: float
    features: dict[str, dict[str, Any]]
    tasks: dict[int, str]
    episodes: list[EpisodeMeta]
    info: dict[str, Any]
    _by_text: dict[str, int] | None = field(default=None, repr=False)

    def cameras(self) -> dict[str, str]:
        """Camera key -> ``video`` or ``image``, in the order info.json lists them."""
        return {k: f["dtype"] for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES}

    def task_index(self, text: str) -> int | None:
        if self._by_text is None:
            self._by_text = {}
            for i, t in sorted(self.tasks.items()):
                self._by_text.setdefault(t, i)
        return self._by_text.get(text)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ToolkitError(f"{path} is missing; the LeRobot dataset is incomplete (download its meta/ folder "
                           "again)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ToolkitError(f"{path} is missing; the LeRobot dataset is incomplete (download its meta/ folder "
                           "again)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path}: not readable ({str(e).splitlines()[0]})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ToolkitError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ToolkitError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        out.append(row)
    return out


def find_root(data: str | Path) -> Path:
    """The dataset folder: ``data`` itself, or for a hub cache folder (``datasets--OWNER--NAME``) the snapshot
    ``refs/main`` names (else its only snapshot)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise ToolkitError(f"no such directory {root} (pass --data DIR: a LeRobot dataset folder with meta/info.json)")
    if not root.is_dir():
        raise ToolkitError(f"{root} is a file; pass --data DIR, the LeRobot dataset folder holding meta/info.json")
    if (root / INFO).is_file() or not (root / "snapshots").is_dir():
        return root
    ref = root / "refs" / "main"
    if ref.is_file() and (root / "snapshots" / ref.read_text().strip() / INFO).is_file():
        return root / "snapshots" / ref.read_text().strip()
    snaps = sorted(p for p in (root / "snapshots").iterdir() if (p / INFO).is_file())
    if len(snaps) == 1:
        return snaps[0]
    raise ToolkitError(f"{root} is a hub cache folder with {len(snaps)} snapshots holding {INFO} and no refs/main "
                       "naming one; pass --data …/snapshots/<revision>")


def _template(info: dict[str, Any], key: str, where: Path, **values: Any) -> str:
    tpl = info.get(key)
    if not isinstance(tpl, str) or not tpl:
        raise ToolkitError(f"{where}: {key!r} is missing or not a path template")
    try:
        return tpl.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ToolkitError(f"{where}: the {key} template {tpl!r} names {e} that a {info.get('codebase_version')} "
                           f"dataset does not define") from None


def _int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise ToolkitError(f"{where}: {what} is {value!r}, expected a non-negative integer")
    return int(value)


def load_info(root: Path) -> dict[str, Any]:
    path = root / INFO
    if not path.is_file():
        raise ToolkitError(f"{path} is missing: {root} is not a LeRobot dataset (a LeRobot dataset folder holds "
                           "meta/info.json, data/ and, for video cameras, videos/)")
    info = _read_json(path)
    if not isinstance(info, dict):
        raise ToolkitError(f"{path}: expected a JSON object")
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise ToolkitError(f"{path}: codebase_version {version!r} is not a LeRobot layout this reader knows "
                           f"({', '.join(VERSIONS)}); convert it with lerobot's conversion scripts")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ToolkitError(f"{path}: fps is {fps!r}, expected a positive number")
    feats = info.get("features")
    if not isinstance(feats, dict) or not all(isinstance(f, dict) for f in feats.values()):
        raise ToolkitError(f"{path}: 'features' is missing or not an object of per-key objects")
    for key, f in feats.items():
        if f.get("dtype") in CAMERA_DTYPES:
            shape = f.get("shape")
            if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(s, int) for s in shape):
                raise ToolkitError(f"{path}: camera {key!r} has shape {shape!r}, expected [height, width, channels]")
            hwc = shape if shape[-1] in (1, 3, 4) else [shape[1], shape[2], shape[0]]  # some write [C, H, W]
            fields.image_shape(tuple(hwc), f"{path}: camera {key!r}")
    return info


def load(root: Path) -> Meta:
    """Read the metadata of the dataset in ``root`` (a ToolkitError names the file that is missing or wrong)."""
    info = load_info(root)
    version = info["codebase_version"]
    tasks, episodes = (_load_v3(root, info) if version == "v3.0" else _load_v2(root, info))
    if not episodes:
        raise ToolkitError(f"{root}: the dataset's metadata lists no episodes")
    return Meta(root=root, version=version, fps=float(info["fps"]), features=info["features"], tasks=tasks,
                episodes=sorted(episodes, key=lambda e: e.index), info=info)


# --------------------------------------------------------------------------- v2.0 / v2.1


def _load_v2(root: Path, info: dict[str, Any]) -> tuple[dict[int, str], list[EpisodeMeta]]:
    where = root / INFO
    chunk = info.get("chunks_size", 1000)
    chunk = _int(chunk, "chunks_size", str(where)) or 1000
    tasks: dict[int, str] = {}
    tpath = root / "meta" / "tasks.jsonl"
    for row in _read_jsonl(tpath):
        if "task_index" not in row or not isinstance(row.get("task"), str):
            raise ToolkitError(f"{tpath}: each line needs 'task_index' and a 'task' text, got {sorted(row)}")
        tasks[_int(row["task_index"], "task_index", str(tpath))] = row["task"]
    cams = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes = []
    epath = root / "meta" / "episodes.jsonl"
    for row in _read_jsonl(epath):
        for k in ("episode_index", "length"):
            if k not in row:
                raise ToolkitError(f"{epath}: an episode line lacks {k!r} (it has {', '.join(sorted(row))})")
        ep = _int(row["episode_index"], "episode_index", str(epath))
        text = row.get("tasks") or []
        text = [text] if isinstance(text, str) else [str(t) for t in text]
        data = root / _template(info, "data_path", where, episode_chunk=ep // chunk, episode_index=ep)
        videos = {k: VideoRef(root / _template(info, "video_path", where, episode_chunk=ep // chunk, video_key=k,
                                               episode_index=ep)) for k in cams}
        episodes.append(EpisodeMeta(ep, _int(row["length"], "length", str(epath)), text, data, videos))
    return tasks, episodes


# --------------------------------------------------------------------------- v3.0


def _parquet_rows(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise ToolkitError(f"{path} is missing; the LeRobot dataset is incomplete (download its meta/ folder "
                           "again)") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ToolkitError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    return table.to_pylist()


def _v3_tasks(root: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise ToolkitError(f"{path} is missing; the LeRobot dataset is incomplete (download its meta/ folder again)")
    rows = _parquet_rows(path)
    names = pq.read_schema(path).names
    text = "task" if "task" in names else "__index_level_0__" if "__index_level_0__" in names else None
    if "task_index" not in names or text is None:
        raise ToolkitError(f"{path}: expected the columns 'task' (or the pandas index) and 'task_index', got "
                           f"{', '.join(names)}")
    return {_int(r["task_index"], "task_index", str(path)): str(r[text]) for r in rows}


def _v3_episode_files(root: Path) -> list[Path]:
    d = root / "meta" / "episodes"
    files = sorted(d.glob("chunk-*/file-*.parquet")) if d.is_dir() else []
    if not files:
        raise ToolkitError(f"{d} holds no chunk-XXX/file-XXX.parquet files; the v3.0 dataset's episode metadata "
                           "is missing (download its meta/ folder again)")
    return files


def _load_v3(root: Path, info: dict[str, Any]) -> tuple[dict[int, str], list[EpisodeMeta]]:
    import pyarrow.parquet as pq

    where = root / INFO
    tasks = _v3_tasks(root)
    cams = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes = []
    for path in _v3_episode_files(root):
        names = pq.read_schema(path).names
        need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        need += [f"videos/{k}/{c}" for k in cams for c in ("chunk_index", "file_index", "from_timestamp")]
        missing = [c for c in need if c not in names]
        if missing:
            raise ToolkitError(f"{path}: the episode table lacks {', '.join(missing)}")
        cols = need + [c for c in ("tasks", *(f"videos/{k}/to_timestamp" for k in cams)) if c in names]
        for row in _parquet_rows(path, cols):
            ep = _int(row["episode_index"], "episode_index", str(path))
            text = row.get("tasks") or []
            text = [text] if isinstance(text, str) else [str(t) for t in text]
            data = root / _template(info, "data_path", where, chunk_index=row["data/chunk_index"],
                                    file_index=row["data/file_index"])
            videos = {}
            for k in cams:
                vpath = root / _template(info, "video_path", where, video_key=k,
                                         chunk_index=row[f"videos/{k}/chunk_index"],
                                         file_index=row[f"videos/{k}/file_index"])
                end = row.get(f"videos/{k}/to_timestamp")
                videos[k] = VideoRef(vpath, float(row[f"videos/{k}/from_timestamp"]),
                                     None if end is None else float(end))
            episodes.append(EpisodeMeta(ep, _int(row["length"], "length", str(path)), text, data, videos))
    return tasks, episodes
