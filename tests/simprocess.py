"""The simulator tests' own pytest process, started in the background as soon as collection has finished.

MuJoCo/robosuite (the LIBERO simulator) and TensorFlow (the RLDS adapter) crash when both are loaded into one
Python process, so the tests marked ``sim`` (tests/test_*_sim.py) run in a pytest process of their own.  It is
mostly one core rendering in software, so ``tests/conftest.py`` starts it when the session's tests are known
(``start``) and ``tests/test_sim_process.py`` (run last) waits for its verdict (``result``): it overlaps the
rest of the suite instead of adding to it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
HAVE_SIM = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None
RUNNER = "test_sim_process.py::test_the_simulator_tests_pass_in_their_own_process"

_state: dict = {}


def modules() -> list[str]:
    return sorted(str(p) for p in HERE.glob("test_*_sim.py"))


def start() -> None:
    """Start ``pytest -m sim`` on the simulator modules (once; output to temporary files, not pipes)."""
    if _state or not HAVE_SIM:
        return
    tmp = Path(tempfile.mkdtemp(prefix="toolkit-sim-tests-"))
    out, err = open(tmp / "stdout", "w+"), open(tmp / "stderr", "w+")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "sim", "--basetemp",
           str(tmp / "basetemp"), *modules()]
    proc = subprocess.Popen(cmd, env={**os.environ, "TOOLKIT_SIM_TESTS": "1"}, stdout=out, stderr=err,
                            cwd=HERE.parent)
    _state.update(proc=proc, tmp=tmp, out=out, err=err)


def result(timeout: float = 900) -> tuple[int, str, str]:
    """Wait for the process: (return code, stdout, stderr)."""
    start()  # not started yet (the runner was selected some other way): start it now
    proc = _state["proc"]
    proc.wait(timeout)
    out, err = _state["out"], _state["err"]
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


def stop() -> None:
    """End of the session: stop the process if nobody waited for it, remove its files."""
    if not _state:
        return
    proc = _state.pop("proc")
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    _state.pop("out").close()
    _state.pop("err").close()
    shutil.rmtree(_state.pop("tmp"), ignore_errors=True)
