"""The probe engine: planted signals are found where planted, numbers agree with scikit-learn, splits are honest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.errors import ToolkitError
from toolkit.extract import COORDINATES
from toolkit.probe import ProbeConfig, Results, Selection, probe
from toolkit.probe.select import plain, resolve
from toolkit.probe.splits import make_split
from toolkit.probe.stats import iter_blocks
from toolkit.store import ArraySpec, StoreWriter, open_store

INSTRUCTIONS = ["put the bowl on the plate", "open the top drawer", "turn on the stove", "pick up the black bowl",
                "push the plate to the front", "put the cream cheese in the bowl"]


def write_store(path, n_tasks=4, eps_per_task=10, steps=12, layers=(0, 3, 6, 9), d=24, tokens=2, signal_layer=6,
                signal=1.5, episode_noise=1.0, denoise_t=(1.0, 0.5), seed=0, chunk_samples=64, action=True,
                codec="zstd", bf16=False):
    """A store with a task signal planted at one layer only, a per-episode offset everywhere, and an action
    expert whose task signal grows as t falls (strongest at the last denoising step)."""
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
    vlm[:, layers.index(signal_layer)] += signal * class_means[task_id][:, None]
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
    w.initialize({"model": "synthetic"}, specs, static, COORDINATES, chunk_samples=chunk_samples)
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


FAST = dict(n_boot=200)


def test_planted_signal_is_found_at_its_layer_only(store_path):
    res = probe(store_path, Selection(site="vlm"), ["task"], ProbeConfig(**FAST))
    rows = [r for r in res.rows if r["target"] == "task"]
    acc = {r["layer"]: r["metric"] for r in rows}
    assert max(acc, key=acc.get) == 6
    assert acc[6] > 0.9
    assert all(acc[k] < 0.6 for k in (0, 3, 9))
    best = next(r for r in rows if r["layer"] == 6)
    assert best["ci_low"] <= best["metric"] <= best["ci_high"]
    assert best["selectivity"] > 0.5 and best["chance"] == 0.25


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
    res = probe(store_path, Selection(site="vlm", layers="6"), ["task"],
                ProbeConfig(lambdas=(lam,), save_weights="all", **FAST))
    row = next(r for r in res.rows if r["target"] == "task")
    W, b, shift = res.weights[row["id"]]
    X, ep, task = _layer_rows(store_path, 6)
    split = make_split("episodes", ep, task, 5, 0.2, 0)
    tr, te = ~split.is_test(), split.is_test()
    names, y = np.unique(task, return_inverse=True)
    Y = np.eye(len(names))[y]
    sc = StandardScaler().fit(X[tr].astype(np.float64))
    sk = Ridge(alpha=lam * tr.sum()).fit(sc.transform(X[tr]), Y[tr])
    W_sk = sk.coef_.T / sc.scale_[:, None]
    assert np.linalg.norm(W - W_sk) / np.linalg.norm(W_sk) < 1e-4
    pred_sk = sk.predict(sc.transform(X[te])).argmax(1)
    pred = ((X[te] - shift) @ W + b).argmax(1)
    assert abs(np.mean(pred == y[te]) - np.mean(pred_sk == y[te])) <= 0.01
    assert abs(row["accuracy"] - np.mean(pred_sk == y[te])) <= 0.01


def test_logistic_matches_scikit_learn_on_the_same_folds(store_path):
    from sklearn.linear_model import LogisticRegression
    from toolkit.probe.solvers import fit_logistic

    X, ep, task = _layer_rows(store_path, 6)
    split = make_split("episodes", ep, task, 5, 0.2, 0)
    tr, te = ~split.is_test(), split.is_test()
    _, y = np.unique(task, return_inverse=True)
    mu, sd = X[tr].mean(0), X[tr].std(0)
    z, zt = (X[tr] - mu) / sd, (X[te] - mu) / sd
    l2 = 1e-2
    W, b = fit_logistic(z, y[tr], 4, l2)
    sk = LogisticRegression(C=1 / (l2 * tr.sum()), max_iter=1000).fit(z, y[tr])
    assert abs(np.mean((zt @ W + b).argmax(1) == y[te]) - sk.score(zt, y[te])) <= 0.01
    res = probe(store_path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(solver="logistic", **FAST))
    assert res.rows[0]["solver"] == "logistic" and res.rows[0]["metric"] > 0.9


def test_random_episode_label_is_at_chance_unless_split_by_step(tmp_path):
    path = write_store(tmp_path / "c.zarr", n_tasks=2, eps_per_task=24, steps=16, d=32, signal=0.0,
                       episode_noise=2.0, action=False, layers=(0,), signal_layer=0)
    honest = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(**FAST)).rows[0]
    leaky = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(splits=("steps",), **FAST)).rows[0]
    # the task label here is random per episode (no signal planted): only memorising episodes decodes it
    assert abs(honest["metric"] - 0.5) < 0.15 and abs(honest["control"] - 0.5) < 0.15
    assert leaky["metric"] > 0.7 and leaky["control"] > 0.7


def test_results_are_identical_across_runs(store_path):
    cfg = ProbeConfig(**FAST)
    a = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], cfg).rows
    b = probe(store_path, Selection(site="vlm", layers="3,6"), ["task"], cfg).rows
    assert json.dumps(a, default=str) == json.dumps(b, default=str)


def test_action_expert_denoising_selection_by_t(store_path):
    res = probe(store_path, Selection(site="action", layers="6", t="0.5"), ["task"], ProbeConfig(**FAST))
    (row,) = res.rows
    assert row["t"] == 0.5 and row["denoise"] == 1 and row["expert"] == "action"
    both = probe(store_path, Selection(site="action", layers="3"), ["task"], ProbeConfig(**FAST)).rows
    assert [r["t"] for r in both] == [1.0, 0.5]
    assert both[1]["metric"] >= both[0]["metric"]


def test_instruction_embedding_target_with_minilm(store_path):
    res = probe(store_path, Selection(site="vlm", layers="0,6"), ["instruction"], ProbeConfig(**FAST))
    rows = {(r["layer"], r["split"]): r for r in res.rows}
    assert {s for _, s in rows} == {"episodes", "tasks"}
    assert rows[(6, "episodes")]["metric"] > 0.9 > rows[(0, "episodes")]["metric"]
    assert rows[(6, "episodes")]["cosine"] > rows[(6, "episodes")]["cosine_baseline"]
    assert "similarity" in res.details[rows[(6, "episodes")]["id"]]


def test_cosine_solver_and_field_targets(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6"), ["instruction"],
                ProbeConfig(solver="cosine", splits=("episodes",), **FAST))
    assert res.rows[0]["solver"] == "cosine" and res.rows[0]["metric"] > 0.8
    res = probe(store_path, Selection(site="vlm", layers="6"),
                ["field:dataset_action[0]", "field:success", "field:progress"], ProbeConfig(**FAST))
    kinds = {r["target"]: r for r in res.rows}
    assert kinds["field:dataset_action[0]"]["kind"] == "regression" and kinds["field:dataset_action[0]"]["r2"] > 0.5
    assert kinds["field:success"]["kind"] == "classification"


def test_step_buckets_and_ranges(store_path):
    res = probe(store_path, Selection(site="vlm", layers="6", step_buckets="6", task_range=(0, 3),
                                      episode_range=(0, 8)), ["task"], ProbeConfig(**FAST))
    assert [r["step"] for r in res.rows] == ["0-5", "6-11"]
    assert all(r["chance"] == pytest.approx(1 / 3) for r in res.rows)
    one = probe(store_path, Selection(site="vlm", layers="6", steps="4"), ["task"], ProbeConfig(**FAST)).rows[0]
    assert one["step"] == "4" and one["n_test"] == one["n_test_episodes"]


@pytest.mark.parametrize("sel, target, message", [
    (Selection(site="nope"), "task", "sites: action, vlm"),
    (Selection(site="vlm", layers="4"), "task", "holds layers 0,3,6,9"),
    (Selection(site="action", t="0.7"), "task", "t values: 1, 0.5"),
    (Selection(site="vlm", steps="99"), "task", "steps present"),
    (Selection(site="vlm", task_range=(0, 1)), "task", "one task"),
    (Selection(site="vlm", task_range=(7, 9)), "task", "selects no sample"),
    (Selection(site="vlm", episode_range=(0, 1)), "task", "at least 2 per task"),
    (Selection(site="vlm"), "instruction:t5", "--encoder-path"),
    (Selection(site="vlm"), "nope", "known targets"),
])
def test_bad_input_is_one_clear_line(store_path, sel, target, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match=None) as e:
        probe(store_path, sel, [target], ProbeConfig(**FAST))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_probe_and_report(store_path, tmp_path):
    from toolkit.probe_cli import probe_command, report_command

    out = tmp_path / "res"
    r = CliRunner().invoke(probe_command, ["--store", str(store_path), "--layer", "3,6", "--out", str(out),
                                           "--bootstrap", "100"])
    assert r.exit_code == 0, r.output
    loaded = Results.load(out)
    assert {row["site"] for row in loaded.rows} == {"vlm", "action"}
    r = CliRunner().invoke(report_command, [str(out)])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and (out / "report.md").exists()
    r = CliRunner().invoke(probe_command, ["--store", str(store_path), "--site", "vlm", "--layer", "5"])
    assert r.exit_code != 0 and "holds layers" in r.output


@pytest.mark.parametrize("codec, bf16", [("none", False), ("blosc", True)])
def test_chunk_reader_matches_zarr(tmp_path, codec, bf16):
    path = write_store(tmp_path / "r.zarr", n_tasks=2, eps_per_task=3, steps=7, action=False, codec=codec, bf16=bf16,
                       chunk_samples=16)
    store = open_store(path)
    r = resolve(store, Selection(site="vlm", layers="6", steps="1-5", pool="none"))
    got = np.concatenate([x[:, 0] for _, x in iter_blocks(store, r, 0)])
    want = store.read("vlm", "resid_post", layer=6)[r.rows].reshape(len(r.rows), -1)
    np.testing.assert_array_equal(got, want)


def test_held_out_tasks_needs_an_embedding_target(store_path):
    with pytest.raises(ToolkitError, match="embedding or regression target"):
        probe(store_path, Selection(site="vlm", layers="6"), ["task"], ProbeConfig(splits=("tasks",), **FAST))
