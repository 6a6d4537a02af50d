"""pi0's state/action statistics, read from where each training pipeline saved them, applied with its formulas.

* lerobot (``policy_preprocessor.json`` + ``policy_preprocessor_step_*_normalizer_processor.safetensors``, and the
  postprocessor's ``unnormalizer_processor`` step): keys ``<feature>.<stat>``; pi0's ``normalization_mapping`` is
  STATE and ACTION -> MEAN_STD, but a config may name any of lerobot's ``NormalizationMode``s: MEAN_STD:
  ``(x - mean) / (std + eps)``, inverse ``x * std + mean`` (no eps); MIN_MAX (min/max), QUANTILES (q01/q99) and
  QUANTILE10 (q10/q90): ``2 (x - lo) / d - 1`` with ``d = hi - lo`` (``eps`` where ``d == 0``), inverse
  ``(x + 1) / 2 * d + lo`` (MIN_MAX) or ``(x + 1) * d / 2 + lo`` (the quantile modes), the operation order of
  lerobot's ``_NormalizationMixin._apply_transform``; IDENTITY: unchanged.  ``eps`` from the step's config
  (default 1e-8).  No clipping.  Any other mode is refused in one line naming it.
* older lerobot policies: the same formulas on the ``normalize_inputs`` / ``unnormalize_outputs`` buffers that
  sat among the weights (non-finite values there mean "no statistics").
* openpi (``assets/<asset id>/norm_stats.json``: ``{"norm_stats": {"state": {mean, std, q01, q99}, "actions":
  ...}}``): pi0 trains with mean/std (quantiles are for pi0-FAST / pi0.5).  Normalise ``(x - mean[:d]) / (std[:d]
  + 1e-6)``; unnormalise ``x * (std + 1e-6) + mean`` with mean padded by 0 and std by 1.  No clipping.  With
  ``use_quantiles`` (pi0-FAST / pi0.5; ``openpi_stats(path, "QUANTILES")``): ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1``,
  inverse ``(x + 1) / 2 * (q99 - q01 + 1e-6) + q01`` on the dimensions the statistics have, the rest unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

LEROBOT_EPS = 1e-8  # lerobot's NormalizerProcessorStep default
OPENPI_EPS = 1e-6  # openpi.transforms.Normalize / Unnormalize
# lerobot's NormalizationMode (configs/types.py); IDENTITY has no statistics (``_stats`` returns None for it)
MODES = ("MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY")
BOUNDS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


@dataclass
class Stats:
    """One feature's statistics and the convention they are applied with."""

    convention: str  # "lerobot" or "openpi"
    mode: str  # MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10
    values: dict[str, np.ndarray]
    eps: float

    @property
    def dim(self) -> int:
        return len(next(iter(self.values.values())))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        v, d = self.values, x.shape[-1]
        if self.convention == "openpi":
            if d > self.dim:
                raise ToolkitError(f"pi0: the state has {d} values but the openpi statistics only {self.dim}; "
                                   "pass the statistics of the dataset the policy was trained on, or --no-normalise")
            if self.mode == "QUANTILES":
                lo, hi = v["q01"][:d], v["q99"][:d]
                return (x - lo) / (hi - lo + self.eps) * 2.0 - 1.0
            return (x - v["mean"][:d]) / (v["std"][:d] + self.eps)
        if d != self.dim:
            raise ToolkitError(f"pi0: the state has {d} values but the lerobot statistics {self.dim}; pass the "
                               "statistics of the dataset the policy was trained on, or --no-normalise")
        if self.mode == "MEAN_STD":
            return (x - v["mean"]) / (v["std"] + self.eps)
        lo, hi = (v[k] for k in BOUNDS[self.mode])
        span = np.where(hi - lo == 0, np.float32(self.eps), hi - lo)
        return 2.0 * (x - lo) / span - 1.0

    def unnormalise(self, x: np.ndarray) -> np.ndarray:
        """Map the policy's actions (..., d) back to the dataset's units; dims beyond the statistics pass through
        (openpi pads mean 0 / std 1; lerobot slices the action to its feature size first)."""
        x = np.asarray(x, dtype=np.float32)
        v, n = self.values, min(x.shape[-1], self.dim)
        out = x.copy()
        if self.convention == "openpi" and self.mode == "QUANTILES":
            lo, hi = v["q01"][:n], v["q99"][:n]
            out[..., :n] = (x[..., :n] + 1.0) / 2.0 * (hi - lo + self.eps) + lo
        elif self.convention == "openpi":
            out[..., :n] = x[..., :n] * (v["std"][:n] + self.eps) + v["mean"][:n]
            out[..., n:] = x[..., n:] * (1.0 + self.eps)
        elif self.mode == "MEAN_STD":
            out[..., :n] = x[..., :n] * v["std"][:n] + v["mean"][:n]
        elif self.mode == "MIN_MAX":
            lo, hi = (v[k][:n] for k in BOUNDS[self.mode])
            span = np.where(hi - lo == 0, np.float32(self.eps), hi - lo)
            out[..., :n] = (x[..., :n] + 1) / 2 * span + lo
        else:
            lo, hi = (v[k][:n] for k in BOUNDS[self.mode])
            span = np.where(hi - lo == 0, np.float32(self.eps), hi - lo)
            out[..., :n] = (x[..., :n] + 1.0) * span / 2.0 + lo
        return out

    def describe(self) -> dict[str, Any]:
        return {"convention": self.convention, "mode": self.mode, "eps": self.eps, "dim": self.dim,
                "stats": sorted(self.values)}


@dataclass
class Normalisation:
    """The state and action statistics of one checkpoint and the file(s) they came from."""

    source: str
    state: Stats | None
    action: Stats | None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "state": self.state and self.state.describe(),
                "action": self.action and self.action.describe()}


def _floats(values: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in values.items()}


def _stats(convention: str, mode: str, values: dict[str, Any], eps: float, where: str) -> Stats | None:
    if mode == "IDENTITY":
        return None
    if mode not in MODES:
        raise ToolkitError(f"{where}: normalisation mode {mode!r} is not one lerobot defines ({', '.join(MODES)}); "
                           "fix normalization_mapping / norm_map, or pass --no-normalise")
    need = ("mean", "std") if mode == "MEAN_STD" else BOUNDS[mode]
    missing = [k for k in need if k not in values]
    if missing:
        raise ToolkitError(f"{where}: {mode} needs {', '.join(need)}, but {missing[0]} is not there; give statistics "
                           "that have it (--model-option stats=PATH) or pass --no-normalise")
    vals = _floats({k: values[k] for k in need})
    if not all(np.isfinite(a).all() for a in vals.values()):
        return None  # older lerobot policies kept inf buffers when trained without statistics
    return Stats(convention, mode, vals, eps)


# --------------------------------------------------------------------------- openpi


def openpi_stats(path: Path, mode: str = "MEAN_STD") -> Normalisation:
    """``norm_stats.json`` as openpi writes it; pi0 uses its mean/std (``mode="QUANTILES"``: q01/q99, openpi's
    ``use_quantiles``)."""
    if mode not in ("MEAN_STD", "QUANTILES"):
        raise ToolkitError(f"{path}: openpi normalises with MEAN_STD or QUANTILES, not {mode!r}")
    try:
        data = json.loads(path.read_text())["norm_stats"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ToolkitError(f"{path}: not an openpi norm_stats.json ({type(e).__name__}: {e})") from None
    state = data.get("state")
    action = data.get("actions")
    return Normalisation(str(path), state and _stats("openpi", mode, state, OPENPI_EPS, str(path)),
                         action and _stats("openpi", mode, action, OPENPI_EPS, str(path)))


# --------------------------------------------------------------------------- lerobot


def _lerobot_step(directory: Path, pipeline: str, registry: str) -> tuple[dict[str, Any], Path] | None:
    """(step config, state file) of the normaliser step in ``<pipeline>.json``, or of the step file alone."""
    cfg_file = directory / f"{pipeline}.json"
    if cfg_file.is_file():
        try:
            steps = json.loads(cfg_file.read_text())["steps"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ToolkitError(f"{cfg_file}: not a lerobot processor pipeline ({type(e).__name__}: {e})") from None
        for step in steps:
            if step.get("registry_name") == registry and step.get("state_file"):
                state = directory / step["state_file"]
                if not state.is_file():
                    raise ToolkitError(f"{cfg_file} names {step['state_file']}, which is missing; download it too")
                return step.get("config") or {}, state
        return None
    found = sorted(directory.glob(f"{pipeline}_step_*_{registry}.safetensors"))
    return ({}, found[0]) if found else None


def _feature_keys(config: dict[str, Any], meta: dict[str, Any]) -> tuple[str, str]:
    """The state and action feature names (lerobot: observation.state and action)."""
    features = config.get("features") or {**(meta.get("input_features") or {}), **(meta.get("output_features") or {})}
    state = next((k for k, f in features.items() if (f or {}).get("type") == "STATE"), "observation.state")
    action = next((k for k, f in features.items() if (f or {}).get("type") == "ACTION"), "action")
    return state, action


def _by_feature(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        feature, stat = key.rsplit(".", 1)
        out.setdefault(feature, {})[stat] = value
    return out


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ToolkitError(f"{path}: cannot read the statistics ({type(e).__name__}: {e})") from None


def lerobot_stats(directory: Path, meta: dict[str, Any]) -> Normalisation | None:
    """The preprocessor's state statistics and the postprocessor's action statistics, as lerobot applies them."""
    pre = _lerobot_step(directory, "policy_preprocessor", "normalizer_processor")
    post = _lerobot_step(directory, "policy_postprocessor", "unnormalizer_processor")
    if pre is None and post is None:
        return None
    mapping = meta.get("normalization_mapping") or {}
    state = action = None
    sources = []
    for found, which in ((pre, "state"), (post, "action")):
        if found is None:
            continue
        cfg, file = found
        norm_map = {**{"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}, **mapping, **(cfg.get("norm_map") or {})}
        eps = float(cfg.get("eps", LEROBOT_EPS))
        stats = _by_feature(_read_safetensors(file))
        state_key, action_key = _feature_keys(cfg, meta)
        key, kind = (state_key, "STATE") if which == "state" else (action_key, "ACTION")
        if key in stats:
            s = _stats("lerobot", norm_map.get(kind, "IDENTITY"), stats[key], eps, str(file))
            state, action = (s, action) if which == "state" else (state, s)
            sources.append(file.name)
        # the preprocessor also normalises training actions: use them when there is no postprocessor
        if which == "state" and post is None and action_key in stats:
            action = _stats("lerobot", norm_map.get("ACTION", "IDENTITY"), stats[action_key], eps, str(file))
    return Normalisation(f"{directory} ({', '.join(sources) or 'no state/action statistics'})", state, action)


def buffer_stats(buffers: dict[str, Any], meta: dict[str, Any], source: str) -> Normalisation | None:
    """Statistics the older lerobot policies kept among their weights (``normalize_inputs.buffer_observation_state.
    mean`` ...): the input normaliser gives the state, the output unnormaliser the action."""
    if not buffers:
        return None
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in buffers.items():
        module, rest = key.split(".", 1)
        feature, stat = rest.removeprefix("buffer_").rsplit(".", 1)
        groups.setdefault((module, feature), {})[stat] = np.asarray(value.float() if hasattr(value, "float") else value)
    mapping = {"STATE": "MEAN_STD", "ACTION": "MEAN_STD", **(meta.get("normalization_mapping") or {})}
    state_values = groups.get(("normalize_inputs", "observation_state"))
    action_values = groups.get(("unnormalize_outputs", "action")) or groups.get(("normalize_targets", "action"))
    state = state_values and _stats("lerobot", mapping["STATE"], state_values, LEROBOT_EPS, source)
    action = action_values and _stats("lerobot", mapping["ACTION"], action_values, LEROBOT_EPS, source)
    if state is None and action is None:
        return None
    return Normalisation(f"{source} (normalisation buffers among the weights)", state, action)


def find(directory: Path, meta: dict[str, Any], override: str | None,
         openpi_mode: str = "MEAN_STD") -> Normalisation | None:
    """The checkpoint's statistics: ``override`` (a norm_stats.json, a directory holding one, or a lerobot
    processor directory) first, then lerobot's processor files, then openpi's ``assets/*/norm_stats.json``
    (applied with ``openpi_mode``: pi0 trains with MEAN_STD, every later openpi model with QUANTILES)."""
    if override:
        p = Path(override).expanduser()
        if p.is_file() and p.name == "norm_stats.json":
            return openpi_stats(p, openpi_mode)
        if p.is_dir():
            if (p / "norm_stats.json").is_file():
                return openpi_stats(p / "norm_stats.json", openpi_mode)
            found = lerobot_stats(p, meta)
            if found is not None:
                return found
        raise ToolkitError(f"stats={override}: give a norm_stats.json, a directory holding one, or a directory with "
                           "lerobot's policy_preprocessor.json / *_normalizer_processor.safetensors files")
    found = lerobot_stats(directory, meta)
    if found is not None:
        return found
    candidates = sorted((directory / "assets").glob("**/norm_stats.json")) if (directory / "assets").is_dir() else []
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(directory)) for c in candidates[:4])
        raise ToolkitError(f"{directory} holds {len(candidates)} openpi statistics ({names}); choose the one the "
                           "policy was trained with: --model-option stats=PATH")
    return openpi_stats(candidates[0], openpi_mode) if candidates else None
