"""The live-simulator tests, in a process of their own.

MuJoCo/robosuite (the LIBERO simulator) and TensorFlow (the RLDS adapter) crash when both are loaded into one
Python process, so every simulator test module (tests/test_*_sim.py) runs in one separate pytest process
started here.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAVE_SIM = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None


@pytest.mark.skipif(not HAVE_SIM, reason="the LIBERO simulator is not installed (pip install 'toolkit[sim]')")
def test_the_simulator_tests_pass_in_their_own_process():
    modules = sorted(str(p) for p in Path(__file__).parent.glob("test_*_sim.py"))
    assert len(modules) >= 2, modules  # the rollout tests and the closed-loop intervention tests
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules],
                         env={**os.environ, "TOOLKIT_SIM_TESTS": "1"}, capture_output=True, text=True)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
