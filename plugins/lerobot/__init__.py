"""LeRobot dataset adapter: the format pi0, pi0.5 and SmolVLA users keep their robot data in (optional extra
``pip install 'toolkit[lerobot]'``: pyarrow and PyAV).

``--data DIR`` is a dataset folder holding ``meta/info.json`` (a local copy, or a hub cache snapshot: the
``datasets--OWNER--NAME`` folder works too, read offline), in any of lerobot's layouts (``meta.py`` describes them):
``codebase_version`` v2.0 (e.g. ``physical-intelligence/libero``, whose cameras are PNG images inside the parquet
files), v2.1 (one parquet and one mp4 per episode) and v3.0 (many episodes per parquet and mp4 file).

Episodes come in ``episode_index`` order, keyed ``episode_NNNNNN``; an episode's task and instruction are its
first task's text (``meta/tasks.*``), ``task_id`` its ``task_index``.  A step is one frame: ``Step.index`` is its
``frame_index``; ``images["agentview"]`` and ``images["wrist"]`` (the names pi0's image slots and OpenVLA's single
image read) are the cameras that ``image_key`` and ``wrist_image_key`` name, decoded only when a step's image is
read, so the frames that ``--stride`` / ``--max-steps`` skip are never converted (a video is decoded forward
from the nearest key frame; see ``video.py``).  A video frame is the one at the row's ``timestamp`` (v3.0: plus
the episode's ``from_timestamp`` in the file), within ``tolerance_s`` as lerobot checks it.  ``state`` and
``action`` are the ``state_key`` / ``action_key`` columns; every other numeric scalar feature (``timestamp``,
``next.reward``, ``next.done``, ...) is a ``Step.fields`` entry, dots turned into underscores.  Where the data
records success (a ``next.success`` or ``success`` column) the episode's ``success`` is whether any of its frames
has it; otherwise it is absent (stored as unknown).

Options (``--dataset-option KEY=VALUE``; ``toolkit plugins --verbose`` lists them): ``image_key``,
``wrist_image_key``, ``state_key``, ``action_key`` (``none`` drops the optional ones; defaults: the first present
of the names in ``DEFAULT_KEYS``, which fit LIBERO converted by openpi, ``image``/``wrist_image``/``state``/
``actions``, and by lerobot, ``observation.images.image``/``observation.images.image2`` or ``…wrist_image``/
``observation.state``/``action``), ``tasks`` and ``episodes`` (``task_index`` / ``episode_index`` selections,
e.g. ``0-4``; ``--tasks`` sets the first), ``tolerance_s``.  A camera key the dataset lacks is an error listing
the cameras it has.

The reader is pyarrow plus PyAV, chosen by measurement: lerobot's own dataset classes (``lerobot``,
``lerobot-dataset``) import torchvision, which does not load beside this project's torch, and read only v3.0;
torchcodec (lerobot's default decoder) needs a system FFmpeg and a CUDA runtime; PyAV ships its own FFmpeg with
AV1 (dav1d) and H.264 decoders and imports in ~60 ms, pyarrow's parquet reader in ~300 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from pydantic import Field

from toolkit.sdk import fields
from toolkit.sdk.adapters import DatasetAdapter, Episode, Step
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl
from toolkit.sdk.names import IndexSpec
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit_plugins.lerobot import meta as lr_meta
from toolkit_plugins.lerobot.table import EpisodeRows, TableCache, decode_image
from toolkit_plugins.lerobot.video import VideoCache

# option -> the keys tried, in order, when the option is not given
DEFAULT_KEYS = {
    "image_key": ("observation.images.image", "image", "observation.images.agentview", "observation.image"),
    "wrist_image_key": ("observation.images.wrist_image", "wrist_image", "observation.images.image2",
                        "observation.images.wrist"),
    "state_key": ("observation.state", "state"),
    "action_key": ("action", "actions"),
}
CAMERAS = {"image_key": "agentview", "wrist_image_key": "wrist"}  # option -> Step.images name
SUCCESS_KEYS = ("next.success", "success")
BOOKKEEPING = ("episode_index", "task_index", "index", "frame_index")  # columns that are not step fields


class LeRobotOptions(AdapterOptions):
    """The ``--dataset-option`` names of the lerobot dataset."""

    image_key: str | None = Field(None, description="camera for images['agentview'] (pi0's base image, OpenVLA's "
                                                     "image); default: the first present of " +
                                                     ", ".join(DEFAULT_KEYS["image_key"]))
    wrist_image_key: str | None = Field(None, description="camera for images['wrist'], or none; default: the "
                                                           "first present of " +
                                                           ", ".join(DEFAULT_KEYS["wrist_image_key"]))
    state_key: str | None = Field(None, description="state column, or none (default: observation.state, state)")
    action_key: str | None = Field(None, description="action column, or none (default: action, actions)")
    tasks: str | list[int | str] | None = Field(None, description="task_index selection, e.g. 0-4 (default: all)")
    episodes: str | list[int | str] | None = Field(None, description="episode_index selection, e.g. 0-9,20 "
                                                                      "(default: all)")
    tolerance_s: float = Field(1e-4, ge=0, description="largest distance in seconds between a row's timestamp "
                                                        "and its video frame (lerobot's default)")


class LazyImages(Mapping):
    """``Step.images``: each camera decoded on first read (a skipped step's frames are never decoded)."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]):
        self._loaders = loaders
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._done:
            self._done[name] = self._loaders[name]()
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"LazyImages({', '.join(self._loaders)})"


def _selection(value: Any, option: str) -> frozenset[int] | None:
    return IndexSpec.parse(value, option).literal()


class LeRobotDataset(DatasetAdapter):
    """LeRobot datasets (v2.0 images in parquet, v2.1 and v3.0 with mp4 videos) read with pyarrow and PyAV."""

    name = "lerobot"
    description = ("LeRobot datasets, codebase v2.0 / v2.1 / v3.0 (a folder with meta/info.json, or a hub cache "
                   "snapshot; needs --data DIR and toolkit[lerobot])")
    Options = LeRobotOptions

    def __init__(self, data: str | None = None, **options: Any) -> None:
        if data is None:
            raise ToolkitError("dataset 'lerobot' has no embedded sample: pass --data DIR, a LeRobot dataset folder "
                               "(meta/info.json, data/, videos/) or its hub cache folder")
        o = LeRobotOptions(**parse_options(type(self), options, "dataset 'lerobot'"))
        super().__init__(str(data), **{k: v for k, v in options.items() if v is not None})
        self.tolerance_s = o.tolerance_s
        self.root = lr_meta.find_root(data)
        self.meta = lr_meta.load(self.root)
        self.keys = {opt: self._resolve(opt, getattr(o, opt)) for opt in DEFAULT_KEYS}
        self._tasks = _selection(o.tasks, "tasks")
        self._episodes = _selection(o.episodes, "episodes")
        self._check_selection()
        feats = self.meta.features
        self.success_key = next((k for k in SUCCESS_KEYS if k in feats), None)
        used = set(self.keys.values()) | {self.success_key}
        self.field_keys = [k for k, f in feats.items() if k not in used and k not in BOOKKEEPING
                           and f.get("dtype") not in lr_meta.CAMERA_DTYPES and _scalar(f)]
        self._tables = TableCache()
        self._videos = VideoCache()

    # keys and selection ------------------------------------------------------------------------------
    def _resolve(self, option: str, given: str | None) -> str | None:
        feats = self.meta.features
        cams = self.meta.cameras()
        camera = option in CAMERAS
        have = list(cams) if camera else [k for k, f in feats.items() if k not in cams]
        where = f"{self.root / lr_meta.INFO}"
        if given is not None and given.strip().lower() == "none":
            if option == "image_key":
                raise ToolkitError("dataset 'lerobot' option image_key cannot be none: the models need an image")
            return None
        if given is not None:
            if given not in have:
                kind = "camera" if camera else "feature"
                raise ToolkitError(f"{where}: no {kind} {given!r} for {option}; the dataset's {kind}s: "
                                   f"{', '.join(have) or 'none'}")
            return given
        found = next((k for k in DEFAULT_KEYS[option] if k in have), None)
        if found is None and option == "image_key":
            raise ToolkitError(f"{where}: none of the default cameras ({', '.join(DEFAULT_KEYS[option])}) is in the "
                               f"dataset; choose one with --dataset-option image_key=KEY (cameras: "
                               f"{', '.join(cams) or 'none'})")
        return found

    def _check_selection(self) -> None:
        known = {e.index for e in self.meta.episodes}
        if self._episodes is not None and not self._episodes & known:
            raise ToolkitError(f"dataset 'lerobot': episodes={self.options.get('episodes')!r} selects none of the "
                               f"dataset's episode indices ({min(known)}-{max(known)}, {len(known)} episodes)")
        if self._tasks is not None and not self._tasks & set(self.meta.tasks):
            raise ToolkitError(f"dataset 'lerobot': tasks={self.options.get('tasks')!r} selects none of the "
                               f"dataset's task indices ({', '.join(map(str, sorted(self.meta.tasks)))})")

    def _task(self, ep: lr_meta.EpisodeMeta) -> tuple[str, int | None]:
        text = ep.tasks[0] if ep.tasks else ""
        return text, self.meta.task_index(text) if text else None

    def selected(self) -> list[lr_meta.EpisodeMeta]:
        out = []
        for ep in self.meta.episodes:
            if self._episodes is not None and ep.index not in self._episodes:
                continue
            if self._tasks is not None and not any(self.meta.task_index(t) in self._tasks for t in ep.tasks):
                continue
            out.append(ep)
        return out

    def length_hint(self) -> list[int]:
        """Frames of each selected episode, from the metadata (episodes.jsonl / the v3.0 episode table)."""
        return [ep.length for ep in self.selected()]

    # episodes -------------------------------------------------------------------------------------------
    def episodes(self) -> Iterator[Episode]:
        for ep in self.selected():
            text, task_id = self._task(ep)
            md = {"episode_index": ep.index, "length": ep.length, "file": str(ep.data_path),
                  "codebase_version": self.meta.version, "fps": self.meta.fps}
            if len(ep.tasks) > 1:
                md["tasks"] = list(ep.tasks)
            episode = Episode(key=f"episode_{ep.index:06d}", task=text, task_id=task_id if task_id is not None else -1,
                              instruction=text, metadata=md, n_steps=ep.length)
            episode._steps = lambda ep=ep, episode=episode: self._steps(ep, episode)
            yield episode

    def _columns(self) -> list[str]:
        cols = ["episode_index", "frame_index", "timestamp", "task_index"]
        cols += [k for k in self.keys.values() if k is not None and self.meta.features[k].get("dtype") != "video"]
        cols += [k for k in (self.success_key, *self.field_keys) if k is not None]
        v3 = self.meta.version == "v3.0"  # many episodes per file: their rows are told apart by episode_index
        return [c for c in dict.fromkeys(cols) if c in self.meta.features or (v3 and c == "episode_index")]

    def _rows(self, ep: lr_meta.EpisodeMeta, episode: Episode) -> EpisodeRows:
        rows = self._tables.rows(ep.data_path, self._columns(), ep.index, f"episode {ep.index}")
        if rows.n != ep.length:
            raise ToolkitError(f"{ep.data_path}: episode {ep.index} has {rows.n} rows, but the metadata says "
                               f"{ep.length} frames; the dataset is inconsistent (re-download it)")
        if episode.task_id == -1:  # the metadata names no task of the tasks table: the rows' task_index does
            tid = int(rows.scalars("task_index")[0]) if rows.has("task_index") and rows.n else None
            if tid not in self.meta.tasks:
                raise ToolkitError(f"{ep.data_path}: episode {ep.index}'s task ({ep.tasks or tid}) is not in the "
                                   f"dataset's tasks table (meta/tasks.*); the metadata is inconsistent")
            episode.task_id = tid
            episode.task = episode.instruction = self.meta.tasks[tid]
        if self.success_key is not None:
            episode.metadata["success"] = bool(np.any(rows.scalars(self.success_key)))
        return rows

    def _steps(self, ep: lr_meta.EpisodeMeta, episode: Episode) -> Iterator[Step]:
        rows = self._rows(ep, episode)
        n = rows.n
        frame = rows.scalars("frame_index").astype(np.int64) if rows.has("frame_index") else np.arange(n)
        ts = rows.scalars("timestamp").astype(np.float64) if rows.has("timestamp") else frame / self.meta.fps
        state = rows.matrix(self.keys["state_key"]) if self.keys["state_key"] else None
        action = rows.matrix(self.keys["action_key"]) if self.keys["action_key"] else None
        extra = {k.replace(".", "_"): rows.scalars(k) for k in self.field_keys if k != "timestamp" and rows.has(k)}
        cams = self.meta.cameras()
        cells = {opt: rows.cells(k) for opt, k in self.keys.items()
                 if opt in CAMERAS and k is not None and cams[k] == "image"}
        for opt, k in self.keys.items():
            if opt in CAMERAS and k is not None and cams[k] == "video" and not ep.videos[k].path.is_file():
                raise ToolkitError(f"{ep.videos[k].path}: the video file of camera {k!r} (episode {ep.index}) is "
                                   "missing; download the dataset's videos/ folder")
        for i in range(n):
            where = f"{ep.data_path}: episode {ep.index} frame {int(frame[i])}"
            loaders = {}
            for opt, k in self.keys.items():
                if opt not in CAMERAS or k is None:
                    continue
                if opt in cells:
                    loaders[CAMERAS[opt]] = (lambda c=cells[opt][i], w=f"{where} camera {k!r}":
                                             decode_image(c, self.root, w))
                else:
                    loaders[CAMERAS[opt]] = (lambda ref=ep.videos[k], t=float(ts[i]), k=k, f=int(frame[i]):
                                             self._video_frame(ref, t, k, ep.index, f))
            step_fields: dict[str, Any] = {"timestamp": np.float32(ts[i])}
            step_fields.update({name: v[i] for name, v in extra.items()})
            yield Step(index=int(frame[i]), images=LazyImages(loaders),
                       state=None if state is None else fields.vector(state[i], "state", where),
                       action=None if action is None else fields.vector(action[i], "action", where),
                       fields=step_fields)

    def _video_frame(self, ref: lr_meta.VideoRef, t: float, key: str, episode: int, frame: int) -> np.ndarray:
        info = self.meta.features[key].get("info") or {}
        reader = self._videos.get(ref.path, info.get("video.codec"))
        return reader.frame(ref.offset + t, self.tolerance_s, f" (camera {key!r}, episode {episode} frame {frame}, "
                                                             f"timestamp {t:.4f} s)")

    # provenance and summary -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "codebase_version": self.meta.version, "fps": self.meta.fps,
                "keys": dict(self.keys), "cameras": {CAMERAS[o]: k for o, k in self.keys.items()
                                                     if o in CAMERAS and k is not None},
                "success_key": self.success_key, "tolerance_s": self.tolerance_s}

    def summary(self) -> dict[str, Any]:
        """Episodes by task, frames, cameras and the key mapping, from the metadata alone."""
        from collections import Counter

        sel = self.selected()
        lengths = np.array([e.length for e in sel] or [0])
        return {"dataset": self.name, "data": str(self.root), "n_episodes": len(sel),
                "frames": {"total": int(lengths.sum()), "min": int(lengths.min()), "max": int(lengths.max()),
                           "mean": round(float(lengths.mean()), 3)},
                "codebase_version": self.meta.version, "fps": self.meta.fps,
                "cameras": {k: f"{self.meta.features[k]['dtype']} {self.meta.features[k].get('shape')}"
                            for k in self.meta.cameras()},
                "keys": {k: v for k, v in self.keys.items()},
                "by_task": dict(sorted(Counter(self._task(e)[0] for e in sel).items()))}


def _scalar(feature: dict[str, Any]) -> bool:
    shape = feature.get("shape")
    numeric = str(feature.get("dtype", "")).startswith(("float", "int", "uint", "bool"))
    return numeric and (shape in (None, [], [1], (1,), ()))


@hookimpl
def register_datasets(register):
    register(LeRobotDataset)
