"""The simulator tests' own pytest process, started in the background as soon as collection has finished.

MuJoCo/robosuite (the LIBERO simulator) and TensorFlow (the RLDS adapter) crash when both are loaded into one
Python process, so the tests marked ``sim`` (tests/test_*_sim.py) run in a pytest process of their own.  It is
mostly one core rendering in software, so ``tests/conftest.py`` starts it when the session's tests are known
(``start``) and ``tests/test_sim_process.py`` (run last) waits for its verdict (``result``): it overlaps the
rest of the suite instead of adding to it.

One process per session, also when pytest-xdist runs the suite in several workers: the session's controller
makes a folder (``prepare``, its path in ``TOOLKIT_SIM_DIR``, which the workers inherit); the first process that
collects the runner test and creates ``started`` in it starts the simulator tests, whose output and exit code
land in that folder; whichever worker runs the runner test waits for the exit code there; the controller stops
the process and removes the folder when the session ends (``stop``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
HAVE_SIM = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None
RUNNER = "test_sim_process.py::test_the_simulator_tests_pass_in_their_own_process"
ENV = "TOOLKIT_SIM_DIR"
# Runs the simulator tests and writes their exit code last, so a complete "rc" file means they are done.
_WRAPPER = ("import os, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1] + '.tmp', 'w').write(str(rc)); os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


def modules() -> list[str]:
    return sorted(str(p) for p in HERE.glob("test_*_sim.py"))


def is_runner(nodeid: str) -> bool:
    return nodeid.split("@", 1)[0].endswith(RUNNER)  # pytest-xdist's loadgroup appends "@group"


def prepare() -> None:
    """In the session's controller (the plain pytest process, or pytest-xdist's): the folder of this session."""
    os.environ[ENV] = tempfile.mkdtemp(prefix="toolkit-sim-tests-")


def _folder() -> Path:
    return Path(os.environ[ENV])


def start() -> None:
    """Start ``pytest -m sim`` on the simulator modules, once per session, whichever process asks first."""
    if not HAVE_SIM:
        return
    folder = _folder()
    try:
        (folder / "started").mkdir()
    except FileExistsError:
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-m", "sim",
           "--basetemp", str(folder / "basetemp"), *modules()]
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(folder / "rc"), *cmd],
                                env={**os.environ, "TOOLKIT_SIM_TESTS": "1"}, stdout=out, stderr=err,
                                cwd=HERE.parent, start_new_session=True)
    (folder / "pid").write_text(str(proc.pid))


def result(timeout: float = 900) -> tuple[int, str, str]:
    """Wait for the simulator tests: (exit code, stdout, stderr)."""
    start()  # not started yet (the runner was selected some other way): start it now
    folder = _folder()
    deadline = time.monotonic() + timeout
    while not (folder / "rc").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the simulator tests did not finish in {timeout:.0f} s")
        time.sleep(0.2)
    return int((folder / "rc").read_text()), (folder / "stdout").read_text(), (folder / "stderr").read_text()


def stop() -> None:
    """End of the session (the controller): stop the process if nobody waited for it, remove the folder."""
    folder = Path(os.environ.pop(ENV, "") or "")
    if not folder.name:
        return
    try:
        os.killpg(int((folder / "pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass  # never started, or finished
    shutil.rmtree(folder, ignore_errors=True)
