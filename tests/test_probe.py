"""The probe engine: planted signals are found where planted, numbers agree with scikit-learn, splits are honest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.sdk.errors import ToolkitError
from toolkit.run.layout import COORDINATES
from toolkit.analysis.probe import ProbeConfig, Results, Selection, probe
from toolkit.analysis.probe.select import plain, resolve
from toolkit.analysis.probe.splits import make_folds
from toolkit.analysis.probe.stats import iter_blocks
from toolkit.store.layout import ArraySpec
from toolkit.store.reader import open_store
from toolkit.store.writer import StoreWriter

INSTRUCTIONS = ["put the bowl on the plate", "open the top drawer", "turn on the stove", "pick up the black bowl",
                "push the plate to the front", "put the cream cheese in the bowl"]


def write_store(path, n_tasks=4, eps_per_task=10, steps=12, layers=(0, 3, 6, 9), d=24, tokens=2, signal_layer=6,
                signal=1.5, episode_noise=1.0, denoise_t=(1.0, 0.5), seed=0, chunk_samples=64, action=True,
                codec="zstd", bf16=False, random_init=False, resid_pre=False,
                failed_signal=1.0, nan_sample=None):
    """A store with a task signal planted at one layer only, a per-episode offset everywhere, and an action
    expert whose task signal grows as t falls (strongest at the last denoising step).  Episodes fail when
    ``episode % 3 == 0``; their planted signal is scaled by ``failed_signal``."""
    rng = np.random.default_rng(seed)
    n_ep = n_tasks * eps_per_task
    n = n_ep * steps
    L, S = len(layers), len(denoise_t)
    class_means = rng.standard_normal((n_tasks, d)).astype(np.float32)
    ep_offsets = rng.standard_normal((n_ep, d)).astype(np.float32) * episode_noise
    ep_task = np.repeat(np.arange(n_tasks), eps_per_task)[rng.permutation(n_ep)]
    episode = np.repeat(np.arange(n_ep), steps).astype(np.int32)
    task_id = ep_task[episode].astype(np.int32)
    step = np.tile(np.arange(steps), n_ep).astype(np.int32)
    vlm = rng.standard_normal((n, L, tokens, d)).astype(np.float32) + ep_offsets[episode][:, None, None] + 5.0
    strength = np.where(episode % 3 != 0, 1.0, failed_signal).astype(np.float32)[:, None, None]
    vlm[:, layers.index(signal_layer)] += signal * strength * class_means[task_id][:, None]
    if nan_sample is not None:  # one activation the model returned as NaN, at every layer of that sample
        vlm[nan_sample, :, 0, 0] = np.nan
    act = rng.standard_normal((n, L, S, 1, d)).astype(np.float32) + ep_offsets[episode][:, None, None, None]
    for s in range(S):
        act[:, :, s] += (s + 1) / S * signal * class_means[task_id][:, None, None]
    fields = {
        "episode": episode, "step": step,
        "task": np.array([f"task_{t}" for t in task_id], dtype=object), "task_id": task_id,
        "success": (episode % 3 != 0).astype(np.int8),
        "episode_key": np.array([f"ep{e}" for e in episode], dtype=object),
        "instruction": np.array([INSTRUCTIONS[t % len(INSTRUCTIONS)] for t in task_id], dtype=object),
        "dataset_action": (class_means[task_id][:, :7] + 0.1 * rng.standard_normal((n, 7))).astype(np.float32),
    }
    specs = [ArraySpec("vlm/resid_post", (L, tokens, d), "uint16" if bf16 else "float32", ("layer", "token", "feature"),
                       "bfloat16" if bf16 else None, chunk_inner=(1, tokens, d))]
    if bf16:  # the 16-bit pattern of bfloat16, as extraction stores it
        vlm = (vlm.view(np.uint32) >> 16).astype(np.uint16)
    static = {"vlm/layer": (("layer",), np.array(layers, np.int32)),
              "vlm/token": (("token",), np.arange(tokens, dtype=np.int32))}
    arrays = {"vlm/resid_post": vlm}
    if resid_pre:  # layer inputs: at layer 0 the input embeddings, here carrying no task signal
        specs.append(ArraySpec("vlm/resid_pre", (L, tokens, d), "float32", ("layer", "token", "feature"),
                               chunk_inner=(1, tokens, d)))
        arrays["vlm/resid_pre"] = rng.standard_normal((n, L, tokens, d)).astype(np.float32)
    if action:
        specs.append(ArraySpec("action/resid_post", (L, S, 1, d), "float32", ("layer", "denoise", "token", "feature"),
                               chunk_inner=(1, S, 1, d)))
        static.update({"action/layer": (("layer",), np.array(layers, np.int32)),
                       "action/token": (("token",), np.array([-1], np.int32)),
                       "action/denoise": (("denoise",), np.arange(S, dtype=np.int32)),
                       "action/t": (("denoise",), np.array(denoise_t, np.float32))})
        arrays["action/resid_post"] = act
    for name, v in fields.items():
        dims = tuple(f"{name}_dim{i}" if i else f"{name}_dim" for i in range(v.ndim - 1))
        specs.append(ArraySpec(name, tuple(v.shape[1:]), "str" if v.dtype == object else str(v.dtype), dims))
    w = StoreWriter(path, mode="create", codec=codec)
    w.initialize({"model": {"name": "synthetic", "checkpoint": None, "random_init": random_init}}, specs, static, COORDINATES, chunk_samples=chunk_samples)
    w.root["vlm"].attrs.update({"expert": "vlm"})
    if action:
        w.root["action"].attrs.update({"expert": "action"})
    for a in range(0, n, 100):
        w.append({k: v[a:a + 100] for k, v in {**arrays, **fields}.items()})
    w.close()
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("probe") / "s.zarr")


FAST = dict(mdl=False)


def test_planted_signal_is_found_at_its_layer_only(store_path):
    res = probe(store_path, Selection(site="vlm"), ["task"], ProbeConfig())
    acc = {r["layer"]: r["metric"] for r in res.rows}
    assert max(acc, key=acc.get) == 6
    assert acc[6] > 0.9
    assert all(acc[k] < 0.6 for k in (0, 3, 9))
    best = next(r for r in res.rows if r["layer"] == 6)
    assert best["ci_low"] <= best["metric"] <= best["ci_high"]
    assert best["chance"] == 0.25 and best["n_test_episodes"] == 40  # every episode tested once
    assert best["selectivity"] <= 1 and best["compression"] > 1.5
    assert all(0.9 < r["compression"] < 1.1 for r in res.rows if r["layer"] != 6)  # null layers: the uniform code
    (sel,) = res.best  # chosen inside the outer folds, not on the test rows
    assert sel["layer"] == 6 and sel["layers_per_fold"] == "6,6,6,6,6" and sel["metric"] > 0.9


def _layer_rows(store_path, layer):
    store = open_store(store_path)
    r = resolve(store, Selection(site="vlm", layers=str(layer)))
    X = np.concatenate([x[:, 0] for _, x in iter_blocks(store, r, 0)])
    ep = store.coord("episode")[r.rows]
    task = plain(store.coord("task"))[r.rows]
    return X, ep, task


def test_ridge_matches_scikit_learn_on_the_same_folds(store_path):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    lam = 1e-2
    res = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"],
                ProbeConfig(lambdas=(lam,), save_weights="all", **FAST))
    X, ep, task = _layer_rows(store_path, 6)
    folds = make_folds("episodes", ep, task, 5, 0)
    names, y = np.unique(task, return_inverse=True)
    Y = np.eye(len(names))[y]
    pred = np.empty(len(y), dtype=int)
    for k in range(folds.n_folds):  # the same outer folds; the intercept from the training folds only
        tr, te = folds.train(k), folds.test(k)
        sc = StandardScaler().fit(X[tr].astype(np.float64))
        sk = Ridge(alpha=lam * tr.sum()).fit(sc.transform(X[tr]), Y[tr])
        pred[te] = sk.predict(sc.transform(X[te])).argmax(1)
    row = next(r for r in res.rows if r["layer"] == 6)
    assert abs(row["accuracy"] - np.mean(pred == y)) <= 0.01
    W, b, shift = res.weights[row["id"]]  # the saved probe: refitted on every episode
    sc = StandardScaler().fit(X.astype(np.float64))
    sk = Ridge(alpha=lam * len(X)).fit(sc.transform(X), Y)
    W_sk = sk.coef_.T / sc.scale_[:, None]
    assert np.linalg.norm(W - W_sk) / np.linalg.norm(W_sk) < 1e-4


def test_logistic_matches_scikit_learn_on_the_same_folds(store_path):
    from sklearn.linear_model import LogisticRegression
    from toolkit.analysis.probe.solvers import fit_logistic

    X, ep, task = _layer_rows(store_path, 6)
    folds = make_folds("episodes", ep, task, 5, 0)
    tr, te = folds.train(0), folds.test(0)
    _, y = np.unique(task, return_inverse=True)
    mu, sd = X[tr].mean(0), X[tr].std(0)
    z, zt = (X[tr] - mu) / sd, (X[te] - mu) / sd
    l2 = 1e-2
    W, b = fit_logistic(z, y[tr], 4, l2)
    sk = LogisticRegression(C=1 / (l2 * tr.sum()), max_iter=1000).fit(z, y[tr])
    assert abs(np.mean((zt @ W + b).argmax(1) == y[te]) - sk.score(zt, y[te])) <= 0.01
    res = probe(store_path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(solver="logistic", **FAST))
    row = res.rows[0]
    assert row["solver"] == "logistic" and row["metric"] > 0.9 and row["lambda"] in (1e-4, 1e-3, 1e-2, 1e-1)


def test_unsupported_solver_target_pairs_are_one_line_errors(store_path):
    for solver, target in (("logistic", "instruction"), ("cosine", "task"), ("logistic", "field:progress")):
        with pytest.raises(ToolkitError, match=f"--solver {solver} cannot fit") as e:
            probe(store_path, Selection(site="vlm", layers="6"), [target], ProbeConfig(solver=solver, **FAST))
        assert "\n" not in str(e.value)


def test_a_random_episode_label_is_at_chance_unless_split_by_step(tmp_path):
    path = write_store(tmp_path / "c.zarr", n_tasks=2, eps_per_task=24, steps=16, d=32, signal=0.0,
                       episode_noise=2.0, action=False, layers=(0,), signal_layer=0)
    honest = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(**FAST)).rows[0]
    leaky = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(splits=("steps",), **FAST)).rows[0]
    # the task label here is random per episode (no signal planted): only memorising episodes decodes it
    assert abs(honest["metric"] - 0.5) < 0.15 and honest["ci_low"] <= 0.5 <= honest["ci_high"]
    assert leaky["metric"] > 0.7


def test_the_control_task_is_learnable_when_its_type_is_encoded(tmp_path):
    """Control labels are a random function of (task, progress quartile): a layer encoding both learns them."""
    path = write_store(tmp_path / "t.zarr", n_tasks=3, eps_per_task=8, steps=16, d=24, signal=0.0, action=False,
                       layers=(0,), signal_layer=0, episode_noise=0.3)
    store = open_store(path)
    task_id = store.coord("task_id").astype(int)
    quarter = store.coord("step").astype(int) * 4 // 16
    x = np.zeros((store.n_samples, 1, 2, 24), np.float32)
    x[np.arange(len(x)), 0, :, task_id * 4 + quarter] = 3.0  # a one-hot code of the type
    typed = write_store(tmp_path / "typed.zarr", n_tasks=3, eps_per_task=8, steps=16, d=24, signal=0.0,
                        action=False, layers=(0,), signal_layer=0, episode_noise=0.3)
    import zarr

    arr = zarr.open_group(str(typed), mode="r+")["vlm/resid_post"]
    arr[:] = arr[:] * 0.3 + x
    row = probe(typed, Selection(site="vlm"), ["task"], ProbeConfig(**FAST)).rows[0]
    assert row["control"] > 0.8 and row["metric"] > 0.9  # learnable on held-out episodes
    assert row["selectivity"] == pytest.approx(row["metric"] - max(row["control"], row["majority"]))
    plain_row = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(**FAST)).rows[0]
    assert plain_row["control"] < 0.6  # not encoded: at chance


def test_intervals_are_calibrated_on_null_stores_and_never_collapse(tmp_path):
    """A fast version of benchmarks/bench_calibration.py (which measures 95 % ± 3 %): a loose bound."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_calibration as B

    excluded, n = 0, 0
    for s in range(6):
        path = B.write_store(tmp_path / f"n{s}.zarr", B.world(0.0), 4, 6, seed=s)
        for r in probe(path, Selection(site="vlm"), ["task"], ProbeConfig(seed=s, **FAST)).rows:
            excluded += not r["ci_low"] <= 0.25 <= r["ci_high"]
            n += 1
    assert excluded / n <= 0.15
    perfect = B.write_store(tmp_path / "p.zarr", B.world(5.0), 2, 1, seed=0)
    row = probe(perfect, Selection(site="vlm"), ["task"], ProbeConfig(**FAST)).rows[0]
    assert row["metric"] == 1.0 and 0.5 < row["ci_low"] < 0.95 and row["ci_high"] == 1.0
    assert "only 8 test episodes" in row["warnings"] and row["has_warnings"]


def test_baselines_random_weights_store_and_input_embeddings(tmp_path, store_path):
    a = write_store(tmp_path / "a.zarr", action=False, resid_pre=True, layers=(0, 6))
    rand = write_store(tmp_path / "r.zarr", action=False, resid_pre=True, layers=(0, 6), signal=0.0,
                       random_init=True)
    res = probe(a, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(baseline=str(rand), **FAST))
    row = res.rows[0]
    assert row["metric"] > 0.9 and row["baseline_random"] < 0.6 and row["baseline_embedding"] < 0.6
    assert row["selectivity_random"] > 0.3 and row["selectivity_embedding"] > 0.3
    assert row["baseline_random_ci_low"] <= row["baseline_random"] <= row["baseline_random_ci_high"]
    with pytest.raises(ToolkitError, match="random_init"):
        probe(a, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(baseline=str(store_path), **FAST))
    other = write_store(tmp_path / "o.zarr", action=False, layers=(0, 6), random_init=True, eps_per_task=5)
    with pytest.raises(ToolkitError, match="same samples"):
        probe(a, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(baseline=str(other), **FAST))


def test_results_are_identical_across_runs(store_path):
    cfg = ProbeConfig(mdl=True)
    a = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], cfg)
    b = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], cfg)
    assert json.dumps([a.rows, a.best], default=str) == json.dumps([b.rows, b.best], default=str)


def test_action_expert_denoising_selection_by_t(store_path):
    res = probe(store_path, Selection(site="action", layers="6", t="0.5"), ["task"], ProbeConfig(**FAST))
    (row,) = res.rows
    assert row["t"] == 0.5 and row["denoise"] == 1 and row["expert"] == "action"
    both = probe(store_path, Selection(site="action", layers="3"), ["task"], ProbeConfig(**FAST)).rows
    assert [r["t"] for r in both] == [1.0, 0.5]
    assert both[1]["metric"] >= both[0]["metric"]


def test_instruction_embedding_target_and_held_out_tasks(tmp_path):
    path = write_store(tmp_path / "i.zarr", n_tasks=6, eps_per_task=5, action=False)
    res = probe(path, Selection(site="vlm", layers="0,6"), ["instruction"], ProbeConfig(**FAST))
    rows = {(r["layer"], r["split"]): r for r in res.rows}
    assert {s for _, s in rows} == {"episodes", "tasks"}
    ep6 = rows[(6, "episodes")]
    assert ep6["metric"] > 0.9 > rows[(0, "episodes")]["metric"] and ep6["cosine"] > ep6["cosine_baseline"]
    assert ep6["lambda"] is not None and "similarity" in res.details[ep6["id"]]
    tasks = rows[(6, "tasks")]  # 3 folds of 2 held-out tasks: chance is 1/2, the control competes on the same
    assert tasks["chance"] == pytest.approx(0.5) and tasks["selectivity"] <= 1 - 0.5


def test_cosine_solver_reports_epochs_not_lambda(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6"), ["instruction"],
                ProbeConfig(solver="cosine", splits=("episodes",), **FAST))
    row = res.rows[0]
    assert row["solver"] == "cosine" and row["metric"] > 0.8 and row["lambda"] is None and row["epochs"] >= 1


def test_field_targets_take_an_explicit_kind(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6"),
                ["field:dataset_action[0]", "field:success", "field:step:regression", "field:step:classification",
                 "field:step"], ProbeConfig(**FAST))
    kinds = {r["target"]: r for r in res.rows}
    assert kinds["field:dataset_action[0]"]["kind"] == "regression" and kinds["field:dataset_action[0]"]["r2"] > 0.5
    assert kinds["field:success"]["kind"] == "classification"
    assert kinds["field:success"]["majority"] == pytest.approx(26 / 40, abs=0.01)  # 2 of 3 episodes succeed
    assert kinds["field:step:regression"]["kind"] == "regression" == kinds["field:step"]["kind"]
    assert kinds["field:step:classification"]["kind"] == "classification"
    assert all(r["selectivity"] <= 1 for r in res.rows)
    with pytest.raises(ToolkitError, match="unknown target kind"):
        probe(store_path, Selection(site="vlm", layers="6"), ["field:step:ordinal"], ProbeConfig(**FAST))


def test_step_buckets_and_ranges(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6", step_buckets="6", task_range=(0, 3),
                                      episode_range=(0, 8)), ["task"], ProbeConfig(**FAST))
    assert [r["step"] for r in res.rows] == ["0-5", "6-11"]
    assert all(r["balanced_chance"] == pytest.approx(1 / 3) for r in res.rows)
    assert all(1 / 3 <= r["chance"] < 0.4 for r in res.rows)  # the training folds' majority rate (24 episodes)
    one = probe(store_path, Selection(site="vlm", layers="6", steps="4"), ["task"], ProbeConfig(**FAST)).rows[0]
    assert one["step"] == "4" and one["n_test"] == one["n_test_episodes"]


@pytest.mark.parametrize("sel, target, message", [
    (Selection(site="nope"), "task", "sites: action, vlm"),
    (Selection(site="vlm", layers="4"), "task", "layer"),
    (Selection(site="action", t="0.7"), "task", "t values: 1, 0.5"),
    (Selection(site="vlm", steps="99"), "task", "rollout step 99 is out of range"),
    (Selection(site="vlm", task_range=(0, 1)), "task", "one task"),
    (Selection(site="vlm", task_range=(7, 9)), "task", "selects no sample"),
    (Selection(site="vlm", task_range=(0, 1), episode_range=(0, 2)), "field:success", "at least 3 folds"),
    (Selection(site="vlm"), "instruction:t5", "--encoder-path"),
    (Selection(site="vlm"), "nope", "known targets"),
])
def test_bad_input_is_one_clear_line(store_path, sel, target, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match=None) as e:
        probe(store_path, sel, [target], ProbeConfig(**FAST))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_probe_and_report(store_path, tmp_path):
    from toolkit.analysis.probe.results import load_direction
    from toolkit.cli import cli

    out = tmp_path / "res"
    r = CliRunner().invoke(cli, ["probe", str(store_path), "--layers", "3,6", "--out", str(out), "--no-progress",
                                 "--controls", "3", "--alpha", "0.01"])
    assert r.exit_code == 0, r.output
    assert "selected (inner-CV" in r.output
    assert "trained on 4/5 of the episodes" in r.output
    loaded = Results.load(out)
    assert loaded.meta["config"]["n_controls"] == 3 and loaded.meta["config"]["alpha"] == 0.01
    assert all(row["n_controls"] == 3 for row in loaded.rows if row.get("n_controls") is not None)
    assert {row["site"] for row in loaded.rows} == {"vlm", "action"}
    for col in ("metric", "ci_low", "ci_high", "control", "control_ci_low", "baseline_random", "baseline_embedding",
                "selectivity", "chance", "majority", "balanced_chance", "n_train_episodes", "n_test_episodes",
                "warnings", "has_warnings", "p_value", "p_adjusted", "significant", "mdl_bits", "compression"):
        assert col in loaded.rows[0]
    d = load_direction(out, "vlm", 6, "task")
    assert d.W.shape == (24, 4) and d.labels == ["task_0", "task_1", "task_2", "task_3"]
    with pytest.raises(ToolkitError, match="no saved probe"):
        load_direction(out, "vlm", 3, "task")
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "data:image/png;base64" in html and "synthetic" in md and "inner" in md
    old = CliRunner().invoke(cli, ["probe", "--store", str(store_path), "--site", "vlm", "--layer", "5"])
    assert old.exit_code != 0 and "layer" in old.output


@pytest.mark.parametrize("codec, bf16", [("none", False), ("blosc", True)])
def test_chunk_reader_matches_zarr(tmp_path, codec, bf16):
    path = write_store(tmp_path / "r.zarr", n_tasks=2, eps_per_task=3, steps=7, action=False, codec=codec, bf16=bf16,
                       chunk_samples=16)
    store = open_store(path)
    r = resolve(store, Selection(site="vlm", layers="6", steps="1-5", pool="none"))
    got = np.concatenate([x[:, 0] for _, x in iter_blocks(store, r, 0)])
    want = store.read("vlm", "resid_post", layer=6)[r.rows].reshape(len(r.rows), -1)
    np.testing.assert_array_equal(got, want)


def test_non_finite_activations_are_one_line_not_nan_weights(tmp_path):
    """A NaN in the selected rows would make every weight NaN (and the eigendecomposition used to raise LAPACK's
    own error): the probe names the layer and says how to find the samples, from the API and the CLI."""
    path = write_store(tmp_path / "nan.zarr", eps_per_task=3, nan_sample=5, action=False)
    with pytest.raises(ToolkitError, match=r"layer 6 holds non-finite activations .*toolkit stats"):
        probe(path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(**FAST))
    from toolkit.cli import cli

    res = CliRunner().invoke(cli, ["probe", str(path), "--layers", "6", "--out", str(tmp_path / "out"),
                                   "--no-progress"])
    assert res.exit_code != 0 and "layer 6 holds non-finite activations" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_held_out_tasks_needs_an_embedding_target(store_path):
    with pytest.raises(ToolkitError, match="embedding or regression target"):
        probe(store_path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(splits=("tasks",), **FAST))


def _nested(stats, shift, m, precision):
    from toolkit.analysis.probe.solvers import NestedRidge

    nr = NestedRidge(stats, {"t": np.arange(m)}, shift, prior=np.arange(m), precision=precision)
    return nr, [nr.outer(k)["t"] for k in range(len(stats))] + [nr.final()["t"]]


def test_float32_factorisation_with_refinement_equals_the_float64_reference(store_path):
    """The default solve (float32 eigh, float64 refinement) gives the float64 answers on a test store:
    the same λ per outer fold, the same inner-CV errors and weights to float tolerance, identical predictions."""
    from toolkit.analysis.probe.stats import FoldStats

    X, ep, task = _layer_rows(store_path, 6)
    folds = make_folds("episodes", ep, task, 5, 0)
    Y = np.eye(len(np.unique(task)), dtype=np.float32)[np.unique(task, return_inverse=True)[1]]
    fs = FoldStats(X.shape[1], Y.shape[1], 5)
    fs.add(X, Y, folds.fold)
    stats = fs.finish()
    ref_nr, ref = _nested(stats, fs.shift, Y.shape[1], "float64")
    nr, fits = _nested(stats, fs.shift, Y.shape[1], "float32")
    assert [f.lam for f in fits] == [f.lam for f in ref]
    for (sse, ss0), (sse_r, ss0_r) in zip(nr.inner, ref_nr.inner):
        np.testing.assert_allclose(sse, sse_r, rtol=1e-9)
    for f, r in zip(fits, ref):
        assert np.abs(f.model.W - r.model.W).max() <= 1e-9 * np.abs(r.model.W).max()
        assert (f.model.predict(X).argmax(1) == r.model.predict(X).argmax(1)).all()


def test_an_ill_conditioned_gram_falls_back_to_the_float64_solve():
    """Near-collinear features (cond × float32 epsilon > 1 at the smallest λ) defeat float32 refinement:
    the path refactorises in float64 and gives the float64 answers."""
    from toolkit.analysis.probe.solvers import LAMBDAS, RidgePath
    from toolkit.analysis.probe.stats import Stats

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((400, 1)) + 1e-3 * rng.standard_normal((400, 40))).astype(np.float32)
    Y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 400)] + X[:, :3] * 0.1
    s = Stats.zeros(40, 3)
    s.add(X, Y)
    path, ref = RidgePath(s), RidgePath(s, "float64")
    a = path.coefs(LAMBDAS)
    assert path.precision == "float64"  # switched
    np.testing.assert_allclose(a, ref.coefs(LAMBDAS), rtol=1e-10, atol=1e-12)
