"""Probe confidence vs episode success: found where planted, not found in a null store, calibrated, reported."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_probe import write_store
from toolkit.analysis.probe import ProbeConfig, Results, Selection, probe
from toolkit.analysis.probe.success import episode_confidence, success_correlation

FAST = dict(mdl=False)


def test_confidence_tracks_success_where_failed_episodes_carry_a_weaker_signal(tmp_path):
    path = write_store(tmp_path / "s.zarr", failed_signal=0.2, action=False)
    res = probe(path, Selection(site="vlm", layers="0,6"), ["task"], ProbeConfig(**FAST))
    rows = {r["layer"]: r for r in res.success}
    six = rows[6]
    assert six["n_success"] == 26 and six["n_failure"] == 14 and six["confidence"] == "true-class score"
    assert six["r"] > 0.5 and six["r_ci_low"] > 0.2 and six["p_value"] < 0.01
    assert six["conf_success"] > six["conf_failure"]
    assert rows[0]["p_value"] > 0.01  # no signal at layer 0: nothing to be confident about


def test_null_store_gives_no_correlation(tmp_path):
    path = write_store(tmp_path / "n.zarr", action=False)
    res = probe(path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(**FAST))
    (row,) = res.success
    assert row["p_value"] > 0.05 and row["r_ci_low"] < 0 < row["r_ci_high"]


def test_permutation_p_is_exact_for_few_episodes_and_the_test_is_calibrated():
    conf, succ = np.arange(6.0), np.array([0, 0, 0, 1, 1, 1.0])
    out = success_correlation(conf, succ)
    assert out["p_exact"] and out["n_permutations"] == 20 and out["p_value"] == pytest.approx(2 / 20)
    rng = np.random.default_rng(0)  # null: 300 stores of 30 episodes; 5 % false positives, ≥ 93 % coverage of 0
    outs = [success_correlation(rng.standard_normal(30), (rng.random(30) < 0.4).astype(float), n_boot=400,
                                n_perm=400, seed=i) for i in range(300)]
    outs = [o for o in outs if np.isfinite(o["r"])]
    reject = np.mean([o["p_value"] < 0.05 for o in outs])
    cover = np.mean([o["r_ci_low"] <= 0 <= o["r_ci_high"] for o in outs])
    assert 0.02 <= reject <= 0.09 and cover >= 0.92
    assert np.isnan(success_correlation(conf, np.array([0, 1, 1, 1, 1, 1.0]))["r"])  # one failure: no test


def test_unknown_outcomes_are_left_out():
    conf, succ = episode_confidence(np.array([0, 0, 1, 1, 2]), np.array([1.0, 3, 5, 5, 9]), np.array([1, 1, 0, 0, -1]))
    assert conf.tolist() == [2.0, 5.0] and succ.tolist() == [1.0, 0.0]


def test_cli_success_option_figures_and_report(tmp_path):
    from toolkit.cli import cli

    path = write_store(tmp_path / "s.zarr", failed_signal=0.2)
    out = tmp_path / "res"
    r = CliRunner().invoke(cli, ["probe", str(path), "--layers", "3,6", "--step-buckets", "6", "--no-mdl",
                                           "--out", str(out), "--no-progress", "--report"])
    assert r.exit_code == 0, r.output
    loaded = Results.load(out)
    assert (out / "success.csv").read_text().startswith("site,layer,t,step,target")  # the lead columns first
    assert {(s["site"], s["step"]) for s in loaded.success} == {(s, b) for s in ("vlm", "action")
                                                              for b in ("0-5", "6-11")}
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"success_vlm_task_episodes_ridge.png", "success_action_task_episodes_ridge.png",
            "denoise_action_task_episodes_ridge.png", "retention_vlm_task_episodes_ridge.png"} <= figs
    assert "denoise_vlm_task_episodes_ridge.png" not in figs  # the VLM has no denoising axis
    md = (out / "report.md").read_text()
    assert "vs episode success at layer 6" in md and "permutation p" in md
    off = CliRunner().invoke(cli, ["probe", str(path), "--site", "vlm", "--layers", "6", "--no-mdl", "--no-success",
                                             "--out", str(tmp_path / "off"), "--no-progress"])
    assert off.exit_code == 0, off.output
    assert Results.load(tmp_path / "off").success == []
