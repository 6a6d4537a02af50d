"""Compute defaults: torch threads from the cgroup CPU quota, OMP_NUM_THREADS first, --threads to choose."""

import os

import pytest
import torch

from toolkit.sdk.compute import busy_cpus, cpu_quota, default_threads, set_threads, usable_cpus
from toolkit.sdk.errors import ToolkitError


@pytest.mark.parametrize("text, quota", [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max 100000", None),
                                         ("garbage", None)])
def test_the_cgroup_quota_is_read_from_cpu_max(tmp_path, text, quota):
    (tmp_path / "cpu.max").write_text(text)
    assert cpu_quota(tmp_path / "cpu.max") == quota


def test_a_missing_cpu_max_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "absent", v1_dirs=()) is None


@pytest.mark.parametrize("quota, period, cpus", [("150000", "100000", 1.5), ("-1", "100000", None),
                                                 ("x", "100000", None)])
def test_cgroup_v1_quota_is_read_where_there_is_no_cpu_max(tmp_path, quota, period, cpus):
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text(quota + "\n")
    (v1 / "cpu.cfs_period_us").write_text(period + "\n")
    assert cpu_quota(tmp_path / "absent", v1_dirs=(tmp_path / "cpu", v1)) == cpus


def test_default_threads_leave_the_cpus_other_processes_keep_busy(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    usable = usable_cpus(tmp_path / "absent", v1_dirs=())
    assert default_threads(tmp_path / "absent", v1_dirs=(), busy=0) == usable
    assert default_threads(tmp_path / "absent", v1_dirs=(), busy=usable) == 1  # a busy machine: one thread
    assert default_threads(tmp_path / "absent", v1_dirs=(), busy=10 * usable) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.0, 0.5))
    assert busy_cpus() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (_ for _ in ()).throw(OSError("no load average")))
    assert busy_cpus() == 0


def test_default_threads_follow_omp_then_the_quota(tmp_path, monkeypatch):
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    (tmp_path / "cpu.max").write_text("100000 100000")
    assert default_threads(tmp_path / "cpu.max", busy=0) == 1
    (tmp_path / "cpu.max").write_text("150000 100000")  # 1.5 CPUs: round up, never past the usable CPUs
    assert default_threads(tmp_path / "cpu.max", busy=0) == min(2, usable)
    (tmp_path / "cpu.max").write_text("max 100000")
    assert default_threads(tmp_path / "cpu.max", busy=0) == usable


def test_set_threads_resizes_torch_and_rejects_zero(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # restored after the test
    try:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
        assert set_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # idle threads sleep on a shared machine
        assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "4"  # OpenBLAS's helpers too, not spin ~0.1 s per GEMM
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "20")
        set_threads(1)
        assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "20"  # the user's own setting wins
        with pytest.raises(ToolkitError, match="--threads must be at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
