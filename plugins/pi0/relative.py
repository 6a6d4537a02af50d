"""Relative (delta) actions, converted back to absolute as lerobot does.

lerobot's pi0 (``use_relative_actions: true``) trains on ``action - state`` and its pipelines run raw state ->
relative -> normalise -> model -> unnormalise -> absolute (``processor_pi0.py``).  ``AbsoluteActionsProcessorStep``
adds the *raw* (unnormalised) state of the current observation to the *unnormalised* action chunk, on the first
``action_dim`` state values, for every action dimension not excluded (``processor/relative_action_processor.py``):

* the mask is built from the action feature names (``action_feature_names`` in config.json, ``action_names`` in
  the saved ``relative_actions_processor`` step): a dimension is excluded when an excluded name, lower-cased, equals
  or is a substring of its lower-cased name (``relative_exclude_joints``, default ``["gripper"]``);
* without names, or with no excluded names, every dimension is relative (the gripper too);
* dimensions past the named ones are relative.

The saved processor steps are what lerobot runs, so they win over config.json: the preprocessor's
``relative_actions_processor`` gives the excluded names and feature names, the postprocessor's
``absolute_actions_processor`` whether the conversion is on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

DEFAULT_EXCLUDE = ["gripper"]  # lerobot PI0Config.relative_exclude_joints


@dataclass
class RelativeActions:
    """Which action dimensions the policy predicts relative to the state, and where that was read."""

    exclude: list[str]
    names: list[str] | None
    source: str

    def mask(self, action_dim: int) -> list[bool]:
        """True for each action dimension that is relative (lerobot's ``_build_mask``)."""
        tokens = [str(n).lower() for n in self.exclude if n]
        if not tokens or self.names is None:
            return [True] * action_dim
        out = [not any(t == str(name).lower() or t in str(name).lower() for t in tokens)
               for name in self.names[:action_dim]]
        return out + [True] * (action_dim - len(out))

    def to_absolute(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """``actions`` (batch, horizon, dim), unnormalised, plus the raw ``state`` (batch, state_dim) on the
        relative dimensions."""
        dim = actions.shape[-1]
        if state is None:
            raise ToolkitError("pi0: the checkpoint predicts relative actions (use_relative_actions), which need the "
                               "robot state of each step, but a step has none; use a dataset with states")
        state = np.asarray(state, dtype=np.float32)
        if state.shape[-1] < dim:
            raise ToolkitError(f"pi0: the checkpoint predicts relative actions on {dim} dimensions but the state has "
                               f"only {state.shape[-1]} values; lerobot adds state[:{dim}], so the dataset does not "
                               "match this policy")
        offset = state[:, None, :dim] * np.asarray(self.mask(dim), dtype=np.float32)
        return (actions + offset).astype(np.float32)

    def describe(self, action_dim: int) -> dict[str, Any]:
        m = self.mask(action_dim)
        return {"source": self.source, "relative_dims": [i for i, r in enumerate(m) if r],
                "exclude_joints": list(self.exclude), "action_names": self.names}


def _step(directory: Path, pipeline: str, registry: str) -> dict[str, Any] | None:
    """The config of the named step in ``<pipeline>.json`` (None: no such file or step)."""
    f = directory / f"{pipeline}.json"
    if not f.is_file():
        return None
    try:
        steps = json.loads(f.read_text())["steps"]
        return next(((s.get("config") or {}) for s in steps if s.get("registry_name") == registry), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ToolkitError(f"{f}: not a lerobot processor pipeline ({type(e).__name__}: {e})") from None


def _names(value: Any, where: str, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ToolkitError(f"{where}: {what} must be a list of names, not {value!r}")
    return list(value)


def find(directory: Path | None, meta: dict[str, Any]) -> RelativeActions | None:
    """The checkpoint's relative-action setting (None: absolute actions, nothing to convert)."""
    pre = _step(directory, "policy_preprocessor", "relative_actions_processor") if directory else None
    post = _step(directory, "policy_postprocessor", "absolute_actions_processor") if directory else None
    if post is not None:
        enabled, where = bool(post.get("enabled")), "policy_postprocessor.json"
    elif pre is not None:
        enabled, where = bool(pre.get("enabled")), "policy_preprocessor.json"
    else:
        enabled, where = bool(meta.get("use_relative_actions")), "config.json"
    if not enabled:
        return None
    if pre is not None:
        exclude = _names(pre.get("exclude_joints"), "policy_preprocessor.json", "exclude_joints") or []
        names = _names(pre.get("action_names"), "policy_preprocessor.json", "action_names")
        source = f"{where} (excluded joints and action names: policy_preprocessor.json)"
    else:
        given = meta.get("relative_exclude_joints", DEFAULT_EXCLUDE)
        exclude = _names(given, "config.json", "relative_exclude_joints") or []
        names = _names(meta.get("action_feature_names"), "config.json", "action_feature_names")
        source = where
    return RelativeActions(exclude, names, source)
