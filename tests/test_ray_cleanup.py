"""A killed driver takes its local Ray cluster with it (toolkit.run.ray's watchdog): no raylet, GCS, agent or worker
of the cluster ``extract --workers 2`` started outlives the driver's SIGKILL by more than a few seconds (Ray alone
leaves its dashboard and runtime-env agents for about a minute).  The driver is a subprocess with a local cluster
of its own (not the session's ``ray_cluster``, whose processes must survive it)."""

import os
import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")


def _running(procs):
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running() also checks the start time
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _name(p):
    try:
        return p.name()
    except psutil.Error:
        return f"pid {p.pid}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog is Linux-only (elsewhere Ray's reaper)")
def test_a_killed_driver_leaves_no_ray_process_of_its_cluster(tmp_path):
    others = [p for p in psutil.Process().children(recursive=True)  # the session's cluster, if up: never touched
              if _name(p) in ("raylet", "gcs_server")]
    store = tmp_path / "kill.zarr"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    env["RAY_AUTH_MODE"] = "disabled"  # loopback only
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", "--store", str(store), "--model", "pi0",
                             "--dataset", "libero", "--max-episodes", "8", "--chunk-samples", "2", "--streams",
                             "resid_post", "--workers", "2", "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, psutil.Process] = {}
    deadline = time.time() + 120
    while not (store / "zarr.json").exists() and proc.poll() is None and time.time() < deadline:
        try:  # the driver's descendants: the watchdog, the head processes, and under the raylet agents and actors
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver ended before its store was made"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(_name(p) for p in seen.values())
    assert "raylet" in names and sum(n.startswith("ray::") for n in names) >= 3, names  # 2 agents, >= 1 actor

    deadline = time.time() + 30
    while _running(seen.values()) and time.time() < deadline:
        time.sleep(0.2)
    left = _running(seen.values())
    assert not left, f"left running 30 s after the driver's SIGKILL: {sorted(_name(p) for p in left)}"
    assert len(_running(others)) == len(others), "the watchdog ended another cluster"
