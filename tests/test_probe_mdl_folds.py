"""MDL intervals (a bootstrap over episodes within the online code's blocks), the saved episode -> outer fold
assignment, and what the intervals describe (a probe trained on (K−1)/K of the episodes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.analysis.probe import ProbeConfig, Results, Selection, probe
from toolkit.analysis.probe.mdl import best_beta, code_bits, online_code
from toolkit.analysis.probe.select import plain
from toolkit.analysis.probe.splits import make_folds
from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import open_store

from test_probe import write_store

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_calibration as B  # noqa: E402


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Task signal at layer 6 only (layers 0, 3 and 9 are null), 40 episodes of 4 tasks."""
    return write_store(tmp_path_factory.mktemp("mdl") / "s.zarr", action=False)


def _reference_code(fold, labels, n_classes, held):
    """The online code as a plain loop: block 0 uniform, block 1 at β = 1, later blocks at the past's best β."""
    bits = (fold == 0).sum() * np.log2(n_classes)
    for i in range(1, fold.max() + 1):
        past = (fold >= 1) & (fold < i)
        beta = 1.0 if i == 1 else best_beta(held[past], labels[past])
        bits += code_bits(held[fold == i], labels[fold == i], beta)
    return bits


def test_online_code_point_estimate_and_its_interval():
    rng = np.random.default_rng(0)
    n_ep, steps, C = 40, 6, 4
    episode = np.repeat(rng.permutation(1000)[:n_ep], steps)  # arbitrary episode ids
    fold = np.repeat(np.arange(n_ep) % 5, steps)
    y = np.repeat(rng.integers(0, C, n_ep), steps)
    held = rng.standard_normal((len(y), C)) + 1.5 * np.eye(C)[y]
    code = online_code(fold, y, C, held, episode, seed=1)
    assert code["mdl_bits"] == pytest.approx(_reference_code(fold, y, C, held), rel=1e-9)
    assert code["uniform_bits"] == len(y) * np.log2(C) and code["compression"] > 1.2
    assert code["mdl_bits_ci_low"] < code["mdl_bits"] < code["mdl_bits_ci_high"]
    assert code["compression_ci_low"] < code["compression"] < code["compression_ci_high"]
    assert code["compression_ci_low"] == pytest.approx(code["uniform_bits"] / code["mdl_bits_ci_high"])  # equal rows
    assert code["mdl_draws"] == 2000 and len(code["mdl_betas"].split(",")) == 4
    assert online_code(fold, y, C, held, episode, seed=1) == code  # seeded
    # the interval is over episodes, not rows: steps of one episode are not independent draws
    by_row = online_code(fold, y, C, held, None, seed=1)
    assert by_row["mdl_bits"] == code["mdl_bits"]
    assert "mdl_bits_ci_low" in by_row and online_code(fold, y, C, held, episode, n_draws=0)["mdl_draws"] == 0


def test_the_block_bootstrap_has_its_stated_coverage():
    """A small version of bench_calibration.mdl_calibration: the interval covers the code length of the same
    prefix probes on fresh episodes (a large re-sample, 100 per set) in about 95 % of 30 simulated data sets
    (93 % of 300 in the benchmark)."""
    rng = np.random.default_rng(3)
    means = B.world(B.SIGNAL[16])
    inside, sets = 0, 30
    for s in range(sets):
        x, episode, task = B.episodes(means, 16, 1, rng)
        code, probes, folds = B.mdl_in_memory(x[:, 0], episode, task, seed=s)
        truth = B.conditional_bits(means, folds, probes, code["mdl_betas"], rng, reps=100)
        inside += code["mdl_bits_ci_low"] <= truth <= code["mdl_bits_ci_high"]
    assert inside / sets >= 0.83


def test_compression_interval_above_1_on_a_planted_signal_and_covering_1_or_below_on_null_layers(store_path):
    rows = probe(store_path, Selection(site="vlm"), ["task"], ProbeConfig(success=False, save_weights="none")).rows
    by_layer = {r["layer"]: r for r in rows}
    signal = by_layer[6]
    assert signal["compression"] > 1.5 and signal["compression_ci_low"] > 1
    assert signal["mdl_bits_ci_low"] <= signal["mdl_bits"] <= signal["mdl_bits_ci_high"]
    for layer in (0, 3, 9):
        r = by_layer[layer]
        assert 0.9 < r["compression"] < 1.1 and r["compression_ci_low"] <= 1, (layer, r["compression_ci_low"])
        assert r["compression_ci_low"] <= r["compression"] <= r["compression_ci_high"]


def test_fold_assignment_is_saved_and_reproduces_the_engines_folds(store_path, tmp_path):
    cfg = ProbeConfig(seed=3, mdl=False, success=False, save_weights="none")
    res = probe(store_path, Selection(site="vlm", layers="6"), ["task"], cfg)
    res.save(tmp_path / "r")
    assert (tmp_path / "r" / "folds.csv").exists()
    loaded = Results.load(tmp_path / "r")
    assert loaded.folds == res.folds
    saved = loaded.fold_of("vlm", "task", "episodes")
    store = open_store(store_path)
    keys, ep, task = plain(store.coord("episode_key")).astype(str), store.coord("episode"), plain(store.coord("task"))
    assert set(saved) == set(keys) and len(saved) == 40  # every episode, each in exactly one outer fold
    assert sorted(f["episode_key"] for f in loaded.folds) == sorted(saved)
    assert set(saved.values()) == set(range(5)) and {f["n_folds"] for f in loaded.folds} == {5}
    engine = make_folds("episodes", ep.astype(np.int64), task.astype(str), 5, 3)  # what the engine dealt
    assert all(saved[k] == f for k, f in zip(keys, engine.fold))
    assert sum(f["rows"] for f in loaded.folds) == store.n_samples
    again = probe(store_path, Selection(site="vlm", layers="6"), ["task"], cfg)
    assert again.folds == res.folds  # same seed, same assignment
    other = probe(store_path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(seed=4, mdl=False,
                                                                                        success=False))
    assert [f["fold"] for f in other.folds] != [f["fold"] for f in res.folds]
    with pytest.raises(ToolkitError, match="no fold assignment") as e:
        loaded.fold_of("vlm", "task", "tasks")
    assert "\n" not in str(e.value)


def test_a_steps_split_records_every_fold_an_episode_spans(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6"), ["task"],
                ProbeConfig(splits=("steps",), mdl=False, success=False, save_weights="none"))
    assert len(res.folds) > 40 and sum(f["rows"] for f in res.folds) == open_store(store_path).n_samples
    with pytest.raises(ToolkitError, match="spans several folds"):
        res.fold_of("vlm", "task", "steps")


def test_the_report_and_table_say_what_the_intervals_describe(store_path, tmp_path):
    from toolkit.analysis.probe.report import write_report

    res = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], ProbeConfig(success=False))
    assert "(K−1)/K" in res.table().attrs["intervals"] and "4/5" in res.table().attrs["intervals"]
    assert "4/5" in repr(res)
    res.save(tmp_path / "r")
    write_report(tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    for text in (md, html):
        assert "trained on (K−1)/K of the episodes (4/5; K = 5 outer folds)" in text
        assert "online code (bits)" in text and "bootstrap over episodes within the blocks" in text
    row6 = next(r for r in res.rows if r["layer"] == 6)
    assert f"{row6['compression']:.3f}" in md and f"{row6['compression_ci_low']:.3f}" in md
