"""Stores on an object store without a server: fsspec's ``memory://`` file system, in this process (fast tier).

Every ``scheme://`` URL but ``file://`` is an object store to the toolkit (``toolkit.store.location``): a new store
is built in a local folder and uploaded with its root ``zarr.json`` last, and one writer at a time holds a lease
object beside it (memory:// has no conditional writes: the lease's write-then-read-back fallback).  The same on a
real S3 server, with runs killed and resumed, Ray and every reader: tests/test_s3_store.py (slow tier).
"""

import uuid

import pytest

import toolkit
from synthetic import assert_same_store, registered
from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import LeaseLock, is_remote, location

OPTIONS = dict(model="tinyvla", dataset="synthetic", chunk_samples=4, dtype="float32",
               dataset_options={"n_tasks": 1, "n_episodes": 2, "n_steps": 3})  # 6 samples: a full and a part chunk


@pytest.fixture
def url():
    bucket = f"toolkit-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/runs/run.zarr"
    fs = location(f"memory://{bucket}/runs/run.zarr").fs
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def test_a_store_on_an_object_store_equals_the_same_run_on_disk(url, tmp_path):
    with registered():
        toolkit.extract(store=url, **OPTIONS)
        toolkit.extract(store=tmp_path / "local.zarr", **OPTIONS)
    assert is_remote(url) and location(url).remote
    assert_same_store(tmp_path / "local.zarr", url, 6)
    loc = location(url)
    assert not loc.fs.exists(LeaseLock(loc).key)  # the writer released its lease


def test_a_second_writer_is_refused_while_the_lease_is_held(url):
    loc = location(url)
    first = LeaseLock(loc, seconds=30)
    first.acquire()
    try:
        with pytest.raises(ToolkitError, match="is being written by pid"):
            LeaseLock(loc, seconds=30).acquire()
        with registered(), pytest.raises(ToolkitError, match="is being written by pid"):
            toolkit.extract(store=url, **OPTIONS)
    finally:
        first.release()
    assert not loc.fs.exists(first.key)  # released: the lease object is gone
    second = LeaseLock(loc, seconds=30)
    second.acquire()  # and the next writer gets it
    second.release()


def test_an_interrupted_upload_is_no_store_and_overwrite_replaces_it(url):
    with registered():
        toolkit.extract(store=url, **OPTIONS)
        loc = location(url)
        loc.fs.rm_file(f"{loc.root}/zarr.json")  # as if killed during the upload: the root is uploaded last
        with pytest.raises(ToolkitError):
            toolkit.open_store(url)
        with pytest.raises(ToolkitError, match="interrupted before any sample"):
            toolkit.extract(store=url, resume=True, **OPTIONS)
        toolkit.extract(store=url, overwrite=True, **OPTIONS)
    s = toolkit.open_store(url)
    assert s.complete and s.n_samples == 6


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(ToolkitError, match="cannot open nosuchscheme://bucket/x.zarr") as e:
        location("nosuchscheme://bucket/x.zarr")
    assert "\n" not in str(e.value)


def _cli(*args, env=None):
    """The CLI as a user runs it, with only the environment given (no AWS credentials or config unless set)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    res = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, timeout=120,
                         env={**base, "HOME": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true", **(env or {})})
    return res.returncode, res.stderr.strip().splitlines()


@pytest.mark.parametrize("case", ["no credentials", "connection refused", "secret in the URL", "memory"])
def test_object_store_mistakes_are_one_line(case):
    pytest.importorskip("s3fs")
    if case == "no credentials":
        code, lines = _cli("info", "s3://bucket/runs/x.zarr")
        expect = "NoCredentialsError"
    elif case == "connection refused":  # nothing listens on the discard port
        code, lines = _cli("info", "s3://bucket/runs/x.zarr", env={
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
        expect = "Could not connect to the endpoint URL"
    elif case == "secret in the URL":
        code, lines = _cli("extract", "s3://AKIAEXAMPLE:hunter2secret@bucket/runs/x.zarr", "--model", "pi0",
                           "--dataset", "libero")
        expect = "the URL carries credentials"
        assert not any("hunter2secret" in line or "AKIAEXAMPLE" in line for line in lines)
    else:
        code, lines = _cli("extract", "memory://bucket/runs/x.zarr", "--model", "pi0", "--dataset", "libero")
        expect = "lives only inside one Python process"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines


@pytest.mark.slow
def test_a_silent_endpoint_is_an_error_within_30_seconds(tmp_path):
    """An endpoint that accepts connections and never answers (a hung proxy, a black-holed load balancer)."""
    pytest.importorskip("s3fs")
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    t0 = time.perf_counter()
    try:
        code, lines = _cli("info", "s3://bucket/runs/x.zarr", env={
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    finally:
        server.close()
    took = time.perf_counter() - t0
    assert code == 2 and len(lines) == 1 and "timeout" in lines[0].lower(), lines
    assert took < 30, took
