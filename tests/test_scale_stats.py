"""Statistics on Dask (toolkit.analysis.parallel): per-chunk tasks merged by a tree equal the serial path (rel 1e-10)
on the threads and processes schedulers and a local dask.distributed cluster; bad chunks still raise."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_stats import make_store
from toolkit.cli import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.stats import compare_stores, layer_stats, store_stats
from toolkit.store.chunks import CorruptStoreError

pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 2, 3, 10)).astype(np.float32) * np.linspace(0.1, 30, 10)
    x[..., 2] = 0.0  # dead
    y = x + rng.normal(size=x.shape).astype(np.float32)
    d = tmp_path_factory.mktemp("scale_stats")
    return make_store(d / "a.zarr", x, chunk=16), make_store(d / "b.zarr", y, chunk=16)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=0)


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_dask_moments_equal_the_serial_ones(stores, scheduler):
    a, _ = stores
    for layer in a.layers("context")[: 1 if scheduler == "processes" else None]:  # processes: a pool per call
        serial = layer_stats(a, "context", "context", layer).moments
        dask = layer_stats(a, "context", "context", layer, scheduler=scheduler).moments
        assert dask.n == serial.n == 150 * 3
        for name in ("mean", "m2", "min", "max", "near_zero", "nonfinite"):
            close(getattr(dask, name), getattr(serial, name))


@pytest.mark.slow  # a dask.distributed cluster of worker processes
def test_dask_distributed_cluster_gives_the_serial_report(stores):
    from dask.distributed import LocalCluster

    a, b = stores
    serial = compare_stores(a, b, "context", "context", bins=32)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        dask = compare_stores(a, b, "context", "context", bins=32, scheduler=cluster.scheduler_address)
    for layer, rep in serial["layers"].items():
        other = dask["layers"][layer]
        assert other["n_rows"] == rep["n_rows"]
        for key in ("hist_a", "hist_b"):  # counts: exactly equal
            np.testing.assert_array_equal(other["_arrays"][key], rep["_arrays"][key])
        for key in ("mean_a", "mean_b", "w1", "kl_ab"):
            close(other["_arrays"][key], rep["_arrays"][key])
        for side in "ab":
            for key, value in rep["global"][side].items():
                close(other["global"][side][key], value)


def test_cli_stats_scheduler_matches_serial(stores):
    a, _ = stores
    runner = CliRunner()
    serial = runner.invoke(cli, ["stats", str(a.path), "--json", "--no-progress"])
    dask = runner.invoke(cli, ["stats", str(a.path), "--json", "--no-progress", "--scheduler", "threads"])
    assert serial.exit_code == 0 and dask.exit_code == 0, dask.output
    s, d = json.loads(serial.output), json.loads(dask.output)
    for layer in s["layers"]:
        assert s["layers"][layer]["dead"] == d["layers"][layer]["dead"] == [2]
        for k in ("mean", "std"):
            close(d["layers"][layer]["global"][k], s["layers"][layer]["global"][k])


def test_a_damaged_chunk_and_a_bad_scheduler_fail_in_one_line(tmp_path):
    x = np.random.default_rng(2).normal(size=(64, 1, 2, 4)).astype(np.float32)
    s = make_store(tmp_path / "c.zarr", x, chunk=16)
    chunk = tmp_path / "c.zarr" / "context" / "context" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CorruptStoreError, match="c/2/0"):
        store_stats(s, scheduler="threads")
    with pytest.raises(ToolkitError, match="unknown --scheduler"):
        store_stats(s, scheduler="gpu")
