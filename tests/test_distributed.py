"""Extraction on Ray (toolkit.run.ray): the store equals a one-process run's, also when a worker is killed
mid-run or the driver is killed and the run resumed.  The session's one local Ray cluster (2 CPUs,
``ray_cluster`` in tests/conftest.py); the unit plan and the one-line errors need no Ray (fast tier)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import toolkit
from synthetic import assert_same_store
from toolkit.run.ray import _reachable, units
from toolkit.run.api import extract

OPTIONS = dict(model="pi0", dataset="libero", max_episodes=2, chunk_samples=2, streams="resid_post", progress=False)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    path = tmp_path_factory.mktemp("serial") / "serial.zarr"
    return extract(store=path, **OPTIONS)


def assert_same_run(a, b):
    assert_same_store(a, b, 12)
    # --workers is not part of what the store holds
    assert toolkit.open_store(a).attrs["run_spec"] == toolkit.open_store(b).attrs["run_spec"]


def committed(store):
    try:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        return attrs.get("n_samples", 0), bool(attrs.get("complete"))
    except (OSError, ValueError, KeyError):
        return 0, False


def test_units_are_whole_chunks_and_whole_batches():
    assert units(0, 10, 2, 1, 2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert units(0, 40, 4, 2, 2) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 28), (28, 32),
                                     (32, 36), (36, 40)]
    assert units(0, 13, 4, 3, 1) == [(0, 12), (12, 13)]  # lcm(4, 3): chunk and batch boundaries
    assert units(5, 9, 2, 1, 4) == [(5, 6), (6, 8), (8, 9)]  # a resume inside a chunk: its one writer


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_write_the_one_process_store(ray_cluster, serial, tmp_path, monkeypatch):
    """A relative store path means the driver's folder, though the session's Ray workers started elsewhere."""
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "ray.zarr"
    res = CliRunner().invoke(cli, ["extract", "--store", "ray.zarr", "--model", "pi0", "--dataset", "libero",
                                   "--max-episodes", "2", "--chunk-samples", "2", "--streams", "resid_post",
                                   "--workers", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert_same_run(serial, store)
    assert not list(tmp_path.glob(".*lock")), "the driver released the store's lock"


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_and_nothing_is_lost(ray_cluster, serial, tmp_path):
    ray = ray_cluster
    store = tmp_path / "killed.zarr"
    errors = []

    def drive():
        try:
            extract(store=store, workers=2, **OPTIONS)
        except BaseException as e:  # surfaced below
            errors.append(e)

    before = set(ray.util.list_named_actors())
    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.time() + 240
    while committed(store)[0] < 2 and driver.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    names = [n for n in ray.util.list_named_actors() if n.startswith("toolkit-extract-") and n not in before]
    n, complete = committed(store)
    assert names and n >= 2 and not complete, "the run ended before a worker could be killed"
    # both actors are busy while units remain: the victim dies mid-unit; Ray restarts it and reruns the unit
    ray.kill(ray.get_actor(names[0]), no_restart=False)
    driver.join(300)
    assert not errors, errors
    assert_same_run(serial, store)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_leaves_a_store_that_resume_finishes(ray_cluster, serial, tmp_path):
    ray = ray_cluster
    store = tmp_path / "driver.zarr"
    args = [sys.executable, "-m", "toolkit", "extract", "--store", str(store), "--model", "pi0", "--dataset", "libero",
            "--max-episodes", "2", "--chunk-samples", "2", "--streams", "resid_post", "--no-progress"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    address = ray.get_runtime_context().gcs_address  # the driver joins the session's cluster (no second start)
    for _attempt in range(3):  # the committed prefix can jump to the end when the first unit finishes last
        shutil.rmtree(store, ignore_errors=True)
        proc = subprocess.Popen([*args, "--workers", "2", "--ray-address", address], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while committed(store)[0] < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n, complete = committed(store)
        if 2 <= n < 12 and not complete:
            break
    assert proc.returncode == -signal.SIGKILL and 2 <= n < 12 and not complete, "the run ended before the kill"
    res = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)  # one process
    assert res.returncode == 0, res.stderr
    assert_same_run(serial, store)


def test_a_bad_worker_count_fails_in_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(toolkit.ToolkitError, match="--workers must be at least 0, got -1"):
        extract(store=tmp_path / "x.zarr", workers=-1, **OPTIONS)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(toolkit.ToolkitError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        _reachable("127.0.0.1:1")  # Ray itself would retry for minutes
