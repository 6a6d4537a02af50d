"""Stores on S3 (a local moto server): extract, kill, resume, probe and every reader on ``s3://`` URLs.

The store on S3 must equal the same run written to a local directory, array by array; the lease lock keeps one
writer; a damaged or missing chunk object is named like a local one.  One S3 server for the session (``s3`` in
tests/conftest.py); each test writes under a prefix of its own.  The runs compared with the local reference run
in a process of their own, as a user's would; readers and errors that print no more than their result run in
this process (CliRunner), which saves a Python and torch start-up each.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from synthetic import ToolkitProcess, assert_same_store  # noqa: E402

from toolkit.sdk.errors import ToolkitError  # noqa: E402
from toolkit.store.location import LeaseLock, location  # noqa: E402
from toolkit.store.reader import open_store  # noqa: E402

ARGS = ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4", "--batch-size", "2",
        "--streams", "resid_post", "--sites", "vlm,action", "--no-progress"]
N = 24  # 4 episodes of the embedded LIBERO sample, 6 steps each
ONE_EPISODE = [*ARGS[:4], "--max-episodes", "1", *ARGS[6:]]
PROBE = ["--site", "vlm", "--layers", "0-1", "--target", "field:step:regression", "--folds", "3", "--no-mdl",
         "--no-success", "--no-progress"]

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def toolkit(*args, env=None, cwd=None, check=True):
    res = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def invoke(*args, check=True):
    """The CLI in this process (click's CliRunner): exit code, stdout and stderr apart."""
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    if check:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same run into a local directory, started in the background: it runs beside the first test's own."""
    d = tmp_path_factory.mktemp("local")
    run = ToolkitProcess(["extract", d / "ref.zarr", *ARGS], result=d / "ref.zarr",
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield run
    run.stop()


@pytest.fixture
def local_reference(reference_run):
    return reference_run.wait()


def _committed(url):
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(f"{root}/zarr.json"))["attributes"].get("n_samples", 0)
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def test_extract_kill_resume_probe_on_s3_equals_the_local_run(s3, reference_run, tmp_path):
    url = f"{s3}/runs/killed.zarr"
    env = {"TOOLKIT_LEASE_SECONDS": "6", "TOOLKIT_COMMIT_SAMPLES": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", url, *ARGS],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while _committed(url) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _committed(url)
    assert 8 <= killed_at < N

    # The dead run's lease (6 s, renewed every 2 s) still holds: a second writer is refused in one line ...
    with pytest.raises(ToolkitError, match=r"is being written by pid \d+ on host .* lease runs"):
        LeaseLock(location(url)).acquire()
    refused = time.time()
    local_reference = reference_run.wait()
    local = invoke("probe", local_reference, *PROBE, "--out", tmp_path / "local")  # (while the lease runs out)
    time.sleep(max(0.0, refused + 6.5 - time.time()))  # ... and once it expired, --resume takes it over
    toolkit("extract", url, *ARGS, "--resume", env=env)
    assert_same_store(local_reference, url, N)

    # every reader opens the URL: info, probe, stats, export, xarray
    info = json.loads(invoke("info", url, "--json").stdout)
    assert info["path"] == url and info["n_samples"] == N and info["complete"]
    assert info["sites"]["vlm"]["streams"]["resid_post"]["stored_bytes"] > 0
    remote = invoke("probe", url, *PROBE, "--out", tmp_path / "remote")
    assert remote.exit_code == local.exit_code == 0
    rows = [list(csv.DictReader(open(tmp_path / d / "results.csv"))) for d in ("remote", "local")]
    assert len(rows[0]) >= 2  # a row per layer
    drop = {"store"}  # the one column that names where the data came from
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]
    invoke("stats", url, "--site", "vlm", "--layers", "0", "--out", tmp_path / "stats")
    assert (tmp_path / "stats" / "stats.json").exists()
    invoke("export", url, "--out", tmp_path / "npy", "--sites", "vlm")
    assert any((tmp_path / "npy").rglob("*.npy"))

    import xarray as xr

    ds = xr.open_zarr(url, group="vlm")
    assert ds["resid_post"].shape[0] == N
    np.testing.assert_array_equal(ds["resid_post"].values, xr.open_zarr(local_reference, group="vlm")["resid_post"].values)


def test_a_second_writer_is_refused_and_a_dead_writers_lease_is_taken_over_once(s3):
    loc = location(f"{s3}/runs/leased.zarr")
    first = LeaseLock(loc, seconds=1.5)
    first.acquire()
    with pytest.raises(ToolkitError, match="is being written by pid"):
        LeaseLock(loc, seconds=1.5).acquire()
    time.sleep(1.0)  # renewed every 0.5 s: still held after its first term
    with pytest.raises(ToolkitError, match="is being written by pid"):
        LeaseLock(loc, seconds=1.5).acquire()

    first._stop.set()  # the holder "dies": no more renewals, the lease object stays behind
    first._thread.join()
    time.sleep(1.7)
    second, third = LeaseLock(loc, seconds=30), LeaseLock(loc, seconds=30)
    second.acquire()
    with pytest.raises(ToolkitError, match="is being written by pid"):
        third.acquire()
    # the old holder cannot renew over the new lease (conditional write on its stale ETag) and would stop
    assert not first._write({"IfMatch": first.etag})
    second.release()
    third.acquire()
    third.release()
    assert not loc.fs.exists(third.key)  # released: the lease object is gone


def test_damaged_and_missing_chunk_objects_are_named(s3, tmp_path):
    import fsspec

    url = f"{s3}/runs/damaged.zarr"
    invoke("extract", url, *ARGS[:4], "--max-episodes", "2", *ARGS[6:])  # 12 samples, 3 chunks
    fs, root = fsspec.url_to_fs(url)
    key = f"{root}/vlm/resid_post/c/1/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    res = invoke("verify", url, check=False)
    assert res.exit_code != 0 and "vlm/resid_post/c/1/0/0/0" in res.stdout + res.stderr
    fs.rm_file(key)
    fs.invalidate_cache()
    res = invoke("stats", url, "--site", "vlm", "--layers", "0", "--out", tmp_path / "s", check=False)
    assert res.exit_code != 0
    line = res.stderr.strip().splitlines()[-1]
    assert "vlm/resid_post/c/1/0/0/0" in line and "missing" in line and url in line


def test_an_interrupted_upload_is_no_store_and_overwrite_replaces_it(s3, local_reference):
    url = f"{s3}/runs/upload.zarr"
    invoke("extract", url, *ONE_EPISODE)
    loc = location(url)
    loc.fs.rm_file(f"{loc.root}/zarr.json")  # as if killed during the upload: the root is uploaded last
    assert invoke("info", url, check=False).exit_code != 0
    res = invoke("extract", url, *ARGS, "--resume", check=False)
    assert res.exit_code != 0 and "interrupted before any sample" in res.stderr
    invoke("extract", url, *ONE_EPISODE, "--overwrite")
    got, want = open_store(url), open_store(local_reference)
    assert got.complete and got.n_samples == 6
    np.testing.assert_array_equal(got.read("vlm", "resid_post"), want.read("vlm", "resid_post")[:6])


def test_bad_urls_are_one_line(s3):
    res = toolkit("info", f"{s3}/no/such.zarr", check=False)
    assert res.returncode != 0 and "is not a store" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = toolkit("extract", s3, *ARGS, check=False)  # a bare bucket: no place beside it for the lease
    assert res.returncode != 0 and "names a whole bucket" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = toolkit("info", "nosuchscheme://bucket/x.zarr", check=False)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.ray
def test_two_ray_workers_write_the_same_store_to_s3(s3, ray_cluster, local_reference):
    """--workers on an object store: every actor PUTs its own chunks, the driver (this process, on the session's
    cluster) holds the lease and commits."""
    url = f"{s3}/runs/ray.zarr"
    invoke("extract", url, *ARGS, "--workers", "2")
    assert_same_store(local_reference, url, N)
    assert not location(url).fs.exists(LeaseLock(location(url)).key)  # the driver released its lease


def test_a_stale_lease_holder_writes_nothing_over_the_new_owner(s3, monkeypatch):
    """The fence of a lease holder's writes: past its deadline it raises before writing; a write already under way
    when it stalled (it passed the deadline check, then the process stopped) is conditional on the object as the
    holder last saw it, so it fails once the new owner wrote that object, and is not retried."""
    from toolkit.store import lock as lock_module
    from toolkit.store.lock import LeaseLost

    loc = location(f"{s3}/runs/fenced.zarr")
    key = loc.key("vlm/resid_post/c/0/0/0/0")
    a = LeaseLock(loc, seconds=1.2)
    a.acquire()
    a.put(key, b"A's first write")
    a._stop.set()  # A stalls: no more renewals
    a._thread.join()
    time.sleep(1.3)
    with pytest.raises(LeaseLost, match="ran out before it could be renewed"):
        a.put(key, b"A after its lease")
    b = LeaseLock(loc, seconds=30)
    b.acquire()  # the new owner takes over the expired lease
    b.put(key, b"B's write")
    clock = iter([0.0] + [1e12] * 10)  # A's in-flight write passed its check before the stall; then time moved on
    monkeypatch.setattr(lock_module, "_clock", lambda: next(clock))
    a.deadline = 1.0
    with pytest.raises(LeaseLost):
        a.put(key, b"A's write in flight")
    assert loc.fs.cat_file(key) == b"B's write"
    monkeypatch.undo()
    # the owner wins: a stale write that landed after the owner last saw the object is overwritten, not refused
    loc.fs.pipe_file(key, b"a stale write that landed")
    b.put(key, b"B again")
    assert loc.fs.cat_file(key) == b"B again"
    b.release()
    assert not loc.fs.exists(b.key)


@pytest.mark.parametrize("pause_after", [2, 13])
def test_a_writer_paused_past_its_lease_cannot_change_the_store_that_took_over(s3, local_reference, pause_after):
    """Writer A is stopped (SIGSTOP) past its lease after ``pause_after`` committed samples; B takes over with
    --resume and finishes; A is resumed: it stops with one line, and the store equals an uninterrupted run, with
    every array's own metadata at full length (partial-chunk commits every 2 samples: A holds padded chunks)."""
    url = f"{s3}/runs/stale-{pause_after}.zarr"
    # a 6 s lease: B, the run that takes over, must itself renew in time on a loaded machine (at 3 s a CI run
    # starved B's renewal once: "the lease ... ran out before it could be renewed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOOLKIT_LEASE_SECONDS": "6", "TOOLKIT_COMMIT_SAMPLES": "2"}
    a = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", url, *ARGS], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _committed(url) < pause_after and a.poll() is None and time.time() - t0 < 180:
        time.sleep(0.01)
    assert a.poll() is None, a.stderr.read()[-2000:]
    a.send_signal(signal.SIGSTOP)
    try:
        time.sleep(6.5)
        toolkit("extract", url, *ARGS, "--resume", env=env)
    finally:
        a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=120)
    assert a.returncode != 0
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: pi0: no --checkpoint")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lease" in lines[0] and "Traceback" not in err, err
    got, want = open_store(url), open_store(local_reference)
    assert got.complete and got.n_samples == N
    for site in ("vlm", "action"):
        np.testing.assert_array_equal(got.read(site, "resid_post"), want.read(site, "resid_post"))
    assert invoke("verify", url).exit_code == 0
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    for meta_key in fs.glob(f"{root}/**/zarr.json"):
        meta = json.loads(fs.cat_file(meta_key))
        if meta.get("node_type") == "array" and meta["dimension_names"][0] == "sample":
            assert meta["shape"][0] == N, meta_key
