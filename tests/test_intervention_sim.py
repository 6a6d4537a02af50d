"""Closed-loop interventions in the LIBERO simulator: the tiny random pi0, one task, two short trials, 64x64 cameras.

Runs in a process of its own (MuJoCo and TensorFlow cannot share one), started by
``tests/test_sim_process.py``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from toolkit.run.intervene import intervene
from synthetic import register_libero_sim
from toolkit.store.reader import open_store

HAVE_SIM = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None
pytestmark = [pytest.mark.sim, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("TOOLKIT_SIM_TESTS") != "1",
                                 reason="runs in its own process (tests/test_sim_process.py)"),
              pytest.mark.skipif(not HAVE_SIM, reason="the LIBERO simulator is not installed (pip install 'toolkit[sim]')")]

OPTIONS = dict(suite="libero_object", tasks="0", trials=2, replan_steps=5, resolution=64, settle_steps=5)
KEYS = ["libero_object/task_0/trial_0", "libero_object/task_0/trial_1"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_libero_sim()


def test_intervened_rollouts_pair_with_unmodified_rollouts_from_the_same_init_state(tmp_path):
    run = intervene(out=tmp_path, model="pi0", dataset="libero-sim", at=["action.layers.3.resid_post"], op="zero", alphas=[0, 1],
                    max_steps=20, seed=3, model_options={"num_steps": 2}, dataset_options=dict(OPTIONS),
                    bootstrap=200)
    base = open_store(run.baseline)
    zero, hit = (open_store(c.store) for c in run.conditions)
    for s in (base, zero, hit):  # every run rolled out the same two init states
        assert list(dict.fromkeys(str(k) for k in s.coord("episode_key"))) == KEYS
        assert list(s.coord("trial")[[0, -1]]) == [0, 1]
    # alpha = 0: the simulator and the noise reproduce the unmodified rollouts exactly, step by step
    assert np.array_equal(zero.coord("policy_action"), base.coord("policy_action"))
    assert np.array_equal(zero.coord("executed_action"), base.coord("executed_action"), equal_nan=True)
    # alpha = 1: the first policy call sees the same observation (same init state), yet acts differently
    first = [i for i, c in enumerate(hit.coord("call")) if c == 0]
    assert len(first) == 2 and not np.allclose(hit.coord("policy_action")[first], base.coord("policy_action")[first])
    rows = {(r["alpha"], r["metric"]): r for r in run.rows}
    assert rows[(0.0, "action_l2")]["value"] == 0 and rows[(1.0, "action_l2")]["value"] > 0
    for alpha in (0.0, 1.0):
        assert rows[(alpha, "success_rate")]["n_episodes"] == 2
        assert rows[(alpha, "episode_length")]["baseline"] == 20  # both trials ran to max_steps unmodified
    assert rows[(0.0, "success_rate")]["p_value"] == 1.0
    assert (tmp_path / "success_vs_alpha.png").is_file() and (tmp_path / "dose_response.png").is_file()
