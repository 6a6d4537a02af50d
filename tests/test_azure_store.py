"""Stores on Azure Blob Storage (``az://``) for real: Azurite (Microsoft's Blob emulator, from npm; `.ci/run`
installs it) on the loopback address, through adlfs, as a user's run would reach Azure.

A run killed mid-way and resumed gives a store equal to a local run; a second writer is refused while the first
one's lease runs.  What is and is not guaranteed on az:// and gs:// (no conditional writes through their fsspec
backends here: the lease is written then read back, and a stalled writer is fenced by its deadline only) is in
docs/scaling.md.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("adlfs")

pytestmark = [pytest.mark.azure, pytest.mark.slow]

ARGS = ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4", "--batch-size", "2",
        "--streams", "resid_post", "--sites", "vlm,action", "--no-progress"]
N = 24
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's


def _azurite() -> str | None:
    local = Path(__file__).resolve().parent.parent / ".ci-node" / "node_modules" / ".bin" / "azurite-blob"
    return os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob") or (str(local) if local.exists() else None)


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    exe = _azurite()
    if exe is None:
        pytest.skip("Azurite is not installed (npm install azurite; .ci/run does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--skipApiVersionCheck", "--silent"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": conn, "OMP_NUM_THREADS": "1"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "Azurite did not start"
                time.sleep(0.1)
        import fsspec

        fsspec.filesystem("az", connection_string=conn, skip_instance_cache=True).mkdir("runs")
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli(*args, env, check=True):
    res = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _committed(url: str, env: dict) -> int:
    code = ("import json, fsspec, sys\nfs, root = fsspec.url_to_fs(sys.argv[1])\n"
            "try: print(json.loads(fs.cat_file(root + '/zarr.json'))['attributes']['n_samples'])\n"
            "except Exception: print(-1)")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, env=env).stdout
    return int(out.strip() or -1)


def test_a_killed_run_on_az_resumes_to_the_local_run_and_a_second_writer_is_refused(azure, tmp_path):
    env = {**azure, "TOOLKIT_LEASE_SECONDS": "4", "TOOLKIT_COMMIT_SAMPLES": "4"}
    local = tmp_path / "local.zarr"
    ref = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", local, *ARGS], env=azure,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = "az://runs/killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "extract", url, *ARGS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _committed(url, env) < 8 and proc.poll() is None and time.time() - t0 < 180:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _committed(url, env)
    assert 0 < killed_at < N
    res = _cli("extract", url, *ARGS, "--resume", env=env, check=False)  # the dead run's lease still runs
    if res.returncode != 0:
        assert "is being written by pid" in res.stderr and len(res.stderr.strip().splitlines()) <= 2, res.stderr
        time.sleep(4.5)
        _cli("extract", url, *ARGS, "--resume", env=env)
    assert ref.wait() == 0, ref.stderr.read()[-2000:]
    assert _cli("verify", url, env=env).stdout.startswith("ok:")
    code = ("import sys, numpy as np, toolkit\na, b = toolkit.open_store(sys.argv[1]), toolkit.open_store(sys.argv[2])\n"
            "assert a.complete and a.n_samples == b.n_samples == 24\n"
            "for site in ('vlm', 'action'):\n"
            "    np.testing.assert_array_equal(a.read(site, 'resid_post'), b.read(site, 'resid_post'))\n"
            "for f in b.fields():\n    np.testing.assert_array_equal(a.coord(f), b.coord(f))\nprint('same')")
    out = subprocess.run([sys.executable, "-c", code, url, str(local)], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "same", out.stderr[-2000:]
