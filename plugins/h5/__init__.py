"""Mobile-VLA H5 dataset adapter: a directory of one-episode ``.h5`` files (h5py).

Each file (``episode_<YYYYMMDD_HHMMSS>_<scenario>.h5``) holds::

    images                (T, H, W, 3) uint8 RGB (720x1280 in the released set)
    actions               (T, k) float32 ([linear_x, linear_y, angular_z] for the collector)
    action_event_types    (T,) strings, optional (episode_start, start_action, w/a/s/d..., stop_action)
    language_instruction  (1,) bytes, optional
    attrs                 episode_name, num_frames, total_duration, action_chunk_size, [obstacle_layout_type, ...]

The instruction comes from, in order: the ``language_instruction`` dataset, a ``language_instruction`` file
attribute, a ``dataset_index.csv`` next to the files (``episode_path,instruction``), then the file-name rule of
Mobile-VLA's loader ("left"/"right" in the name -> "Navigate to the brown pot on the left/right"); each
episode's ``metadata["instruction_source"]`` says which rule was used.

Frames are read one at a time and resized on read so their longer side is at most ``image_size`` (224):
720p frames are never kept.  Options (``--dataset-option KEY=VALUE``): ``frames_per_episode`` (N evenly spaced
frames per episode, e.g. the seed's 5), ``stratify_by`` (task | direction | layout: with ``max_episodes``,
episodes are drawn round-robin across the key's groups, seeded), ``max_episodes``, ``skip_bad`` (warn about
an unreadable file and go on; the count is reported at the end), ``seed``, ``image_size``, ``camera`` (the
name of the image in ``Step.images``, default ``agentview``).
"""

from __future__ import annotations

import csv
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk import fields
from toolkit.sdk.adapters import DatasetAdapter, Episode, Step
from toolkit.sdk.options import int_option
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl

STRATA = ("task", "direction", "layout")
REQUIRED = ("images", "actions")
DIRECTIONS = ("left", "right", "straight", "center", "front")
_NAME = re.compile(r"^episode_(\d{8}_\d{6})_?(.*)$")
_LAYOUT = re.compile(r"(\d+box(?:_(?:vert|hori|vertical|horizontal))?|vert|hori)")
SKIP_HINT = "use --dataset-option skip_bad=true to skip unreadable files"


@dataclass
class EpisodeInfo:
    """What one file holds, read from its metadata and shapes (no frames)."""

    path: Path
    key: str
    episode_name: str
    num_frames: int
    image_shape: tuple[int, ...]
    action_dim: int
    instruction: str
    instruction_source: str
    task: str
    direction: str
    layout: str
    event_types: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    def stratum(self, key: str) -> str:
        return getattr(self, key)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace").strip("\x00").strip()
    return str(value).strip()


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_)):
        return _text(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
    return value


def scenario_of(name: str) -> str:
    """``episode_20250101_120000_1box_vert_left`` -> ``1box_vert_left`` (the name itself otherwise)."""
    m = _NAME.match(name)
    return (m.group(2) if m and m.group(2) else name) or name


def direction_of(name: str) -> str:
    tokens = re.split(r"[_\-\s]+", name.lower())
    for d in DIRECTIONS:
        if d in tokens:
            return d
    return "unknown"


def layout_of(name: str, attrs: dict[str, Any]) -> str:
    if attrs.get("obstacle_layout_type"):
        return _text(attrs["obstacle_layout_type"])
    m = _LAYOUT.search(name.lower())
    return m.group(1) if m else "unknown"


def instruction_from_name(name: str) -> tuple[str, str]:
    """Mobile-VLA's loader rule: left/right in the name -> its navigation instruction."""
    d = direction_of(name)
    if d in ("left", "right"):
        return f"Navigate to the brown pot on the {d}", f"file name ('{d}')"
    return "Navigate around obstacles and reach the target", "file name (no left/right: generic)"


def _read_index(root: Path) -> dict[str, str]:
    f = root / "dataset_index.csv"
    if not f.is_file():
        return {}
    out = {}
    with f.open(newline="") as fh:
        for row in csv.DictReader(fh):
            p, instr = row.get("episode_path"), row.get("instruction")
            if p and instr:
                out[Path(p).stem] = instr.strip()
    return out


def scan_file(path: Path, index: dict[str, str]) -> EpisodeInfo:
    """Validate one episode file and read its metadata; a ToolkitError names the file and the key (the
    caller adds the ``skip_bad`` hint when it applies)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ToolkitError(f"{path}: cannot open as HDF5 ({str(e).splitlines()[0]}); the file is truncated or "
                           "not an .h5 episode") from None
    with f:
        for key in REQUIRED:
            if key not in f:
                raise ToolkitError(f"{path}: missing key {key!r} (it has {', '.join(sorted(f.keys())) or 'no keys'})")
        images, actions = f["images"], f["actions"]
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ToolkitError(f"{path}: key 'images' has shape {images.shape}, expected (T, H, W, 3)")
        fields.image_shape(images.shape[1:], f"{path}: key 'images'")  # a frame is read whole, so bound it
        if actions.ndim == 2 and actions.shape[1] > fields.MAX_VECTOR:
            raise ToolkitError(f"{path}: key 'actions' has {actions.shape[1]:,} values per step; at most "
                               f"{fields.MAX_VECTOR} are expected")
        if actions.ndim not in (1, 2) or actions.shape[0] != images.shape[0]:
            raise ToolkitError(f"{path}: key 'actions' has shape {actions.shape}, expected ({images.shape[0]}, k)")
        t = int(images.shape[0])
        if t == 0:
            raise ToolkitError(f"{path}: key 'images' holds no frames")
        try:  # touch the last frame and action: a truncated file fails here, not halfway through a run
            images[t - 1]
            actions[t - 1]
            events = [_text(v) for v in f["action_event_types"][:]] if "action_event_types" in f else []
        except (OSError, ValueError, KeyError) as e:
            raise ToolkitError(f"{path}: cannot read key 'images'/'actions' ({str(e).splitlines()[0]}); the file "
                               "looks truncated") from None
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        name = _text(attrs.get("episode_name") or path.stem)
        if "language_instruction" in f and _text(f["language_instruction"][()]):
            instr, source = _text(f["language_instruction"][()]), "dataset 'language_instruction'"
        elif attrs.get("language_instruction"):
            instr, source = _text(attrs["language_instruction"]), "attribute 'language_instruction'"
        elif path.stem in index:
            instr, source = index[path.stem], "dataset_index.csv"
        else:
            instr, source = instruction_from_name(f"{path.stem} {name}")
        if events and len(events) != t:
            raise ToolkitError(f"{path}: key 'action_event_types' has {len(events)} entries for {t} frames")
        return EpisodeInfo(path=path, key=path.stem, episode_name=name, num_frames=t, image_shape=tuple(images.shape[1:]),
                           action_dim=int(actions.shape[1]) if actions.ndim == 2 else 1, instruction=instr,
                           instruction_source=source, task=scenario_of(name), direction=direction_of(f"{path.stem}_{name}"),
                           layout=layout_of(f"{path.stem}_{name}", attrs), event_types=events, attrs=attrs)


def _resize(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(img[..., :3])
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img[..., :3])).resize(size, Image.BILINEAR, reducing_gap=2.0))


def frame_indices(n_frames: int, per_episode: int | None) -> list[int]:
    """``per_episode`` evenly spaced frames (first and last included), or all of them."""
    if not per_episode or per_episode >= n_frames:
        return list(range(n_frames))
    return sorted({int(round(x)) for x in np.linspace(0, n_frames - 1, per_episode)})


def stratified(infos: list[EpisodeInfo], key: str | None, n: int | None, seed: int) -> list[EpisodeInfo]:
    """Up to ``n`` episodes drawn round-robin over the groups of ``key`` (seeded shuffle within each group),
    returned in file order.  Without ``key`` the first ``n`` files."""
    if n is None or n >= len(infos):
        return list(infos)
    if key is None:
        return list(infos[:n])
    groups: dict[str, list[EpisodeInfo]] = defaultdict(list)
    for info in infos:
        groups[info.stratum(key)].append(info)
    rng = random.Random(seed)
    order = sorted(groups)
    for g in order:
        rng.shuffle(groups[g])
    chosen: list[EpisodeInfo] = []
    while len(chosen) < n:
        for g in order:
            if groups[g] and len(chosen) < n:
                chosen.append(groups[g].pop())
    pos = {id(i): k for k, i in enumerate(infos)}
    return sorted(chosen, key=lambda i: pos[id(i)])


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class H5Dataset(DatasetAdapter):
    """Mobile-VLA style one-episode .h5 files (images, actions, event types, instruction)."""

    name = "h5"
    description = "Mobile-VLA H5 episodes (a directory of one-episode .h5 files; needs --data DIR)"
    OPTIONS = ("frames_per_episode", "stratify_by", "max_episodes", "skip_bad", "seed", "image_size", "camera")

    def __init__(self, data: str | None = None, frames_per_episode: Any = None, stratify_by: str | None = None,
                 max_episodes: Any = None, skip_bad: Any = False, seed: Any = 0, image_size: Any = 224,
                 camera: str = "agentview", **options: Any) -> None:
        if options:
            raise ToolkitError(f"dataset 'h5' has no option {sorted(options)[0]!r}; options: {', '.join(self.OPTIONS)}")
        if data is None:
            raise ToolkitError("dataset 'h5' has no embedded sample: pass --data DIR (a directory of Mobile-VLA "
                               "episode .h5 files)")
        if stratify_by is not None and stratify_by not in STRATA:
            raise ToolkitError(f"dataset 'h5' stratify_by {stratify_by!r}: use one of {', '.join(STRATA)}")
        given = {k: v for k, v in (("frames_per_episode", frames_per_episode), ("stratify_by", stratify_by),
                                   ("max_episodes", max_episodes), ("skip_bad", skip_bad or None)) if v is not None}
        super().__init__(str(data), **given)
        self.frames_per_episode = int_option(frames_per_episode, "dataset 'h5'", "frames_per_episode", 1)
        self.max_episodes = int_option(max_episodes, "dataset 'h5'", "max_episodes", 1)
        self.image_size = int_option(image_size, "dataset 'h5'", "image_size", 1)
        self.stratify_by = stratify_by
        self.skip_bad = _as_bool(skip_bad)
        self.seed = int(seed or 0)
        self.camera = camera
        self.root = Path(self.data).expanduser()
        if not self.root.exists():
            raise ToolkitError(f"no such file or directory {self.data} (pass --data DIR with episode .h5 files)")
        self.files = [self.root] if self.root.is_file() else sorted(
            p for p in self.root.iterdir() if p.suffix.lower() in (".h5", ".hdf5") and p.is_file())
        if not self.files:
            raise ToolkitError(f"{self.root} holds no .h5 files (expected one Mobile-VLA episode per file)")
        self.bad: list[tuple[Path, str]] = []
        self._infos: list[EpisodeInfo] | None = None

    # metadata -------------------------------------------------------------------------------
    def infos(self) -> list[EpisodeInfo]:
        """Every readable file's metadata (bad files raise, or are skipped with a warning under skip_bad)."""
        if self._infos is None:
            index = _read_index(self.root if self.root.is_dir() else self.root.parent)
            infos = []
            for path in self.files:
                try:
                    infos.append(scan_file(path, index))
                except ToolkitError as e:
                    if not self.skip_bad:
                        raise ToolkitError(f"{e} ({SKIP_HINT})") from None
                    self.bad.append((path, str(e)))
                    warnings.warn(f"h5: skipping {e}", stacklevel=2)
            if not infos:
                raise ToolkitError(f"no readable episode in {self.root} ({len(self.bad)} bad files skipped)")
            self._infos = infos
        return self._infos

    def selected(self) -> list[EpisodeInfo]:
        return stratified(self.infos(), self.stratify_by, self.max_episodes, self.seed)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._infos is not None:
            out["skipped_files"] = [str(p) for p, _ in self.bad]
        return out

    def length_hint(self) -> list[int]:
        """Frames read from each selected episode: from the files' metadata, which ``episodes()`` reads anyway."""
        return [len(frame_indices(i.num_frames, self.frames_per_episode)) for i in self.selected()]

    # episodes ---------------------------------------------------------------------------------
    def episodes(self) -> Iterator[Episode]:
        infos = self.infos()
        task_ids = {t: i for i, t in enumerate(sorted({i.task for i in infos}))}
        for info in self.selected():
            frames = frame_indices(info.num_frames, self.frames_per_episode)
            yield Episode(
                key=info.key, task=info.task, task_id=task_ids[info.task], instruction=info.instruction,
                metadata={"episode_name": info.episode_name, "num_frames": info.num_frames,
                          "instruction_source": info.instruction_source, "direction": info.direction,
                          "layout": info.layout, "file": str(info.path),
                          **{k: v for k, v in info.attrs.items() if k not in ("episode_name", "num_frames")}},
                n_steps=len(frames), _steps=lambda info=info, frames=frames: self._steps(info, frames))
        if self.bad:
            warnings.warn(f"h5: skipped {len(self.bad)} of {len(self.files)} files as unreadable "
                          f"(first: {self.bad[0][0].name})", stacklevel=2)

    def _steps(self, info: EpisodeInfo, frames: list[int]) -> Iterator[Step]:
        import h5py

        try:
            f = h5py.File(info.path, "r")
        except OSError as e:
            raise ToolkitError(f"{info.path}: cannot open as HDF5 ({str(e).splitlines()[0]})") from None
        with f:
            images, actions = f["images"], f["actions"]
            for i in frames:
                try:
                    img, act = images[i], actions[i]
                except (OSError, ValueError) as e:
                    raise ToolkitError(f"{info.path}: cannot read frame {i} of key 'images' "
                                       f"({str(e).splitlines()[0]}); the file looks truncated") from None
                yield Step(index=i, images={self.camera: _resize(np.asarray(img), self.image_size)},
                           action=fields.vector(np.asarray(act).reshape(-1), "action",
                                                f"{info.path}: key 'actions' frame {i}"),
                           fields={"event_type": info.event_types[i] if info.event_types else ""})

    # summary ------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Episodes by task/direction/layout, frames, instructions and event types; no model, no frames read."""
        infos = self.infos()
        sel = self.selected()
        frames = np.array([i.num_frames for i in infos])
        events: Counter = Counter()
        for i in infos:
            events.update(i.event_types)
        per = self.frames_per_episode
        return {
            "dataset": "h5", "data": str(self.root), "n_files": len(self.files), "n_episodes": len(infos),
            "n_bad_files": len(self.bad), "bad_files": {p.name: msg for p, msg in self.bad},
            "frames": {"total": int(frames.sum()), "min": int(frames.min()), "max": int(frames.max()),
                       "mean": round(float(frames.mean()), 3)},
            "image_shapes": dict(Counter("x".join(map(str, i.image_shape)) for i in infos)),
            "action_dims": dict(Counter(str(i.action_dim) for i in infos)),
            "by_task": dict(sorted(Counter(i.task for i in infos).items())),
            "by_direction": dict(sorted(Counter(i.direction for i in infos).items())),
            "by_layout": dict(sorted(Counter(i.layout for i in infos).items())),
            "instructions": dict(Counter(i.instruction for i in infos).most_common()),
            "instruction_sources": dict(Counter(i.instruction_source for i in infos).most_common()),
            "event_types": dict(events.most_common()),
            "sampling": {"stratify_by": self.stratify_by, "max_episodes": self.max_episodes,
                         "frames_per_episode": per, "seed": self.seed, "n_episodes": len(sel),
                         "n_frames": int(sum(len(frame_indices(i.num_frames, per)) for i in sel)),
                         "by_stratum": dict(sorted(Counter(i.stratum(self.stratify_by) for i in sel).items()))
                         if self.stratify_by else None,
                         "episodes": [i.key for i in sel]},
        }


@hookimpl
def register_datasets(register):
    register(H5Dataset)
