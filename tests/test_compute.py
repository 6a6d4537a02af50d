"""Compute defaults: torch threads from the cgroup CPU quota, OMP_NUM_THREADS first, --threads to choose."""

import os

import pytest
import torch

from toolkit.sdk.compute import cpu_quota, default_threads, set_threads
from toolkit.sdk.errors import ToolkitError


@pytest.mark.parametrize("text, quota", [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max 100000", None),
                                         ("garbage", None)])
def test_the_cgroup_quota_is_read_from_cpu_max(tmp_path, text, quota):
    (tmp_path / "cpu.max").write_text(text)
    assert cpu_quota(tmp_path / "cpu.max") == quota


def test_a_missing_cpu_max_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "absent") is None


def test_default_threads_follow_omp_then_the_quota(tmp_path, monkeypatch):
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    (tmp_path / "cpu.max").write_text("100000 100000")
    assert default_threads(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("150000 100000")  # 1.5 CPUs: round up, never past the usable CPUs
    assert default_threads(tmp_path / "cpu.max") == min(2, usable)
    (tmp_path / "cpu.max").write_text("max 100000")
    assert default_threads(tmp_path / "cpu.max") == usable


def test_set_threads_resizes_torch_and_rejects_zero(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # restored after the test
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        with pytest.raises(ToolkitError, match="--threads must be at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
