"""pi0's actions as lerobot returns them: every normalisation mode lerobot ships (MEAN_STD, MIN_MAX, QUANTILES,
QUANTILE10, IDENTITY) with its formulas, an unknown mode refused in one line, and relative actions
(``use_relative_actions``) turned back into absolute ones: unnormalised action + raw state on the dimensions whose
names do not contain an excluded joint.  Expected values are written here from lerobot's description
(processor/normalize_processor.py, processor/relative_action_processor.py), not taken from the adapter."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

from synthetic import camera_episodes
from pi_common import toolkit_cli
from test_pi0_checkpoints import ACTION_DIM, ACTION_STATS, STATE_DIM, load, native_weights, write_checkpoint
from toolkit.sdk.errors import ToolkitError
from toolkit.testing import generators
from toolkit_plugins.pi0.relative import RelativeActions

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

EPS = 1e-8
NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "Gripper_Pos"]  # a dataset's action feature names


def stats(dim: int, seed: int) -> dict[str, np.ndarray]:
    """Every statistic lerobot computes; the last dimension is constant (hi == lo) to reach the eps branch."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=dim).astype(np.float32)
    out = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std, "q01": mean - 2 * std,
           "q99": mean + 2 * std, "q10": mean - std, "q90": mean + 1.2 * std}
    for k in ("min", "max", "q01", "q99", "q10", "q90"):
        out[k][-1] = mean[-1]
    return out


STATE, ACTION = stats(STATE_DIM, 21), stats(ACTION_DIM, 22)
LOHI = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def lerobot_normalise(x, s, mode):
    """lerobot's forward transform, written from its docstring: float32 torch, eps where hi == lo."""
    x = torch.tensor(x)
    if mode == "IDENTITY":
        return x.numpy()
    if mode == "MEAN_STD":
        return ((x - torch.tensor(s["mean"])) / (torch.tensor(s["std"]) + EPS)).numpy()
    lo, hi = (torch.tensor(s[k]) for k in LOHI[mode])
    d = torch.where(hi - lo == 0, torch.tensor(EPS), hi - lo)
    return (2 * (x - lo) / d - 1).numpy()


def lerobot_unnormalise(y, s, mode):
    y = torch.tensor(y)
    if mode == "IDENTITY":
        return y.numpy()
    if mode == "MEAN_STD":
        return (y * torch.tensor(s["std"]) + torch.tensor(s["mean"])).numpy()
    lo, hi = (torch.tensor(s[k]) for k in LOHI[mode])
    d = torch.where(hi - lo == 0, torch.tensor(EPS), hi - lo)
    return ((y + 1) / 2 * d + lo).numpy()


def set_mode(ckpt, mode):
    """The checkpoint's processors and config.json normalise state and action with ``mode``."""
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        pipe = json.loads((ckpt / name).read_text())
        for step in pipe["steps"]:
            if "norm_map" in (step.get("config") or {}):
                step["config"]["norm_map"] = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
        (ckpt / name).write_text(json.dumps(pipe))
    flat = {**{f"observation.state.{k}": v for k, v in STATE.items()}, **{f"action.{k}": v for k, v in ACTION.items()}}
    save_numpy(flat, str(ckpt / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    save_numpy({f"action.{k}": v for k, v in ACTION.items()},
               str(ckpt / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["normalization_mapping"] = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    (ckpt / "config.json").write_text(json.dumps(cfg))


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def weights():
    return native_weights()




@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in camera_episodes(["pick up the bowl", "open the drawer"]) for step in ep.steps()][:3]


@pytest.fixture(scope="module")
def raw(weights, tokenizer_dir, tmp_path_factory, batch):
    """The policy's own output (normalised units, no conversion) on the batch, and the inputs it came from."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("raw") / "ck", "current", weights)
    a = load(ckpt, tokenizer_dir, normalise="false")
    inputs = a.prepare(batch)
    return inputs, a.run(inputs, generators(len(batch))).actions


# --------------------------------------------------------------------------- normalisation modes


@pytest.mark.parametrize("mode", ["MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY"])
def test_every_lerobot_normalisation_mode_equals_lerobots_formula(mode, weights, tokenizer_dir, tmp_path, batch, raw):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    set_mode(ckpt, mode)
    a = load(ckpt, tokenizer_dir)
    state = np.stack([step.state for _, step in batch]).astype(np.float32)
    got = a.prepare(batch).tensors["state"].numpy()
    np.testing.assert_allclose(got[:, :STATE_DIM], lerobot_normalise(state, STATE, mode), rtol=1e-6, atol=1e-6)
    assert not got[:, STATE_DIM:].any()
    inputs, policy_out = raw
    actions = a.run(inputs, generators(len(batch))).actions
    np.testing.assert_allclose(actions, lerobot_unnormalise(policy_out, ACTION, mode), rtol=1e-6, atol=1e-6)
    if mode != "IDENTITY":
        assert not np.allclose(actions, policy_out)  # the statistics were applied
        assert a.describe()["normalisation"]["action"]["mode"] == mode
    else:
        assert a.describe()["normalisation"]["action"] is None


def test_an_unknown_mode_is_one_cli_line_naming_it(weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    set_mode(ckpt, "ROBUST_SCALE")
    store = tmp_path / "s.zarr"
    res = toolkit_cli("extract", "--model", "pi0", "--checkpoint", ckpt, "--model-option", f"tokenizer={tokenizer_dir}",
                      "--store", store, "--max-episodes", "1", "--max-steps", "1", "--no-progress")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and not store.exists(), res.stderr
    assert "normalisation mode 'ROBUST_SCALE' is not one lerobot defines" in lines[0]
    assert "QUANTILE10" in lines[0] and "--no-normalise" in lines[0]


def test_a_quantile10_checkpoint_without_q10_names_it(weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    set_mode(ckpt, "QUANTILE10")
    save_numpy({f"action.{k}": v for k, v in ACTION.items() if k != "q10"},
               str(ckpt / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    with pytest.raises(ToolkitError, match=r"QUANTILE10 needs q10, q90, but q10 is not there") as err:
        load(ckpt, tokenizer_dir)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- relative actions


def test_the_relative_mask_follows_lerobots_rules():
    def mask(exclude, names, dim=7):
        return RelativeActions(exclude, names, "test").mask(dim)

    assert mask(["gripper"], NAMES) == [True] * 6 + [False]  # substring, case-insensitive
    assert mask(["GRIPPER", "yaw"], NAMES) == [True] * 5 + [False, False]
    assert mask(["gripper"], None) == [True] * 7  # no names: every dimension, the gripper too
    assert mask([], NAMES) == [True] * 7
    assert mask(["gripper"], ["a", "gripper"], dim=4) == [True, False, True, True]  # unnamed dims are relative
    acts = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=np.float32)
    state = np.array([[10.0, 20.0, 30.0, 40.0]], dtype=np.float32)
    got = RelativeActions(["gripper"], ["a", "b", "left_gripper"], "test").to_absolute(acts, state)
    np.testing.assert_array_equal(got, [[[11.0, 22.0, 3.0], [14.0, 25.0, 6.0]]])


@pytest.mark.parametrize("where", ["config.json", "processors"])
def test_relative_actions_become_absolute_with_the_raw_state(where, weights, tokenizer_dir, tmp_path, batch, raw):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    if where == "config.json":  # lerobot's config fields (the gripper excluded by default)
        edit_config(ckpt, use_relative_actions=True, action_feature_names=NAMES)
    else:  # the saved pipeline steps, which lerobot runs, win over config.json
        edit_config(ckpt, use_relative_actions=False)
        for name, step in (("policy_preprocessor.json", {"registry_name": "relative_actions_processor", "config": {
                               "enabled": True, "exclude_joints": ["gripper"], "action_names": NAMES}}),
                           ("policy_postprocessor.json", {"registry_name": "absolute_actions_processor",
                                                          "config": {"enabled": True}})):
            pipe = json.loads((ckpt / name).read_text())
            pipe["steps"].insert(-1, step)
            (ckpt / name).write_text(json.dumps(pipe))
    a = load(ckpt, tokenizer_dir)
    inputs, policy_out = raw
    actions = a.run(inputs, generators(len(batch))).actions
    state = np.stack([step.state for _, step in batch]).astype(np.float32)  # raw, not normalised
    unnormalised = policy_out * ACTION_STATS["std"] + ACTION_STATS["mean"]  # the helper's MEAN_STD statistics
    want = unnormalised.copy()
    want[..., :6] += state[:, None, :6]  # every dimension but the gripper
    np.testing.assert_allclose(actions, want, rtol=1e-6, atol=1e-5)
    assert a.describe()["relative_actions"]["relative_dims"] == [0, 1, 2, 3, 4, 5]


def test_relative_actions_need_a_state_and_enough_of_it(weights, tokenizer_dir, tmp_path, batch, caplog):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    edit_config(ckpt, use_relative_actions=True, action_feature_names=NAMES)
    a = load(ckpt, tokenizer_dir)
    no_state = [(ep, type(step)(**{**step.__dict__, "state": None})) for ep, step in batch]
    with pytest.raises(ToolkitError, match="predicts relative actions .* a step has none"):
        a.run(a.prepare(no_state), generators(len(batch)))
    with pytest.raises(ToolkitError, match=r"relative actions on 7 dimensions but the state has only 5 values"):
        a.relative.to_absolute(np.zeros((1, 2, 7), np.float32), np.zeros((1, 5), np.float32))
    with caplog.at_level(logging.WARNING, logger="toolkit.pi0"):
        off = load(ckpt, tokenizer_dir, normalise=False)
    assert off.relative is None and off.describe()["relative_actions"] is None
    assert any("predicts relative actions" in r.getMessage() and "--no-normalise" in r.getMessage()
               for r in caplog.records)


def test_openpi_quantile_normalisation_equals_openpis_formula(tmp_path):
    """openpi's ``use_quantiles`` (pi0-FAST / pi0.5 checkpoints' norm_stats.json), for adapters built on pi0's."""
    from toolkit_plugins.pi0.normalise import openpi_stats

    f = tmp_path / "norm_stats.json"
    f.write_text(json.dumps({"norm_stats": {"state": {k: v.tolist() for k, v in STATE.items()},
                                            "actions": {k: v.tolist() for k, v in ACTION.items()}}}))
    n = openpi_stats(f, "QUANTILES")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, STATE_DIM)).astype(np.float32)
    lo, hi = STATE["q01"].astype(np.float64), STATE["q99"].astype(np.float64)
    np.testing.assert_allclose(n.state.normalise(x), (x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0, rtol=1e-5, atol=1e-5)
    y = rng.normal(size=(2, 50, 10)).astype(np.float32)  # the policy's padded chunk: 3 dims past the statistics
    lo, hi = ACTION["q01"].astype(np.float64), ACTION["q99"].astype(np.float64)
    want = y.astype(np.float64).copy()
    want[..., :ACTION_DIM] = (y[..., :ACTION_DIM] + 1.0) / 2.0 * (hi - lo + 1e-6) + lo
    np.testing.assert_allclose(n.action.unnormalise(y), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ToolkitError, match="MEAN_STD or QUANTILES, not 'QUANTILE10'"):
        openpi_stats(f, "QUANTILE10")
