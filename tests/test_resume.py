"""An extraction killed with SIGKILL resumes with --resume and ends equal to an uninterrupted run.

Every test here runs `toolkit extract` in processes of its own, killed, interrupted or racing: the slow tier.
(The fast tier resumes in process: tests/test_store.py, tests/test_resume_spec.py.)
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from synthetic import ToolkitProcess, assert_same_store

pytestmark = pytest.mark.slow

ARGS = ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4", "--batch-size", "2",
        "--streams", "resid_post,pre_mlp_norm_scale", "--no-progress"]


def _extract(store, *extra) -> list[str]:
    """The command line of one `toolkit extract` of the test run into ``store``."""
    return [sys.executable, "-m", "toolkit", "extract", "--store", str(store), *ARGS, *extra]


def _run(store, *extra, cwd):
    return subprocess.run(_extract(store, *extra), capture_output=True, text=True, cwd=cwd)


def _committed(store):
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"].get("n_samples", 0)
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, started in the background: it runs beside the first test's own runs."""
    d = tmp_path_factory.mktemp("ref")
    run = ToolkitProcess(["extract", "--store", d / "ref.zarr", *ARGS], result=d / "ref.zarr", cwd=d)
    yield run
    run.stop()


@pytest.fixture
def reference(reference_run):
    return reference_run.wait()


def test_sigkill_then_resume_equals_an_uninterrupted_run(reference_run, tmp_path):
    """Killed as soon as the store exists (nothing committed yet), then each --resume killed again, after 6 and
    after 15 committed samples: the last --resume ends equal to the uninterrupted run."""
    store = tmp_path / "killed.zarr"
    for kill_after in (0, 6, 15):
        resume = ["--resume"] if kill_after else []
        proc = subprocess.Popen(_extract(store, *resume), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _committed(store) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed ({kill_after})"
        assert _committed(store) < 24
    res = _run(store, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_same_store(reference_run.wait(), store, 24)


def test_resuming_a_complete_store_changes_nothing(reference, tmp_path):
    import shutil

    store = tmp_path / "done.zarr"
    shutil.copytree(reference, store)
    res = _run(store, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_same_store(reference, store, 24)


def _wait_committed(store, proc, at_least):
    deadline = time.time() + 120
    while _committed(store) < at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


def _interrupt(command, store, sig, code, at_least, cwd):
    """Run ``command``, send ``sig`` once ``at_least`` samples are committed; check the one line it ends with and
    what it leaves; return the committed count and the --resume command it printed.  None: the run finished before
    the signal could land (a busy machine can hold this process back for the second the tiny run needs), or the
    signal landed while it was winding up its last commit (it then completes the store and exits 0): the caller
    tries again.  The run is stopped (SIGSTOP) the moment the count is seen, so the signal lands there."""
    import shlex

    proc = subprocess.Popen([sys.executable, "-m", "toolkit", *command], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_committed(store, proc, at_least)
    proc.send_signal(signal.SIGSTOP)
    if proc.poll() is not None or _committed(store) >= 24:
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=120)
        return None
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and _committed(store) == 24:  # stopped while winding up: it finishes, as it should,
        assert f"warning: {signal.Signals(sig).name} arrived while the run was committing" in err, err  # and says so
        return None
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "Aborted" not in err
    name = signal.Signals(sig).name
    n = _committed(store)
    assert at_least <= n < 24
    assert last.startswith(f"error: interrupted by {name}: {n} samples are committed in {store}; continue with: "
                           "toolkit extract "), last
    assert not list(store.rglob("*.partial")) and not (store.parent / f".{store.name}.lock").exists()
    resume = shlex.split(last.split("continue with: ", 1)[1])
    assert resume[0] == "toolkit" and resume[-1] == "--resume" and resume.count("--resume") == 1
    return n, resume[1:]


def test_a_signal_commits_prints_the_resume_command_and_the_store_resumes(reference, tmp_path):
    """SIGINT (exit 130) stops a run, SIGTERM (exit 143) the resumed run it printed: each commits what it has,
    prints one line with the count and the command to continue; the last printed command completes the store."""
    for attempt in range(3):
        store = tmp_path / f"stopped{attempt}.zarr"
        first = _interrupt(["extract", "--store", str(store), *ARGS], store, signal.SIGINT, 130, 4, tmp_path)
        second = first and _interrupt(first[1], store, signal.SIGTERM, 143, first[0] + 1, tmp_path)
        if second:  # the resumed run committed more before its signal
            break
    else:
        pytest.fail("three runs finished before a signal could land")
    res = subprocess.run([sys.executable, "-m", "toolkit", *second[1]], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_same_store(reference, store, 24)


def _race(tmp_path, store, *extra):
    procs = [subprocess.Popen(_extract(store, *extra), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    return [(p, *p.communicate(timeout=300)) for p in procs]


def _race_held(tmp_path, store, *extra):
    """The second run started while the first holds the store's lock (stopped by SIGSTOP the moment its pid is in
    the lock file, resumed once the second has answered): an overlap no busy machine can take away."""
    cmd = _extract(store, *extra)
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = store.parent / f".{store.name}.lock", time.time() + 180
    while first.poll() is None and time.time() < deadline:
        try:
            if f"pid {first.pid} " in lock.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    return [(first, *first.communicate(timeout=300)), (second, second.stdout, second.stderr)]


def _raced(tmp_path, name, prepare, *extra):
    """Two runs started together on the store ``prepare`` makes, until they overlap (on a busy machine one may
    finish before the other has started: then the second only finds a complete store, which proves nothing); the
    third try starts the second while the first is held inside its lock (a CI run lost the plain race 3 times)."""
    for attempt in range(3):
        store = tmp_path / f"{name}{attempt}.zarr"
        prepare(store)
        results = (_race if attempt < 2 else _race_held)(tmp_path, store, *extra)
        if not all(p.returncode == 0 for p, _, _ in results):
            return store, results
    pytest.fail("three pairs of runs never overlapped")


def _exactly_one_proceeds(results, store):
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    loser = next(err for p, _, err in results if p.returncode == 2)
    line = loser.strip().splitlines()[-1]
    assert "Traceback" not in loser
    assert line.startswith(f"error: {store} is being written by pid ") or "already exists" in line, line


def test_two_concurrent_creates_one_proceeds_and_the_store_equals_a_single_run(reference, tmp_path):
    store, results = _raced(tmp_path, "race", lambda store: None)
    _exactly_one_proceeds(results, store)
    assert_same_store(reference, store, 24)
    assert not list(tmp_path.glob(f".{store.name}.*"))  # no temp directory, no lock file left


def test_two_concurrent_resumes_one_proceeds_and_the_store_equals_a_single_run(reference, tmp_path):
    import shutil

    from toolkit.store.layout import write_consolidated

    def half(store):
        shutil.copytree(reference, store)
        write_consolidated(store, 8, False)  # as if killed after 8 committed samples

    store, results = _raced(tmp_path, "half", half, "--resume")
    _exactly_one_proceeds(results, store)
    assert_same_store(reference, store, 24)
