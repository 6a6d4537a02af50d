"""The live-simulator tests, in a process of their own.

MuJoCo/robosuite (the LIBERO simulator) and TensorFlow (the RLDS adapter) crash when both are loaded into one
Python process, so every test marked ``sim`` (tests/test_*_sim.py) runs in one separate pytest process.
``tests/conftest.py`` starts it in the background as soon as the session's tests are known
(``tests/simprocess.py``); this test, run last, waits for it and fails with its output.
"""

import pytest

import simprocess

pytestmark = [pytest.mark.sim, pytest.mark.slow]


@pytest.mark.skipif(not simprocess.HAVE_SIM,
                    reason="the LIBERO simulator is not installed (pip install 'toolkit[sim]')")
def test_the_simulator_tests_pass_in_their_own_process():
    modules = simprocess.modules()
    assert len(modules) >= 2, modules  # the rollout tests and the closed-loop intervention tests
    code, out, err = simprocess.result()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert code == 0, out[-6000:] + err[-3000:]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
