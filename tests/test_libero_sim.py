"""Live LIBERO rollouts (dataset ``libero-sim``): the tiny random pi0 closed-loop in the real simulator.

One libero_object task, two trials of 20 environment steps (re-planning every 5), 64x64 cameras; the
environment is created once and reused.  Skipped when the simulator (``toolkit[sim]``) is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest

import toolkit
from toolkit.sdk.errors import ToolkitError
from synthetic import register_libero_sim
from toolkit.store.layout import write_consolidated
from toolkit.store.reader import open_store

HAVE_SIM = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None
SIM_MARKS = [
    pytest.mark.sim,
    pytest.mark.slow,
    # MuJoCo/robosuite and TensorFlow (the RLDS tests) crash when loaded into one process, so the tests that run
    # the simulator run in a process of their own, started by tests/conftest.py (tests/simprocess.py).
    pytest.mark.skipif(os.environ.get("TOOLKIT_SIM_TESTS") != "1",
                       reason="runs in its own process (tests/test_sim_process.py)"),
    pytest.mark.skipif(not HAVE_SIM, reason="the LIBERO simulator is not installed (pip install 'toolkit[sim]')"),
]


def needs_sim(test):
    """A test that runs the simulator: marked ``sim`` and ``slow``, run only in the simulator process."""
    for mark in reversed(SIM_MARKS):
        test = mark(test)
    return test


MAX_STEPS, REPLAN, STRIDE = 20, 5, 2
OPTIONS = dict(suite="libero_object", tasks="0", trials=2, replan_steps=REPLAN, resolution=64, settle_steps=5)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_libero_sim()


def _extract(store, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return toolkit.extract(model="pi0", dataset="libero-sim", store=store, layers="0,5", stride=STRIDE,
                               max_steps=MAX_STEPS, seed=3, dataset_options=dict(OPTIONS),
                               model_options={"num_steps": 2}, **kw)


def _snapshot(path) -> dict[str, np.ndarray]:
    s = open_store(path)
    out = {f: s.coord(f) for f in s.fields()}
    for site in s.sites:
        for stream in s.streams(site):
            out[f"{site}/{stream}"] = s.read(site, stream)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "ref.zarr"
    _extract(path)
    return path


# The two tests below load no simulator: they run in the fast tier, in the main process.


def test_missing_simulator_names_the_extra(monkeypatch):
    from toolkit_plugins.libero_sim import LiberoSimDataset

    monkeypatch.setitem(sys.modules, "libero.libero", None)  # import fails as if not installed
    with pytest.raises(ToolkitError, match=r"toolkit\[sim\]"):
        LiberoSimDataset(suite="libero_object")


def test_closed_loop_needs_batch_size_one(tmp_path):
    with pytest.raises(ToolkitError, match="batch-size must be 1"):
        _extract(tmp_path / "b.zarr", batch_size=2)
    assert not (tmp_path / "b.zarr").exists()


@needs_sim
def test_rollout_store(reference):
    s = open_store(reference)
    assert s.complete
    calls_per_episode = MAX_STEPS // REPLAN  # the random policy never succeeds in 20 steps
    stored = len(range(0, calls_per_episode, STRIDE))
    assert s.n_samples == 2 * stored
    keys = s.coord("episode_key")
    assert list(dict.fromkeys(keys)) == ["libero_object/task_0/trial_0", "libero_object/task_0/trial_1"]
    assert list(s.coord("call")) == list(range(0, calls_per_episode, STRIDE)) * 2
    assert list(s.coord("step")) == [c * REPLAN for c in s.coord("call")]  # rollout step of the policy call
    assert list(s.coord("trial")) == [0] * stored + [1] * stored
    assert set(s.coord("success")) == {0} and set(s.coord("total_steps")) == {MAX_STEPS}
    assert set(s.coord("task_id")) == {0}
    assert set(s.coord("instruction")) == {"pick up the alphabet soup and place it in the basket"}
    # the executed actions are the first replan_steps of the chunk the policy produced
    executed, n, policy = s.coord("executed_action"), s.coord("n_executed"), s.coord("policy_action")
    assert executed.shape == (s.n_samples, REPLAN, 7) and set(n) == {REPLAN}
    np.testing.assert_array_equal(executed, policy[:, :REPLAN, :7])
    assert s.read("vlm", "resid_post").shape[:2] == (s.n_samples, 2)
    assert s.attrs["dataset"]["name"] == "libero-sim"
    assert s.attrs["dataset"]["options"]["max_steps"] == MAX_STEPS


@needs_sim
def test_interrupted_run_resumes_at_the_unfinished_episode(reference, tmp_path, monkeypatch):
    """Killed mid-way through trial 1: the store holds trial 0 only; --resume replays trial 1, and the
    result equals the uninterrupted run (also the determinism check: a fresh run gives the same trial 0)."""
    from toolkit_plugins.libero_sim import LiberoSimDataset

    rollout = LiberoSimDataset._rollout

    def dying(self, ep, tid, trial):
        for step in rollout(self, ep, tid, trial):
            if trial == 1 and step.index >= 2 * REPLAN:
                raise KeyboardInterrupt
            yield step

    path = tmp_path / "resume.zarr"
    monkeypatch.setattr(LiberoSimDataset, "_rollout", dying)
    with pytest.raises(KeyboardInterrupt):
        _extract(path)
    s = open_store(path)
    assert not s.complete
    assert set(s.coord("episode_key")) == {"libero_object/task_0/trial_0"}  # committed at the episode boundary
    assert s.root["episode_key"].shape[0] == s.n_samples  # no uncommitted tail left behind

    monkeypatch.setattr(LiberoSimDataset, "_rollout", rollout)
    _extract(path, resume=True)
    assert open_store(path).complete
    got, want = _snapshot(path), _snapshot(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.ray
@needs_sim
def test_two_ray_workers_write_the_one_process_store(reference, tmp_path):
    """Closed loop on Ray: whole episodes per actor, written in episode order: the store equals the one-process
    run's, array by array.  (A cluster of the simulator process's own: the main session's is another process's.)"""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only test cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = _extract(tmp_path / "ray.zarr", workers=2)
        _assert_same(reference, path)
        # a driver killed after the first episode: --resume --workers runs only the second one
        first = int((open_store(path).coord("trial") == 0).sum())
        write_consolidated(path, first, False)
        _extract(path, workers=2, resume=True)
    finally:
        ray.shutdown()
    _assert_same(reference, path)
    assert open_store(path).attrs["run_spec"] == open_store(reference).attrs["run_spec"]


def _assert_same(a, b):
    want, got = _snapshot(a), _snapshot(b)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)


@needs_sim
def test_frames_of_a_live_rollout_and_the_viewer(reference, tmp_path):
    """`extract --frames` on live rollouts keeps each step's rendered cameras; the activations are those of the
    run without frames; `toolkit view` shows them (a simulator store with frames, end to end)."""
    from synthetic import page_data

    path = _extract(tmp_path / "frames.zarr", frames=32)
    s, ref = open_store(path), open_store(reference)
    assert set(s.cameras) == {"agentview", "wrist"}
    for cam in s.cameras:
        f = s.frames(cam)
        assert f.shape == (s.n_samples, 32, 32, 3) and f.dtype == np.uint8
        assert f.std() > 1 and not np.array_equal(f[0], f[-1])  # rendered scenes that move, not blank images
    np.testing.assert_array_equal(s.read("vlm", "resid_post"), ref.read("vlm", "resid_post"))
    page = toolkit.view(path, tmp_path / "view.html")
    html = open(page).read()
    data = page_data(html)
    assert sorted(data["cameras"]) == ["agentview", "wrist"] and html.count("data:image/jpeg") >= s.n_samples
