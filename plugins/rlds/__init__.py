"""RLDS / Open X-Embodiment dataset adapter (tensorflow-datasets; optional extra ``pip install 'toolkit[rlds]'``).

``--data`` is one of:

* a local TFDS dataset directory: the version folder holding ``dataset_info.json`` / ``features.json``
  (e.g. ``modified_libero_rlds/libero_object_no_noops/1.0.0``) or its parent (the newest version is used);
* a ``gs://`` path to such a folder (e.g. ``gs://gresearch/robotics/fractal20220817_data/0.1.0``; needs
  access to the bucket);
* a registered TFDS name, ``name`` or ``name:version``, prepared in ``--dataset-option data_dir=DIR``
  (or TFDS' default data dir).

Options (``--dataset-option KEY=VALUE``): ``split`` (TFDS slicing, ``train[:10%]``), ``image_key``,
``wrist_image_key``, ``state_key``, ``action_key``, ``instruction_key`` (dot or slash notation for nested
keys; ``episode_metadata.*`` reads the episode's metadata, anything else the step, e.g.
``language_instruction`` or ``observation.natural_language_instruction``; ``none`` drops an optional key),
``num_episodes``, ``max_steps_per_episode``, ``step_stride``, ``data_dir``.  The defaults fit OpenVLA's
``modified_libero_rlds`` layout.  The seed script's ``--num_episodes`` / ``--max_steps_per_episode`` / stride
are also ``toolkit extract --max-episodes / --max-steps / --stride``, which apply to every dataset.

An action stored as a dict (RT-1 / fractal: ``world_vector``, ``rotation_delta``,
``gripper_closedness_action``, ``base_displacement_vector``, ``base_displacement_vertical_rotation``,
``terminate_episode``) is flattened into one vector: the parts named in ``ACTION_ORDER`` first (the 7-dim
end-effector action OpenVLA and Octo train on), then every other part in key order, nested dicts alike;
``describe()["action_parts"]`` (the store's ``dataset`` attribute) lists the parts and their sizes.  To keep
one part, name it: ``action_key=action/world_vector``.

Steps: ``images["agentview"]`` (image key), ``images["wrist"]`` (wrist key), ``state``, ``action`` and the
step's scalar fields (``is_first``, ``is_last``, ``is_terminal``, ``reward``, ``discount``, ...) as
``Step.fields``; the episode's instruction is its ``instruction`` and ``task`` (``task_id`` numbers the
distinct instructions in order of appearance).  TensorFlow is imported only when a dataset is read, and is
kept off the GPUs.

``length_hint``: TFDS' split info counts a split's episodes and bytes but not their steps, so the steps are
counted in one pass over the episodes that are read with their images left undecoded, when those episodes
(the split's size, scaled to the slice and ``num_episodes``) are at most ``HINT_BYTES``; a larger selection
gives no hint (no total in the progress bar: slice the split or set ``num_episodes`` to get one).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk import fields
from toolkit.sdk.adapters import DatasetAdapter, Episode, Step
from toolkit.sdk.options import int_option
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl

OPTIONS = {
    "split": "train",
    "image_key": "observation/image",
    "wrist_image_key": "observation/wrist_image",
    "state_key": "observation/state",
    "action_key": "action",
    "instruction_key": "language_instruction",
    "num_episodes": None,
    "max_steps_per_episode": None,
    "step_stride": 1,
    "data_dir": None,
}
OPTIONAL_KEYS = ("wrist_image_key", "state_key", "action_key")  # absent defaults are skipped silently
# a dict action's parts that come first, in this order (RT-1/fractal's end-effector action); others follow by key
ACTION_ORDER = ("world_vector", "rotation_delta", "gripper_closedness_action")
INSTALL = "pip install 'toolkit[rlds]'"
HINT_BYTES = 1 << 30  # the largest selection (bytes on disk) whose steps length_hint counts in a pass of its own


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _import_tfds():
    """tensorflow + tensorflow_datasets, imported on first use; TF is kept off the GPUs (torch's) and quiet:
    its C++ start-up lines (the oneDNN notice, absl's pre-init warning) are switched off before the import
    (TF only decodes records here, so oneDNN's numerics never matter) and its Python loggers show errors only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ToolkitError(f"the rlds dataset needs TensorFlow and tensorflow-datasets ({_one_line(e)}); "
                           f"install them with: {INSTALL}") from None
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass  # already initialised
    return tf, tfds


def _path(key: str) -> list[str]:
    return [p for p in re.split(r"[./]", key.strip()) if p]


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                out.extend(_flat_keys(v, name + "/"))
            elif k != "steps":
                out.append(name)
    return out


def _get(d: Any, parts: list[str]) -> Any:
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            raise KeyError(p)
        d = d[p]
    return d


def flatten_action(action: dict, where: str, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """A dict action's numeric parts as (dotted name, 1-D values), in the documented order (module doc)."""
    keys = [k for k in ACTION_ORDER if k in action] + sorted(k for k in action if k not in ACTION_ORDER)
    parts: list[tuple[str, np.ndarray]] = []
    for k in keys:
        name, v = f"{prefix}{k}", action[k]
        if isinstance(v, dict):
            parts.extend(flatten_action(v, where, f"{name}."))
            continue
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            raise ToolkitError(f"{where}: action part {name!r} is not numeric (dtype {a.dtype}); pick numeric parts "
                               f"with --dataset-option action_key=action/PART")
        parts.append((name, a.reshape(-1)))
    return parts


def _text(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.reshape(-1)[0] if v.size else b""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


class RLDSDataset(DatasetAdapter):
    """RLDS episodes (Open X-Embodiment, OpenVLA's modified_libero_rlds) read through tensorflow-datasets."""

    name = "rlds"
    description = "RLDS / Open X-Embodiment datasets via tensorflow-datasets (TFDS dir, gs:// path or TFDS name)"

    def __init__(self, data: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ToolkitError(f"rlds has no option {unknown[0]!r}; options: {', '.join(OPTIONS)}")
        super().__init__(data, **options)
        if not data:
            raise ToolkitError("the rlds dataset needs --data: a TFDS dataset directory (…/NAME/VERSION), "
                               "a gs:// path or a registered TFDS name")
        self.opts = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
        self.num_episodes = int_option(self.opts.get("num_episodes"), "rlds", "num_episodes", 1)
        self.max_steps = int_option(self.opts.get("max_steps_per_episode"), "rlds", "max_steps_per_episode", 1)
        self.stride = int_option(self.opts.get("step_stride"), "rlds", "step_stride", 1) or 1
        self.keys = {k: (None if str(self.opts[k]).lower() == "none" else str(self.opts[k]))
                     for k in ("image_key", "wrist_image_key", "state_key", "action_key", "instruction_key")}
        if self.keys["image_key"] is None or self.keys["instruction_key"] is None:
            raise ToolkitError("rlds options image_key and instruction_key cannot be none")
        self._builder = None
        self.action_parts: list[tuple[str, int]] | None = None  # a dict action's parts and sizes, once seen

    # opening ---------------------------------------------------------------------------------
    def builder(self):
        if self._builder is None:
            self._builder = self._open()
        return self._builder

    def _open(self):
        tf, tfds = _import_tfds()
        data = str(self.data)
        if data.startswith("gs://"):
            try:
                return tfds.builder_from_directory(data)
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"cannot read RLDS dataset {data} ({_one_line(e)}); check the path and that you "
                                   "have access (gcloud auth application-default login)") from None
        local = Path(data).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ToolkitError(f"RLDS --data {data} is a file; give the TFDS dataset directory (…/NAME/VERSION)")
            d = local
            if not (d / "dataset_info.json").is_file():
                versions = sorted((p for p in d.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()),
                                  key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"[.]", p.name)])
                if not versions:
                    raise ToolkitError(f"{data} is not a TFDS dataset directory: it has no dataset_info.json "
                                       "(give the …/NAME/VERSION folder, e.g. libero_object_no_noops/1.0.0)")
                d = versions[-1]
            try:
                return tfds.builder_from_directory(str(d))
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"cannot read the TFDS dataset in {d} ({_one_line(e)})") from None
        if data.startswith((".", "/", "~")) or data.count("/") > 1:
            raise ToolkitError(f"RLDS --data {data} does not exist: give a TFDS dataset directory, a gs:// path "
                               "or a registered TFDS name")
        try:
            b = tfds.builder(data, data_dir=self.opts["data_dir"])
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"{data!r} is neither a directory nor a registered TFDS dataset ({_one_line(e)})") from None
        if not b.is_prepared():
            raise ToolkitError(f"TFDS dataset {data!r} is not prepared in {b.data_dir}: download it first "
                               "(tfds build / gsutil -m cp -r) or give its directory as --data")
        return b

    def _dataset(self):
        tf, tfds = _import_tfds()
        b = self.builder()
        split = str(self.opts["split"])
        try:
            ds = b.as_dataset(split=split, shuffle_files=False)
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"cannot read split {split!r} of {self.data} ({_one_line(e)}); splits: "
                               f"{', '.join(sorted(b.info.splits)) or 'none'} (slicing like train[:10%] works)") from None
        if self.num_episodes is not None:
            ds = ds.take(self.num_episodes)
        return tfds, ds

    # the length hint ---------------------------------------------------------------------------------
    def _selection_bytes(self) -> tuple[int, float] | None:
        """(episodes, bytes on disk) of the episodes ``episodes()`` reads, from the split info (None: unknown)."""
        info = self.builder().info
        split = str(self.opts["split"])
        try:
            n = int(info.splits[split].num_examples)
            bases = [info.splits[b] for b in dict.fromkeys(re.findall(r"[A-Za-z_][\w-]*", split)) if b in info.splits]
        except Exception:  # noqa: BLE001 - an unusual split expression: no hint rather than a failure
            return None
        total_n, total_bytes = sum(int(b.num_examples) for b in bases), sum(int(b.num_bytes) for b in bases)
        if not n or not total_n or not total_bytes:
            return None
        if self.num_episodes is not None:
            n = min(n, self.num_episodes)
        return n, total_bytes * n / total_n

    def length_hint(self) -> list[int] | None:
        """Steps each episode yields (after ``max_steps_per_episode`` and ``step_stride``), counted in one pass that
        decodes no image, for a selection of at most ``HINT_BYTES`` (see the module doc); None above that."""
        sel = self._selection_bytes()
        if sel is None or sel[1] > HINT_BYTES:
            return None
        tf, tfds = _import_tfds()
        b = self.builder()
        try:
            ds = b.as_dataset(split=str(self.opts["split"]), shuffle_files=False,
                              decoders=_skip_images(b.info.features, tfds))
            if self.num_episodes is not None:
                ds = ds.take(self.num_episodes)
            counts = [int(n) for n in tfds.as_numpy(ds.map(lambda ep: ep["steps"].cardinality()))]
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"cannot read {self.data} ({_one_line(e)})") from None
        if any(n < 0 for n in counts):  # an unknown cardinality: no hint rather than a wrong one
            return None
        cap = self.max_steps
        return [len(range(0, n if cap is None else min(n, cap), self.stride)) for n in counts]

    # reading -------------------------------------------------------------------------------------
    def _lookup(self, option: str, episode: dict, step: dict, required: bool) -> Any:
        key = self.keys[option]
        if key is None:
            return None
        parts = _path(key)
        if parts and parts[0] == "steps":
            parts = parts[1:]
        src, where = (episode, "episode") if parts and parts[0] == "episode_metadata" else (step, "step")
        try:
            return _get(src, parts)
        except KeyError:
            if not required and self.opts[option] == OPTIONS[option]:
                return None  # an optional default this dataset does not have
            keys = [f"episode_metadata/{k}" for k in _flat_keys(episode.get("episode_metadata", {}))] \
                + _flat_keys(step)
            raise ToolkitError(f"rlds: {option}={key!r} is not a {where} key of {self.data}; keys: "
                               f"{', '.join(keys)}") from None

    def episodes(self) -> Iterator[Episode]:
        tfds, ds = self._dataset()
        task_ids: dict[str, int] = {}
        try:
            it = iter(tfds.as_numpy(ds))
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"cannot read {self.data} ({_one_line(e)})") from None
        for e, ep in enumerate(it):
            steps = list(ep["steps"]) if not isinstance(ep["steps"], list) else ep["steps"]
            if not steps:
                continue
            meta = {k: v for k, v in ep.items() if k != "steps"}
            instruction = _text(self._lookup("instruction_key", meta, steps[0], required=True)).strip()
            task_id = task_ids.setdefault(instruction, len(task_ids))
            md = {"n_steps": len(steps)}
            for k, v in (meta.get("episode_metadata") or {}).items():
                if not isinstance(v, dict):
                    md[k] = _text(v) if isinstance(v, (bytes, np.bytes_)) else np.asarray(v).tolist()
            key = f"{self.opts['split']}/episode_{e:06d}"
            end = len(steps) if self.max_steps is None else min(len(steps), self.max_steps)
            yield Episode(key=key, task=instruction, task_id=task_id,  # n_steps: the steps it yields
                          instruction=instruction, metadata=md, n_steps=len(range(0, end, self.stride)),
                          _steps=lambda steps=steps, meta=meta, key=key: self._steps(steps, meta, key))

    def _steps(self, steps: list[dict], meta: dict, key: str) -> Iterator[Step]:
        for k, st in enumerate(steps):
            if self.max_steps is not None and k >= self.max_steps:
                return
            if k % self.stride:
                continue
            where = f"{self.data}: {key} step {k}"
            images = {"agentview": self._image(self._lookup("image_key", meta, st, required=True), "image_key", where)}
            wrist = self._lookup("wrist_image_key", meta, st, required=False)
            if wrist is not None:
                images["wrist"] = self._image(wrist, "wrist_image_key", where)
            state = self._lookup("state_key", meta, st, required=False)
            action = self._lookup("action_key", meta, st, required=False)
            if isinstance(action, dict):
                parts = flatten_action(action, where)
                sizes = [(name, int(a.size)) for name, a in parts]
                if self.action_parts is not None and sizes != self.action_parts:
                    raise ToolkitError(f"{where}: the action's parts are {sizes}, but earlier steps had "
                                       f"{self.action_parts}")
                self.action_parts = sizes
                action = np.concatenate([a.astype(np.float32) for _, a in parts]) if parts else None
            scalars = {}
            for name, v in st.items():
                if isinstance(v, dict) or name == "action":
                    continue
                a = np.asarray(v)
                if a.ndim == 0 and a.dtype.kind in "biuf":
                    scalars[name] = a[()]  # numpy scalar: the store keeps its dtype
            yield Step(index=k, images=images, fields=scalars,
                       state=fields.vector(None if state is None else np.asarray(state).reshape(-1), "state", where),
                       action=fields.vector(None if action is None else np.asarray(action).reshape(-1), "action",
                                            where))

    def _image(self, v: Any, option: str, where: str) -> np.ndarray:
        a = np.asarray(v)
        if a.dtype.kind in "SO":  # encoded bytes (a dataset stored without the Image feature)
            import io

            from PIL import Image
            a = np.asarray(Image.open(io.BytesIO(_raw_bytes(a))).convert("RGB"))
        fields.image_shape(a.shape, f"{where}: {option}={self.keys[option]!r}")
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise ToolkitError(f"rlds: {option}={self.keys[option]!r} is not an image: shape {a.shape}")
        if a.dtype != np.uint8:
            fields.finite_image(a, f"{where}: {option}={self.keys[option]!r}")  # NaN would become black
            a = np.clip(a * 255.0 if a.dtype.kind == "f" and a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
        return a[..., :3] if a.shape[-1] >= 3 else np.repeat(a, 3, axis=-1)

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "keys": dict(self.keys), "split": self.opts["split"]}
        if self.action_parts is not None:
            out["action_parts"] = [list(p) for p in self.action_parts]
        return out


def _skip_images(feature: Any, tfds: Any) -> Any:
    """TFDS decoders that leave every Image feature encoded (counting steps needs no pixels)."""
    if isinstance(feature, tfds.features.Dataset):
        return _skip_images(feature.feature, tfds)
    if isinstance(feature, tfds.features.FeaturesDict):
        inner = {k: _skip_images(v, tfds) for k, v in feature.items()}
        return {k: v for k, v in inner.items() if v is not None} or None
    return tfds.decode.SkipDecoding() if isinstance(feature, tfds.features.Image) else None


def _raw_bytes(a: np.ndarray) -> bytes:
    v = a.reshape(-1)[0] if a.ndim else a.item()
    return bytes(v)


@hookimpl
def register_datasets(register):
    register(RLDSDataset)
