"""Controls you can read, chance from the training folds, and the run's corrected "above chance" decisions.

Stores here are simulated like rollouts (per-episode nuisance offsets, so the steps of an episode are correlated)
with a per-episode binary ``label`` field at a chosen rate, a planted label signal and a planted task signal
(which makes the (task, progress) control types learnable).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from toolkit.analysis.probe import ProbeConfig, Results, Selection, probe
from toolkit.analysis.probe import metrics as M
from toolkit.analysis.probe.control import control_target, control_targets, input_type
from toolkit.analysis.probe.intervals import adjust_pvalues, proportion_p
from toolkit.run.layout import COORDINATES
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.targets import TargetData
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter

FAST = dict(mdl=False, success=False, save_weights="none")


def write_store(path: Path, n_tasks=4, eps_per_task=10, steps=8, d=16, layers=1, signal=0.0, rate=0.2,
                task_signal=0.0, offset=1.0, seed=0) -> Path:
    """``layers`` independent replicates; ``label`` = 1 for round(rate × episodes) random episodes, planted along
    one direction with strength ``signal``; each task's own mean × ``task_signal``."""
    rng = np.random.default_rng(seed)
    n_ep = n_tasks * eps_per_task
    ep_task = rng.permutation(np.repeat(np.arange(n_tasks), eps_per_task))
    ep_label = np.zeros(n_ep, np.int8)
    ep_label[rng.permutation(n_ep)[:round(rate * n_ep)]] = 1
    episode = np.repeat(np.arange(n_ep), steps)
    task, label = ep_task[episode], ep_label[episode]
    x = rng.standard_normal((len(episode), layers, d)).astype(np.float32)
    x += offset * rng.standard_normal((n_ep, layers, d)).astype(np.float32)[episode]
    u = rng.standard_normal(d).astype(np.float32)
    x += (signal * (label - rate))[:, None, None] * (u / np.linalg.norm(u))
    x += task_signal * rng.standard_normal((n_tasks, d)).astype(np.float32)[task][:, None, :]
    fields = {"episode": episode.astype(np.int32), "step": np.tile(np.arange(steps), n_ep).astype(np.int32),
              "task": np.array([f"task {t}" for t in task], dtype=object), "task_id": task.astype(np.int32),
              "success": label.astype(np.int8), "label": label.astype(np.int8),
              "episode_key": np.array([f"e{e}" for e in episode], dtype=object)}
    specs = [ArraySpec("vlm/resid_post", (layers, 1, d), "float32", ("layer", "token", "feature"),
                       chunk_inner=(1, 1, d))]
    specs += [ArraySpec(k, (), "str" if v.dtype == object else str(v.dtype), ()) for k, v in fields.items()]
    static = {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32)),
              "vlm/token": (("token",), np.array([-1], np.int32))}
    w = StoreWriter(path, mode="overwrite", codec="none")
    w.initialize({"model": {"name": "simulated", "checkpoint": None, "random_init": False}}, specs, static,
                 COORDINATES, chunk_samples=4096)
    w.append({"vlm/resid_post": x[:, :, None, :], **fields})
    w.close()
    return path


# ----------------------------------------------------------------------------- controls


def test_control_draws_keep_the_target_label_frequencies():
    """Each draw gives every (task, progress) type one label; the rows' label counts stay the real ones (to a
    type's rows at each boundary), draws differ, embeddings stay among the allowed candidates, values are real."""
    rng = np.random.default_rng(0)
    task = np.repeat(np.arange(8), 40)
    progress = np.tile(np.arange(40) / 39, 8)
    types = input_type(task, progress)  # 32 types of 10 rows
    classes = (rng.random(len(task)) < 0.2).astype(np.int64)  # 80/20, varying inside types
    d = TargetData(kind="classification", classes=classes, class_names=["a", "b"])
    draws = control_targets(d, types, seed=3, n=5)
    for c in draws:
        assert all(len(np.unique(c.classes[types == t])) == 1 for t in np.unique(types))  # one label per type
        assert abs(np.mean(c.classes == 1) - np.mean(classes == 1)) <= 10 / len(task) + 1e-9  # one type's rows
    assert len({c.classes.tobytes() for c in draws}) == 5
    assert np.array_equal(control_target(d, types, 3, draw=2).classes, draws[2].classes)  # seeded
    # embedding under held-out tasks: each type's instruction among the candidates its rows compete on
    cand = rng.standard_normal((8, 4)).astype(np.float32)
    e = TargetData(kind="embedding", y=cand[task], index=task, candidates=cand, candidate_names=list("abcdefgh"))
    fold = task % 4
    choices = {int(t): np.unique(task[fold == fold[np.flatnonzero(types == t)[0]]]) for t in np.unique(types)}
    c = control_target(e, types, 0, choices)
    assert all(np.isin(c.index[types == t], choices[t]).all() for t in np.unique(types))
    assert np.allclose(c.y, cand[c.index])
    # regression: a real row's value per type (the real marginal distribution, not a normal draw)
    y = rng.exponential(size=(len(task), 1)).astype(np.float32)
    r = control_target(TargetData(kind="regression", y=y), types, 0)
    assert np.isin(r.y, y).all() and all(len(np.unique(r.y[types == t])) == 1 for t in np.unique(types))


def test_selectivity_keeps_its_sign_across_seeds_with_a_planted_signal(tmp_path):
    """An 80/20 label planted in a layer that also encodes the task (so the control is learnable): the old
    uniform control drew label frequencies near 50/50 per seed (its control accuracy ranged 0.54–0.93 over 10
    seeds on this store, and selectivity changed sign on a weaker one); now the draws keep 80/20, sit at their
    own majority floor, and selectivity is positive at every seed."""
    path = write_store(tmp_path / "p.zarr", signal=6.0, task_signal=2.0, seed=3)
    rows = [probe(path, Selection(site="vlm"), ["field:label"], ProbeConfig(seed=s, **FAST)).rows[0] for s in range(5)]
    for r in rows:
        assert r["n_controls"] == 5 and len(r["control_draws"].split(",")) == 5
        assert r["selectivity"] > 0, [(x["metric"], x["control"], x["selectivity"]) for x in rows]
        assert r["selectivity_ci_low"] <= r["selectivity"] <= r["selectivity_ci_high"]
        assert abs(r["control_chance"] - r["chance"]) < 0.03  # the control's own floor is the target's
        assert r["control"] < 0.87 < r["metric"]
    controls = [r["control"] for r in rows]
    assert max(controls) - min(controls) < 0.1


def test_selectivity_on_a_null_store_is_centred_on_zero(tmp_path):
    sel, covered = [], 0
    for s in range(4):
        path = write_store(tmp_path / f"n{s}.zarr", layers=4, seed=10 + s)
        for r in probe(path, Selection(site="vlm"), ["task"], ProbeConfig(seed=s, n_controls=3, **FAST)).rows:
            sel.append(r["selectivity"])
            covered += r["selectivity_ci_low"] <= 0 <= r["selectivity_ci_high"]
            assert abs(r["control_chance"] - r["chance"]) < 0.03 and r["n_controls"] == 3
    assert abs(np.mean(sel)) < 0.03, sel
    assert covered / len(sel) >= 0.85, (covered, len(sel))  # no task is learnable: neither is the control


def test_n_controls_and_correction_are_checked(tmp_path):
    path = write_store(tmp_path / "e.zarr", eps_per_task=3, steps=2)
    for cfg, msg in ((ProbeConfig(n_controls=0), "n_controls"), (ProbeConfig(correction="bonferroni"), "--correction"),
                     (ProbeConfig(alpha=1.5), "alpha")):
        with pytest.raises(ToolkitError, match=msg) as e:
            probe(path, Selection(site="vlm"), ["task"], cfg)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- chance


def test_chance_is_the_training_folds_majority_rate():
    fold = np.repeat(np.arange(3), 4)
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1])  # folds: 3/1, 1/3, 2/2
    # training of fold 0: 3 zeros, 5 ones -> 5/8; fold 1: 5/3 -> 5/8; fold 2: 4/4 -> 1/2
    assert M.train_majority(y, fold) == pytest.approx((4 * 5 / 8 + 4 * 5 / 8 + 4 * 0.5) / 12)
    assert M.train_majority(np.repeat(np.arange(4), 5), np.tile(np.arange(5), 4)) == pytest.approx(0.25)


def test_an_imbalanced_null_store_is_not_above_chance(tmp_path):
    """80/20 labels, no signal: accuracy sits at (or under) the training folds' majority rate, which is the
    chance the row reports (1/C = 0.5 is the balanced-accuracy chance), and no cell is significant."""
    for s in range(3):
        path = write_store(tmp_path / f"i{s}.zarr", layers=3, task_signal=1.0, seed=20 + s)
        for r in probe(path, Selection(site="vlm"), ["field:label"], ProbeConfig(seed=s, **FAST)).rows:
            assert r["chance"] == pytest.approx(0.8, abs=0.02) and r["balanced_chance"] == 0.5
            assert r["metric"] <= max(r["chance"], r["majority"]) + 1e-9, r
            assert r["balanced_accuracy"] < 0.56 and r["p_value"] >= 0.4 and not r["significant"]


def test_intercepts_take_the_selections_class_proportions(tmp_path):
    """The ridge probe's out-of-fold predictions are scikit-learn's Ridge fitted on the training folds with the
    intercept moved to the whole selection's class proportions: the same confusion matrix, not the one of the
    training folds' own intercepts, which at 4 episodes per task and 5 folds put a strongly regularised
    label-blind probe under 1/4 (a test fold's tasks are those its training folds under-represent)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import confusion_matrix
    from sklearn.preprocessing import StandardScaler
    from toolkit.analysis.probe.select import plain
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.store.reader import open_store

    path = write_store(tmp_path / "b.zarr", eps_per_task=4, seed=5)
    lam = 10.0
    res = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(lambdas=(lam,), n_controls=1, **FAST))
    row = res.rows[0]
    store = open_store(path)
    X = store.read("vlm.layers.0.resid_post")[:, 0].astype(np.float64)
    task = plain(store.coord("task")).astype(str)
    folds = make_folds("episodes", np.asarray(store.coord("episode")), task, 5, 0)
    y = np.unique(task, return_inverse=True)[1]
    Y = np.eye(4)[y]
    train, whole = np.empty(len(y), dtype=int), np.empty(len(y), dtype=int)
    for k in range(folds.n_folds):
        tr, te = folds.train(k), folds.test(k)
        sc = StandardScaler().fit(X[tr])
        P = Ridge(alpha=lam * tr.sum()).fit(sc.transform(X[tr]), Y[tr]).predict(sc.transform(X[te]))
        train[te], whole[te] = P.argmax(1), (P - Y[tr].mean(0) + Y.mean(0)).argmax(1)
    cm = np.array(res.details[row["id"]]["confusion"])
    assert (cm == confusion_matrix(y, whole)).all() and not (cm == confusion_matrix(y, train)).all()
    assert row["accuracy"] == pytest.approx(np.mean(whole == y)) and np.mean(train == y) < np.mean(whole == y)
    assert not row["significant"]


def test_classification_extras_equal_scikit_learn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    for i in range(50):
        n = int(rng.integers(2, 6))
        true = rng.integers(0, n, 40)
        pred = true.copy() if i % 5 == 0 else rng.integers(0, n, 40)
        pred[: i % 3] = true[0]
        s = M.classification_summary(pred, true, np.arange(40) // 4, np.arange(40) % 4, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
            ba = skm.balanced_accuracy_score(true, pred)
        f1 = skm.f1_score(true, pred, labels=np.unique(true), average="macro", zero_division=0)
        assert s["balanced_accuracy"] == pytest.approx(ba, abs=1e-12) and s["macro_f1"] == pytest.approx(f1, abs=1e-12)
        assert (M.confusion(pred, true, n) == skm.confusion_matrix(true, pred, labels=np.arange(n))).all()


# ----------------------------------------------------------------------------- multiplicity


def _holm(p):
    """Holm's step-down, written out: reject in order while p_(i) ≤ α/(m − i + 1); adjusted p by its definition."""
    p = list(p)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _bh(p):
    p = list(p)
    m = len(p)
    out = [0.0] * m
    for i in range(m):  # adjusted p_i = min over the p's at least as large of m·p_j / rank_j
        ranks = sorted(p)
        out[i] = min(min(1.0, m * ranks[j] / (j + 1)) for j in range(m) if ranks[j] >= p[i])
    return out


@pytest.mark.parametrize("p", [
    [0.01, 0.04, 0.03, 0.005, 0.5, 0.2],
    [0.02, 0.02, 0.02, 0.9],  # ties
    [0.0001],
    list(np.random.default_rng(7).uniform(0, 0.1, 40)),
])
def test_holm_and_bh_equal_a_direct_implementation(p):
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:  # not a dependency: the hand-written references above
        holm, bh = _holm(p), _bh(p)
    else:
        holm, bh = multipletests(p, method="holm")[1], multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), holm, rtol=1e-12)
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), bh, rtol=1e-12)
    np.testing.assert_allclose(adjust_pvalues(p, "none"), p)
    with_nan = adjust_pvalues(list(p) + [np.nan], "holm")
    assert np.isnan(with_nan[-1]) and np.allclose(with_nan[:-1], holm)  # NaN is no test: m unchanged


def test_the_family_is_the_whole_run_and_old_results_still_load(tmp_path):
    mk = lambda i, p: {"id": i, "site": "vlm", "target": "task", "p_value": p, "warnings": ""}  # noqa: E731
    a = Results(rows=[mk(0, 0.01), mk(1, 0.03)], meta={"config": {"correction": "holm", "alpha": 0.05}})
    a.correct()
    assert [r["p_adjusted"] for r in a.rows] == pytest.approx([0.02, 0.03]) and all(r["significant"] for r in a.rows)
    b = Results(rows=[mk(0, 0.02), mk(1, 0.5)], meta=dict(a.meta))
    a.extend(b)  # a second site of the same run: four tests now
    assert [r["p_adjusted"] for r in a.rows] == pytest.approx([0.04, 0.06, 0.06, 0.5])
    assert [r["significant"] for r in a.rows] == [True, False, False, False]
    assert a.meta["multiplicity"]["n_tests"] == 4 and a.meta["multiplicity"]["correction"] == "holm"
    a.correct("bh")
    assert [r["p_adjusted"] for r in a.rows] == pytest.approx([0.04, 0.04, 0.04, 0.5])
    # results written before: "flagged" meant "has warnings"; it loads as has_warnings, nothing claims a test
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"meta": {"config": {}}, "rows": [
        {"id": 0, "site": "vlm", "target": "task", "warnings": "λ at the grid edge in 1 of 5 folds",
         "flagged": True}]}))
    row = Results.load(old).rows[0]
    assert row["has_warnings"] is True and "flagged" not in row and "significant" not in row


def test_cli_correction_option_and_report(tmp_path):
    from click.testing import CliRunner
    from toolkit.analysis.probe.report import write_report
    from toolkit.cli import cli

    path = write_store(tmp_path / "c.zarr", layers=3, signal=6.0, task_signal=2.0, seed=3)
    out = tmp_path / "res"
    r = CliRunner().invoke(cli, ["probe", str(path), "--target", "field:label", "--correction", "bh", "--no-mdl",
                                 "--no-success", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "Benjamini–Hochberg over all 3 tests" in r.output
    res = Results.load(out)
    assert res.meta["multiplicity"] == {**res.meta["multiplicity"], "correction": "bh", "n_tests": 3}
    for row in res.rows:
        assert {"p_value", "p_adjusted", "significant", "has_warnings", "control_chance"} <= set(row)
        assert "flagged" not in row
    bad = CliRunner().invoke(cli, ["probe", str(path), "--correction", "bonferroni", "--out", str(out)])
    assert bad.exit_code != 0 and "bonferroni" in bad.output
    write_report(out)
    md = (out / "report.md").read_text()
    assert "Benjamini–Hochberg over all 3 tests" in md and "control_chance" in md


# ----------------------------------------------------------------------------- false positives


def test_the_score_test_is_calibrated_in_its_tail():
    """Label-blind hits at chance with episode-correlated steps (each episode's own rate ~ Beta around 0.25):
    the one-sided p rejects at most about 5 % at 0.05 (3.2 % here: the variance at the null holds the episodes'
    spread) and is not anti-conservative in the tail Holm uses (0.07 % at 0.005)."""
    rng = np.random.default_rng(0)
    g, steps, n = 40, 8, 6000
    episode = np.repeat(np.arange(g), steps)
    p = np.empty(n)
    for i in range(n):
        rate = rng.beta(2.0, 6.0, g)  # mean 0.25
        p[i] = proportion_p(episode, (rng.random(g * steps) < rate[episode]).astype(np.float64), 0.25)
    assert np.mean(p < 0.05) <= 0.065 and np.mean(p < 0.005) <= 0.0085, (np.mean(p < 0.05), np.mean(p < 0.005))
    assert np.mean(p < 0.05) >= 0.02  # not vacuous either


def _null_sweeps(tmp_path, n_sweeps, seed0=0):
    """Per sweep: a fresh null store (24 layers = 24 cells, 4 tasks × 10 episodes) probed in the cheapest honest
    config; returns, per sweep, the raw p-values and the run's Holm and BH decisions."""
    out = []
    for s in range(seed0, seed0 + n_sweeps):
        path = write_store(tmp_path / f"f{s}.zarr", layers=24, d=8, steps=4, seed=1000 + s)
        rows = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(seed=s, n_controls=1, **FAST)).rows
        p = np.array([r["p_value"] for r in rows])
        out.append((p, np.array([r["significant"] for r in rows]), adjust_pvalues(p, "bh") <= 0.05))
    return out


def test_holm_keeps_the_family_wise_error_on_null_sweeps(tmp_path):
    """A quick look (12 null sweeps of 24 cells): uncorrected, most sweeps show a "significant" cell; with Holm
    (the default) at most one does.  The error rate itself is the slow test's (100 sweeps)."""
    sweeps = _null_sweeps(tmp_path, 12)
    raw = np.concatenate([p for p, _, _ in sweeps])
    assert np.mean(raw < 0.05) <= 0.09  # a sanity bound (7.3 % of these 288 cells; 6.0 % of the slow test's 2,400)
    assert np.mean([(p < 0.05).any() for p, _, _ in sweeps]) >= 0.3  # why a correction is needed
    assert sum(sig.any() for _, sig, _ in sweeps) <= 1


@pytest.mark.slow
def test_holm_and_bh_error_rates_over_many_null_sweeps(tmp_path):
    """100 null sweeps of 24 cells (about a minute): the share of sweeps with any cell significant after Holm
    is at most 5 %, and so is BH's (every hypothesis null: the false discovery rate is the family-wise rate)."""
    sweeps = _null_sweeps(tmp_path, 100, seed0=100)
    raw = np.concatenate([p for p, _, _ in sweeps])
    holm = np.mean([sig.any() for _, sig, _ in sweeps])
    bh = np.mean([b.any() for _, _, b in sweeps])
    uncorrected = np.mean([(p < 0.05).any() for p, _, _ in sweeps])
    assert holm <= 0.05 and bh <= 0.05, (holm, bh, uncorrected, np.mean(raw < 0.05))
    assert uncorrected >= 0.3
