"""LIBERO dataset adapter: rollout pickles from pi0's LIBERO latent collection (``task_{id}_{name}.pkl``).

Each pickle holds one task::

    {"task_name", "task_id", "task_description",
     "episodes": {"episode_N": {"rollout_steps": {"step_K": {"timestep", "action", "observation",
                                                             <latents>...}},
                                "metadata": {"success", "total_steps", "episode_idx"}}}}

Latents a step may carry, mapped to ``Step.activations`` ("expert/stream", batch dim squeezed):

* ``vlm_layer_output`` {hidden_states, post_attn_embedding, pre_attn_norm_scales, pre_mlp_norm_scales}
  -> ``vlm/resid_post``, ``vlm/resid_mid``, ``vlm/pre_attn_norm_scale``, ``vlm/pre_mlp_norm_scale``
* ``action_expert_hidden_state_t{t}`` (same four keys, one per flow-matching step)
  -> ``action/<stream>`` stacked along a denoise axis, t descending: (layer, denoise, token, feature)
* older pickles: ``expert_0_hidden_states`` -> ``vlm/resid_post``, ``expert_1_hidden_states`` ->
  ``action/resid_post`` (no denoise axis), ``text_only_hidden_states`` -> ``text_only/resid_post``.

Without ``data`` the adapter reads its embedded sample (``data/``: the 10 libero_object tasks,
4 episodes x 6 steps, two 32x32 cameras, no latents), made by ``toolkit_plugins.libero.sample``.
Pickles are read through ``toolkit.sdk.safe_pickle`` (numpy arrays and plain containers only), one task
file at a time, when its episodes are reached.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk import fields, safe_pickle
from toolkit.sdk.adapters import ActivationLayout, DatasetAdapter, Episode, Expert, SiteInfo, Step
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl
from toolkit.sdk.names import IndexSpec
from toolkit_plugins.libero.tasks import language_from_name

SAMPLE_DIR = Path(__file__).parent / "data"
TEXT_TOKENS = 48  # pi0's LIBERO prompt length: the last 48 positions of the VLM sequence
IMAGE_TOKENS_PER_VIEW = 256  # 224x224 SigLIP, 14x14 patches
HINT_BYTES = 64 * 2**20  # selected pickles up to this size are read once more to count their steps (length_hint)

CAMERAS = {
    "agentview": ("agentview_image", "image", "observation/image", "base_image", "base_0_rgb"),
    "wrist": ("wrist_image", "robot0_eye_in_hand_image", "observation/wrist_image", "left_wrist_0_rgb"),
}
STATE_KEYS = ("state", "observation/state")

VLM_KEY = "vlm_layer_output"
ACTION_PREFIX = "action_expert_hidden_state_t"
# the pickles' per-forward keys -> public stream names
SUB_STREAMS = {
    "hidden_states": "resid_post",
    "post_attn_embedding": "resid_mid",
    "pre_attn_norm_scales": "pre_attn_norm_scale",
    "pre_mlp_norm_scales": "pre_mlp_norm_scale",
    "mlp_activation": "mlp_post",
}
SCALE_STREAMS = ("pre_attn_norm_scale", "pre_mlp_norm_scale")
PLAIN_KEYS = {  # older pickles: one array per expert, resid_post only
    "expert_0_hidden_states": "vlm",
    "expert_1_hidden_states": "action",
    "text_only_hidden_states": "text_only",
}

_FILE_ID = re.compile(r"^task_(\d+)(?:_|\.pkl$)")
_TRAILING_INT = re.compile(r"(\d+)$")
_T_KEY = re.compile(rf"^{re.escape(ACTION_PREFIX)}(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)$")


# --------------------------------------------------------------------------- options


def parse_selection(value: Any, option: str) -> frozenset[int] | None:
    """``None`` | int | "0-4" | "0,2,5-7" | [0, 1, "3-4"] -> a set of non-negative ints (``toolkit.sdk.names`` grammar)."""
    return IndexSpec.parse(value, option).literal()


def _file_task_id(path: Path) -> int | None:
    m = _FILE_ID.match(path.name)
    return int(m.group(1)) if m else None


def _number(key: str, fallback: int) -> int:
    m = _TRAILING_INT.search(str(key))
    return int(m.group(1)) if m else fallback


MAX_METADATA_DEPTH = 16
MAX_METADATA_VALUES = 100_000


def _plain(value: Any, where: str) -> Any:
    """numpy scalars/arrays in metadata -> JSON-friendly Python values, refusing (one line naming ``where``)
    metadata that refers to itself, nests deeper than ``MAX_METADATA_DEPTH`` or holds more than
    ``MAX_METADATA_VALUES`` values once shared parts are copied (the store keeps metadata as JSON)."""
    budget = [MAX_METADATA_VALUES]
    path: set[int] = set()

    def spend(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise ToolkitError(f"{where} holds more than {MAX_METADATA_VALUES:,} values; episode metadata is "
                               "kept as JSON in the store, keep it small")

    def conv(v: Any, depth: int) -> Any:
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray) and not v.dtype.hasobject:
            spend(v.size)
            return v.tolist()
        if isinstance(v, (dict, list, tuple, np.ndarray)):
            if id(v) in path:
                raise ToolkitError(f"{where} refers to itself (a container inside its own contents)")
            if depth >= MAX_METADATA_DEPTH:
                raise ToolkitError(f"{where} nests containers more than {MAX_METADATA_DEPTH} levels deep")
            spend(len(v))
            path.add(id(v))
            try:
                if isinstance(v, dict):
                    return {str(k): conv(x, depth + 1) for k, x in v.items()}
                return [conv(x, depth + 1) for x in (v.reshape(-1) if isinstance(v, np.ndarray) else v)]
            finally:
                path.discard(id(v))
        return v

    return conv(value, 0)


# --------------------------------------------------------------------------- per-step conversion


def _image(value: Any, where: str) -> np.ndarray:
    """A camera image as (H, W, 3) uint8, from HWC/CHW, a leading batch of 1, gray or float [0, 1]."""
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise ToolkitError(f"{where} is not an image (a {type(value).__name__} of dtype {a.dtype})")
    fields.image_shape(a.shape, where)  # before any conversion copies it
    while a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ToolkitError(f"{where} has shape {a.shape}, expected an (H, W, 3) image")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        fields.finite_image(a, where)  # NaN would silently become black
        a = a.astype(np.float32)
        if a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle, as robosuite's quat2axisangle (used by openpi's LIBERO state)."""
    q = np.asarray(q, dtype=np.float64).reshape(4)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(w) / den


def observation_state(obs: Mapping, where: str) -> np.ndarray | None:
    for key in STATE_KEYS:
        if key in obs and obs[key] is not None:
            return fields.vector(obs[key], f"observation.{key}", where)
    if all(k in obs for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")):
        # raw LIBERO env observation: eef position, orientation as axis-angle, gripper joints (8 dims)
        pos, quat, grip = (fields.vector(obs[k], f"observation.{k}", where)
                           for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"))
        if quat.size != 4:
            raise ToolkitError(f"{where}: observation.robot0_eef_quat has {quat.size} values, expected 4 (x, y, z, w)")
        return np.concatenate([pos, _quat_to_axis_angle(quat), grip]).astype(np.float32)
    return None


def _as_ltf(value: Any, scale: bool, where: str) -> np.ndarray:
    """A stored (layer, batch=1, token[, feature]) array -> (layer, token, feature)."""
    a = np.asarray(value)
    if scale and a.ndim == 3 and a.shape[1] == 1:  # (layer, 1, token): per-token scale, no feature dim
        a = a[:, 0, :, None]
    elif a.ndim == 4:
        if a.shape[1] != 1:
            raise ToolkitError(f"{where} has shape {a.shape}: expected a batch of 1 at axis 1 "
                               "(layer, 1, token, feature)")
        a = a[:, 0]
    elif scale and a.ndim == 2:  # (layer, token)
        a = a[..., None]
    if a.ndim != 3:
        raise ToolkitError(f"{where} has shape {a.shape}: expected (layer, 1, token, feature)")
    return a


def _t_keys(step: Mapping) -> list[tuple[float, str]]:
    """The step's action-expert keys with their flow-matching t, t descending."""
    found = []
    for key in step:
        if isinstance(key, str) and (m := _T_KEY.match(key)):
            found.append((float(m.group(1)), key))
    return sorted(found, key=lambda p: -p[0])


def _denoised(step: Mapping, tkeys: list[tuple[float, str]]) -> bool:
    """Whether the step's action-expert latents come per denoising step (action_expert_hidden_state_t*)."""
    return bool(tkeys) and all(isinstance(step[k], Mapping) for _, k in tkeys) and \
        any(all(sub in step[k] for _, k in tkeys) for sub in SUB_STREAMS)


def _recipes(step: Mapping, where: str) -> dict[str, Callable[[], np.ndarray]]:
    """"expert/stream" -> a function building that array from the step's latents (lazily)."""
    out: dict[str, Callable[[], np.ndarray]] = {}
    block = step.get(VLM_KEY)
    if isinstance(block, Mapping):
        for sub, stream in SUB_STREAMS.items():
            if sub in block:
                out[f"vlm/{stream}"] = (lambda b=block, s=sub, st=stream:
                                        _as_ltf(b[s], st in SCALE_STREAMS, f"{where}.{VLM_KEY}.{s}"))
    tkeys = _t_keys(step)
    if _denoised(step, tkeys):
        blocks = [step[k] for _, k in tkeys]
        for sub, stream in SUB_STREAMS.items():
            if all(sub in b for b in blocks):
                out[f"action/{stream}"] = (lambda s=sub, st=stream: _stack_denoise(step, tkeys, s, st, where))
    for key, expert in PLAIN_KEYS.items():  # older pickles, only for experts the newer keys do not give
        if key in step and not any(k.startswith(f"{expert}/") for k in out):
            out[f"{expert}/resid_post"] = lambda k=key: _as_ltf(step[k], False, f"{where}.{k}")
    return out


def _stack_denoise(step: Mapping, tkeys: list[tuple[float, str]], sub: str, stream: str, where: str) -> np.ndarray:
    parts = [_as_ltf(step[k][sub], stream in SCALE_STREAMS, f"{where}.{k}.{sub}") for _, k in tkeys]
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
        raise ToolkitError(f"{where}: the {ACTION_PREFIX}* entries disagree on the shape of {sub!r}: "
                           f"{sorted(shapes)}")
    return np.stack(parts, axis=1)  # (layer, denoise, token, feature)


class LazyActivations(Mapping):
    """``Step.activations`` for one step: arrays are squeezed/stacked only when read."""

    def __init__(self, recipes: dict[str, Callable[[], np.ndarray]]):
        self._recipes = recipes
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._recipes[key]()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)

    def __repr__(self) -> str:
        return f"LazyActivations({', '.join(self._recipes)})"


# --------------------------------------------------------------------------- the adapter


class LiberoDataset(DatasetAdapter):
    """LIBERO rollouts from task pickles (task_{id}_{name}.pkl), with or without pi0 latents."""

    name = "libero"
    description = ("LIBERO rollout pickles (task_{id}_{name}.pkl, optionally with pi0 latents for "
                   "`toolkit import`); without --data, an embedded 10-task libero_object sample")
    OPTIONS = ("tasks", "episodes")

    def __init__(self, data: str | None = None, tasks: Any = None, episodes: Any = None, **options: Any) -> None:
        if options:
            raise ToolkitError(f"dataset 'libero' has no option {sorted(options)[0]!r}; options: "
                               f"{', '.join(self.OPTIONS)} (e.g. tasks=0-4, episodes=0,1)")
        given = {k: v for k, v in (("tasks", tasks), ("episodes", episodes)) if v is not None}
        super().__init__(None if data is None else str(data), **given)
        self._tasks = parse_selection(tasks, "tasks")
        self._episodes = parse_selection(episodes, "episodes")
        self._files = self._find_files()
        self._cache: tuple[Path, dict] | None = None
        self._layout: ActivationLayout | None | bool = False  # False: not derived yet

    # files ---------------------------------------------------------------------------------
    def _find_files(self) -> list[Path]:
        if self.data is None:
            root = SAMPLE_DIR
            if not root.is_dir():
                raise ToolkitError(f"the embedded LIBERO sample is missing ({root}); reinstall toolkit or "
                                   "regenerate it with `python -m toolkit_plugins.libero.sample "
                                   f"{root}`")
        else:
            root = Path(self.data).expanduser()
            if not root.exists():
                raise ToolkitError(f"no such directory {self.data} (pass --data DIR with LIBERO latent pickles, "
                                   "or omit --data for the embedded sample)")
        if root.is_file():
            files = [root]
        else:
            files = [p for p in root.glob("*.pkl") if p.is_file()]
            if not files:
                raise ToolkitError(f"{root} holds no *.pkl files (expected LIBERO task pickles named "
                                   "task_{id}_{name}.pkl)")
        files.sort(key=lambda p: (_file_task_id(p) is None, _file_task_id(p) or 0, p.name))
        if self._tasks is not None:
            ids = [_file_task_id(p) for p in files]
            if all(i is not None for i in ids):
                kept = [p for p, i in zip(files, ids) if i in self._tasks]
                if not kept:
                    raise ToolkitError(f"no task pickle in {root} matches tasks={self.options['tasks']!r}; "
                                       f"task ids there: {_ranges(sorted(set(ids)))}")
                files = kept
        return files

    def _load(self, path: Path) -> dict:
        """One task pickle, validated; the last one loaded is kept (one task file in memory at a time)."""
        if self._cache is not None and self._cache[0] == path:
            return self._cache[1]
        self._cache = None  # let the previous task go before reading the next
        task = safe_pickle.load(path)
        _validate(task, path)
        self._cache = (path, task)
        return task

    def _task_files(self) -> Iterator[tuple[Path, dict, int]]:
        """(path, task, task_id) of each selected task pickle, loaded one at a time."""
        seen: dict[int, Path] = {}
        for path in self._files:
            fid = _file_task_id(path)
            if self._tasks is not None and fid is not None and fid not in self._tasks:
                continue
            task_id = _task_id(self._load(path), path)
            if self._tasks is not None and task_id not in self._tasks:
                continue
            if task_id in seen:
                raise ToolkitError(f"{seen[task_id]} and {path} both hold task_id {task_id}; "
                                   "keep one pickle per task in the directory")
            seen[task_id] = path
            yield path, self._load(path), task_id

    # the contract ------------------------------------------------------------------------
    def episodes(self) -> Iterator[Episode]:
        for path, task, task_id in self._task_files():
            instruction = _instruction(task, path)
            name = str(task.get("task_name") or instruction.replace(" ", "_"))
            for n, ep_key in _ordered(task["episodes"], "episode"):
                if self._episodes is not None and n not in self._episodes:
                    continue
                ep = task["episodes"][ep_key]
                rollout = ep["rollout_steps"]
                order = _ordered(rollout, "step", lambda k: rollout[k].get("timestep"))
                where = f"{path}: episodes.{ep_key}.rollout_steps"
                metadata = _plain(dict(ep.get("metadata") or {}), f"{path}: episodes.{ep_key}.metadata")
                fields.success(metadata.get("success"), f"{path}: episodes.{ep_key}.metadata")
                _check_vectors(rollout, order, where)  # before any step of the episode is stored
                yield Episode(
                    key=f"task_{task_id}/episode_{n}",
                    task=name,
                    task_id=task_id,
                    instruction=instruction,
                    metadata=metadata,
                    n_steps=len(order),
                    _steps=lambda r=rollout, o=order, w=where: _iter_steps(r, o, w),
                )
            # drop this task before the next one is read (episodes keep only their own sub-dicts)
            task = ep = rollout = None  # noqa: F841

    def length_hint(self) -> list[int] | None:
        """Steps of each selected episode, when the selected pickles are small enough to read twice (at most
        ``HINT_BYTES`` together: the embedded sample, rollouts without latents).  A pickle cannot be walked
        without unpickling it, so pickles carrying latents (gigabytes) give no hint rather than a second read."""
        if sum(p.stat().st_size for p in self._files) > HINT_BYTES:
            return None
        return [ep.n_steps for ep in self.episodes()]

    def activation_layout(self) -> ActivationLayout | None:
        if self._layout is False:
            self._layout = self._derive_layout()
        return self._layout  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["sample"] = self.data is None
        out["files"] = [p.name for p in self._files]
        return out

    # layout ------------------------------------------------------------------------------
    def _derive_layout(self) -> ActivationLayout | None:
        """From the shapes of the first latent-carrying step of the first (selected) task pickle."""
        for path, task, _ in self._task_files():
            for _, ep_key in _ordered(task["episodes"], "episode"):
                rollout = task["episodes"][ep_key]["rollout_steps"]
                for _, step_key in _ordered(rollout, "step"):
                    step = rollout[step_key]
                    where = f"{path}: episodes.{ep_key}.rollout_steps.{step_key}"
                    recipes = _recipes(step, where)
                    if recipes:
                        return _layout_from(step, recipes, where)
            return None  # only the first pickle decides
        return None


def _layout_from(step: Mapping, recipes: dict[str, Callable], where: str) -> ActivationLayout:
    streams: dict[str, dict[str, tuple[str, ...]]] = {}
    for key in recipes:
        expert, stream = key.split("/")
        streams.setdefault(expert, {})[stream] = ("stored", key)
    experts: dict[str, Expert] = {}
    spans: dict[str, dict[str, list[int]]] = {}
    denoise_t: dict[str, tuple[float, ...]] = {}
    tkeys = _t_keys(step)

    def shape_of(expert: str) -> tuple[int, int, int]:
        """(layers, tokens, hidden size) of an expert, from its widest stream."""
        names = list(streams[expert])
        pick = next((s for s in ("resid_post", "resid_mid") if s in names), names[0])
        shape = recipes[f"{expert}/{pick}"]().shape
        return shape[0], shape[-2], shape[-1]

    if "vlm" in streams:
        n_layers, seq, hidden = shape_of("vlm")
        text = list(range(max(0, seq - TEXT_TOKENS), seq))
        if seq <= TEXT_TOKENS:
            warnings.warn(f"{where}: the VLM sequence has {seq} tokens, not more than pi0's {TEXT_TOKENS} text tokens, "
                          f"so the 'text' span is clipped to all {seq} positions and site 'text_only' equals 'vlm' "
                          "(no image tokens to leave out)", stacklevel=2)
        vspans = {"image": list(range(0, seq - TEXT_TOKENS))} if seq > TEXT_TOKENS else {}
        if seq - TEXT_TOKENS == 3 * IMAGE_TOKENS_PER_VIEW:  # pi0 LIBERO: base, wrist, (padded) second wrist
            vspans["image.base"] = list(range(0, IMAGE_TOKENS_PER_VIEW))
            vspans["image.wrist"] = list(range(IMAGE_TOKENS_PER_VIEW, 2 * IMAGE_TOKENS_PER_VIEW))
        vspans["text"] = text
        spans["vlm"] = vspans
        experts["vlm"] = Expert("vlm", "", n_layers, hidden, spans=tuple(vspans), streams=streams["vlm"],
                                description="PaliGemma expert (image then text tokens), imported from the pickles")
    if "action" in streams:
        n_layers, seq, hidden = shape_of("action")
        denoising = _denoised(step, tkeys)
        spans["action"] = {"state": [0], "actions": list(range(1, seq))} if seq > 1 else {"state": [0]}
        experts["action"] = Expert(
            "action", "", n_layers, hidden, spans=tuple(spans["action"]),
            denoise_steps=len(tkeys) if denoising else None, streams=streams["action"],
            description="action expert (state token, then action tokens), imported from the pickles")
        if denoising:
            denoise_t["action"] = tuple(t for t, _ in tkeys)
    if "text_only" in streams:
        n_layers, seq, hidden = shape_of("text_only")
        spans["text_only"] = {"text": list(range(seq))}
        experts["text_only"] = Expert("text_only", "", n_layers, hidden, spans=("text",), streams=streams["text_only"],
                                      description="the VLM's text tokens alone (text_only_hidden_states)")
    sites: dict[str, SiteInfo] = {}
    if "vlm" in experts:
        sites["vlm"] = SiteInfo("vlm", "vlm", "all", "mean", "the VLM expert, every token")
    if "text_only" in experts:
        sites["text_only"] = SiteInfo("text_only", "text_only", "all", "mean", "the VLM's text tokens")
    elif "vlm" in experts:
        sites["text_only"] = SiteInfo("text_only", "vlm", "text", "mean", "the VLM expert's text tokens")
    if "action" in experts:
        sites["action"] = SiteInfo("action", "action", "all", "mean", "the action expert, every token")
    return ActivationLayout(model="pi0", experts=experts, sites=sites, spans=spans, denoise_t=denoise_t)


# --------------------------------------------------------------------------- reading helpers


def _ranges(values: list[int]) -> str:
    return ",".join(str(v) for v in values) or "none"


def _ordered(d: Mapping, prefix: str, fallback: Callable[[str], Any] | None = None) -> list[tuple[int, str]]:
    """(number, key) pairs of ``prefix_N`` keys, numerically ordered."""
    out = []
    for i, key in enumerate(d):
        n = _number(key, -1)
        if n < 0 and fallback is not None:
            try:
                n = int(fallback(key))
            except (TypeError, ValueError):
                n = -1
        out.append((n if n >= 0 else i, str(key), key))
    out.sort(key=lambda p: (p[0], p[1]))
    return [(n, key) for n, _, key in out]


def _check_vectors(rollout: Mapping, order: list[tuple[int, str]], where: str) -> None:
    """Every step's action and state are numeric vectors of the sizes the episode's first step has."""
    sizes = fields.FieldCheck()
    for _, key in order:
        step, w = rollout[key], f"{where}.{key}"
        obs = step.get("observation") or {}
        sizes.same_size("action", fields.vector(step.get("action"), "action", w), w, required=True)
        state = observation_state(obs, w)
        sizes.same_size("state", state if state is not None else fields.vector(step.get("state"), "state", w), w)


def _iter_steps(rollout: Mapping, order: list[tuple[int, str]], where: str) -> Iterator[Step]:
    for k, key in order:
        step = rollout[key]
        w = f"{where}.{key}"
        obs = step.get("observation") or {}  # latent-only pickles (``toolkit import``) may have none
        images = {}
        for camera, keys in CAMERAS.items():
            for name in keys:
                if name in obs and obs[name] is not None:
                    images[camera] = _image(obs[name], f"{w}.observation.{name}")
                    break
        state = observation_state(obs, w)
        if state is None and step.get("state") is not None:
            state = fields.vector(step["state"], "state", w)
        action = fields.vector(step.get("action"), "action", w)
        recipes = _recipes(step, w)
        yield Step(
            index=k,
            images=images,
            state=state,
            action=action,
            activations=LazyActivations(recipes) if recipes else None,
        )


def _need(d: Any, key: str, where: str, path: Path, kind: type = dict) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise ToolkitError(f"{path}: {where} has no {key!r}" if where else f"{path} has no {key!r} key "
                           "(expected a LIBERO task pickle: task_name, task_id, task_description, episodes)")
    value = d[key]
    if kind is dict and not isinstance(value, Mapping):
        raise ToolkitError(f"{path}: {where + '.' if where else ''}{key} is a {type(value).__name__}, "
                           "expected a dict")
    return value


def _validate(task: Any, path: Path) -> None:
    """Check the nesting every reader relies on, naming the file and key path of the first gap."""
    if not isinstance(task, Mapping):
        raise ToolkitError(f"{path} holds a {type(task).__name__}, expected a LIBERO task dict "
                           "(task_name, task_id, task_description, episodes)")
    episodes = _need(task, "episodes", "", path)
    if not ("task_description" in task or "task_name" in task):
        raise ToolkitError(f"{path} has no 'task_description' (nor 'task_name') key")
    for ep_key, ep in episodes.items():
        where = f"episodes.{ep_key}"
        if not isinstance(ep, Mapping):
            raise ToolkitError(f"{path}: {where} is a {type(ep).__name__}, expected a dict")
        rollout = _need(ep, "rollout_steps", where, path)
        if "metadata" in ep and ep["metadata"] is not None and not isinstance(ep["metadata"], Mapping):
            raise ToolkitError(f"{path}: {where}.metadata is a {type(ep['metadata']).__name__}, expected a dict")
        for step_key, step in rollout.items():
            w = f"{where}.rollout_steps.{step_key}"
            if not isinstance(step, Mapping):
                raise ToolkitError(f"{path}: {w} is a {type(step).__name__}, expected a dict")
            if step.get("observation") is not None and not isinstance(step["observation"], Mapping):
                raise ToolkitError(f"{path}: {w}.observation is a {type(step['observation']).__name__}, "
                                   "expected a dict")


def _task_id(task: Mapping, path: Path) -> int:
    if "task_id" in task:
        return fields.task_id(task["task_id"], str(path))
    if _file_task_id(path) is None:
        raise ToolkitError(f"{path} has no 'task_id' key and its name is not task_{{id}}_{{name}}.pkl")
    return fields.task_id(_file_task_id(path), str(path))


def _instruction(task: Mapping, path: Path) -> str:
    value = task.get("task_description")
    if value is None or (isinstance(value, str) and not value):
        return language_from_name(str(task.get("task_name") or path.stem))
    return fields.text(value, "instruction", f"{path}: task_description")  # never str() of bytes or a list


@hookimpl
def register_datasets(register):
    register(LiberoDataset)
