"""An extraction killed with SIGKILL resumes with --resume and ends equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import toolkit

ARGS = ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4", "--batch-size", "2",
        "--streams", "resid_post,pre_mlp_norm_scale", "--no-progress"]


def _run(store, *extra, cwd):
    return subprocess.run([sys.executable, "-m", "toolkit", "extract", "--store", str(store), *ARGS, *extra],
                          capture_output=True, text=True, cwd=cwd)


def _committed(store):
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"].get("n_samples", 0)
    except (OSError, ValueError, KeyError):
        return -1


def _assert_same(a, b):
    a, b = toolkit.open_store(a), toolkit.open_store(b)
    assert b.complete and a.n_samples == b.n_samples == 24
    assert a.fields() == b.fields() and a.sites == b.sites
    for f in a.fields():
        assert np.array_equal(a.coord(f), b.coord(f)), f
    for site in a.sites:
        for stream in a.streams(site):
            np.testing.assert_array_equal(a.read(site, stream), b.read(site, stream), err_msg=f"{site}/{stream}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    res = _run(d / "ref.zarr", cwd=d)
    assert res.returncode == 0, res.stderr
    return d / "ref.zarr"


@pytest.mark.parametrize("kill_after", [0, 6, 15])
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path, kill_after):
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", "--store", str(store), *ARGS],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _committed(store) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert _committed(store) < 24
    res = _run(store, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _assert_same(reference, store)


def test_resuming_a_complete_store_changes_nothing(reference, tmp_path):
    import shutil

    store = tmp_path / "done.zarr"
    shutil.copytree(reference, store)
    res = _run(store, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _assert_same(reference, store)
