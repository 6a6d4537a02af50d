"""The ridge probe's statistics on Dask (toolkit.analysis.probe.stats.probe_layer_statistics): per-chunk-group tasks merged
in a tree equal the serial sums (relative 1e-10), and the probe's results are the serial ones, on the threads
scheduler, through the CLI, and on a local dask.distributed cluster of 2 worker processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_probe import write_store
from toolkit.analysis.probe import ProbeConfig, Selection, probe
from toolkit.analysis.probe.select import resolve
from toolkit.analysis.probe.splits import make_folds
from toolkit.analysis.probe.stats import LayerInputs, cell_shifts, chunk_groups, layer_statistics
from toolkit.analysis.probe.stats import probe_layer_statistics
from toolkit.store.reader import open_store

pytest.importorskip("dask.distributed")


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Groups of 2 storage chunks (32 samples), so every layer is many Dask tasks."""
    monkeypatch.setattr("toolkit.analysis.probe.stats.group_rows", lambda n_folds, d: 32)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    # 16-sample chunks, so the chunk groups are many and small
    return write_store(tmp_path_factory.mktemp("probe_dask") / "s.zarr", eps_per_task=6, chunk_samples=16)


def _inputs(store, res, nd):
    ep = store.coord("episode")[res.rows].astype(np.int64)
    folds = make_folds("episodes", ep, store.coord("task_id")[res.rows], 5, 0)
    Y = np.random.default_rng(0).standard_normal((len(res.rows), 3)).astype(np.float32)
    return LayerInputs(np.arange(len(res.rows)), Y, folds.fold, res.bucket, 5, nd, cell_shifts(store, res, 0, nd))


def _same_rows(a, b):
    keys = ("layer", "t", "step", "target", "lambda_folds", "metric", "control", "ci_low", "ci_high", "compression")
    assert len(a.rows) == len(b.rows) > 0
    for ra, rb in zip(a.rows, b.rows):
        for k in keys:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-10, abs=1e-12), k
            else:
                assert va == vb, k


def test_dask_cell_statistics_equal_the_serial_sums(store_path):
    store = open_store(store_path)
    res = resolve(store, Selection(site="action", layers="6", step_buckets="6"))
    inputs = _inputs(store, res, 2)
    assert len(chunk_groups(store, res, 32)) > 4
    serial = layer_statistics(store, res, 0, inputs)
    dask = probe_layer_statistics(store, res, 0, inputs, "threads")
    assert sorted(serial) == sorted(dask) == [(j, b) for j in range(2) for b in range(2)]
    for key, folds in serial.items():
        assert sum(s.n for s in folds) == (res.bucket == key[1]).sum()
        for s, d in zip(folds, dask[key]):
            assert s.n == d.n
            for name in ("G", "B", "sx", "sy", "yy"):
                np.testing.assert_allclose(getattr(d, name), getattr(s, name), rtol=1e-10, atol=0)


def test_chunk_groups_follow_storage_chunks(store_path):
    store = open_store(store_path)
    res = resolve(store, Selection(site="vlm", layers="6", steps="0-5"))
    g = chunk_groups(store, res, 32)
    assert np.array_equal(np.concatenate(g), np.arange(len(res.rows)))
    chunk_of = [np.unique(res.rows[p] // 32) for p in g]  # 2 chunks of 16 per group, never split
    assert all(len(np.intersect1d(a, b)) == 0 for a, b in zip(chunk_of, chunk_of[1:]))


def test_probe_on_the_threads_scheduler_through_the_cli(store_path, tmp_path):
    from toolkit.cli import cli

    serial = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], ProbeConfig())
    out = tmp_path / "r"
    r = CliRunner().invoke(cli, ["probe", str(store_path), "--site", "vlm", "--layers", "3,6", "--scheduler",
                                           "threads", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == len(serial.rows)
    for a, b in zip(serial.rows, rows):
        assert (a["layer"], a["lambda_folds"]) == (b["layer"], b["lambda_folds"])
        assert a["metric"] == pytest.approx(b["metric"], rel=1e-10)
        assert a["compression"] == pytest.approx(b["compression"], rel=1e-10)
    bad = CliRunner().invoke(cli, ["probe", str(store_path), "--scheduler", "nowhere", "--no-progress"])
    assert bad.exit_code != 0 and "unknown --scheduler" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow  # a dask.distributed cluster of worker processes
def test_probe_on_a_local_cluster_equals_serial(store_path):
    from dask.distributed import LocalCluster

    sel = Selection(site="action", layers="6", step_buckets="6")
    serial = probe(store_path, sel, ["task"], ProbeConfig())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = probe(store_path, sel, ["task"], ProbeConfig(scheduler=cluster.scheduler_address))
    _same_rows(serial, dask)
