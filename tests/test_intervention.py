"""Interventions: the hooks that change a named stream (tiny VLA and tiny pi0), the paired runs and their statistics."""

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from synthetic import registered, tinyvla_batch, toolkit_tinyvla
from toolkit.capture.hooks import Capture
from toolkit.capture.plan import build_plan
from toolkit.sdk.errors import ToolkitError
from toolkit.run.samples import sample_generator
from toolkit.analysis.effects import bootstrap_mean, bootstrap_t, mcnemar_exact, shift_test
from toolkit.run.intervene import intervene
from toolkit.analysis.directions import mean_difference, probe_direction, store_mean
from toolkit.capture.intervention import Intervention, Steering
from toolkit.store.reader import open_store

HOOK = "text.layers.1.resid_post"


@pytest.fixture(scope="module")
def adapter():
    return toolkit_tinyvla.TinyVLAAdapter()


@pytest.fixture(scope="module")
def batch():
    return tinyvla_batch()


def _run(adapter, batch, interventions, streams="resid_post", layers="1"):
    """Actions and the llm site's unpooled activations under the interventions."""
    inputs = adapter.prepare(batch)
    plan = build_plan(adapter.name, adapter.experts, adapter.sites, sites=["llm"], layers=layers, streams=streams,
                      pool="none", dtype="float32")
    with Steering(adapter, interventions) as steer, Capture(adapter, plan) as cap:
        cap.begin(inputs)
        steer.begin(inputs)
        out = adapter.run(inputs, [sample_generator(0, i) for i in range(len(batch))])
        got = cap.collect()
    return out.actions, got, inputs


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _direction(adapter, seed=0):
    return np.random.default_rng(seed).normal(size=adapter.experts["llm"].hidden_size)


# --------------------------------------------------------------------------- the hooks


def test_alpha_zero_registers_nothing_and_is_bit_identical(adapter, batch):
    bare_actions, bare, _ = _run(adapter, batch, [])
    iv = [Intervention(HOOK, "add", 0.0, _direction(adapter)), Intervention(HOOK, "ablate", 0.0, _direction(adapter))]
    with Steering(adapter, iv):
        assert _hook_count(adapter.module) == 0
    actions, got, _ = _run(adapter, batch, iv)
    assert np.array_equal(actions, bare_actions)
    assert np.array_equal(got["llm/resid_post"], bare["llm/resid_post"])


def test_add_moves_only_the_sites_tokens_by_alpha_times_d(adapter, batch):
    d = _direction(adapter)
    _, bare, inputs = _run(adapter, batch, [])
    actions, got, _ = _run(adapter, batch, [Intervention(HOOK, "add", 2.5, d)])
    diff = got["llm/resid_post"][:, 0] - bare["llm/resid_post"][:, 0]  # (B, T, F) at layer 1
    text = inputs.spans["llm"]["text"]
    other = [i for i in range(diff.shape[1]) if i not in text]
    np.testing.assert_allclose(diff[:, text], np.broadcast_to(2.5 * d, diff[:, text].shape), atol=1e-4)
    assert np.abs(diff[:, other]).max() == 0  # the text site changes the text tokens only
    assert not np.array_equal(actions, _run(adapter, batch, [])[0])  # and the change reaches the actions


def test_ablate_zero_mean_and_clamp_do_what_they_say(adapter, batch):
    d = np.stack([_direction(adapter, 1), _direction(adapter, 2)], 1)
    _, got, inputs = _run(adapter, batch, [Intervention(HOOK, "ablate", 1.0, d)])
    text = inputs.spans["llm"]["text"]
    x = got["llm/resid_post"][:, 0][:, text]
    assert np.abs(x @ d).max() < 1e-3 * np.abs(x).max() * np.linalg.norm(d)
    _, got, _ = _run(adapter, batch, [Intervention("llm.layers.1.resid_post", "zero", 1.0)])
    assert np.abs(got["llm/resid_post"][:, 0]).max() == 0
    mu = _direction(adapter, 3)
    _, got, _ = _run(adapter, batch, [Intervention("llm.layers.1.resid_post", "mean", 1.0, mu)])
    np.testing.assert_allclose(got["llm/resid_post"][:, 0], np.broadcast_to(mu, got["llm/resid_post"][:, 0].shape),
                               atol=1e-5)
    _, bare, _ = _run(adapter, batch, [])
    _, got, _ = _run(adapter, batch, [Intervention("llm.layers.1.resid_post", "clamp", 1.0, units=(3, 7), value=5.0)])
    after = got["llm/resid_post"][:, 0]
    assert np.all(after[..., [3, 7]] == 5.0)
    keep = [i for i in range(after.shape[-1]) if i not in (3, 7)]
    np.testing.assert_array_equal(after[..., keep], bare["llm/resid_post"][:, 0][..., keep])


def test_input_streams_change_the_layers_input(adapter, batch):
    d = _direction(adapter)
    _, bare, _ = _run(adapter, batch, [], streams="resid_pre,resid_post", layers="1")
    _, got, _ = _run(adapter, batch, [Intervention("llm.layers.1.resid_pre", "add", 1.0, d)],
                     streams="resid_pre,resid_post", layers="1")
    np.testing.assert_allclose(got["llm/resid_pre"][:, 0] - bare["llm/resid_pre"][:, 0],
                               np.broadcast_to(d, bare["llm/resid_pre"][:, 0].shape), atol=1e-4)
    assert not np.allclose(got["llm/resid_post"], bare["llm/resid_post"])


def test_hooks_are_gone_after_an_exception(adapter, batch):
    inputs = adapter.prepare(batch)  # the MLP's width is known only when it runs: units past it fail there
    with pytest.raises(ToolkitError, match="goes past"):
        with Steering(adapter, [Intervention("llm.layers.1.mlp_act", "clamp", 1.0, units=(10**6,))]) as steer:
            assert _hook_count(adapter.module) == 1
            steer.begin(inputs)
            adapter.run(inputs, [sample_generator(0, i) for i in range(len(batch))])
    assert _hook_count(adapter.module) == 0


@pytest.mark.parametrize("hook, iv, message", [
    ("llm.layers.9.resid_post", {"op": "zero"}, "layers 0-"),
    ("nosite.layers.0.resid_post", {"op": "zero"}, "no site"),
    ("llm.layers.*.resid_post", {"op": "zero"}, "pattern"),
    ("llm.layers.0.resid_post", {"op": "add"}, "needs a direction"),
    ("llm.layers.0.resid_post", {"op": "clamp"}, "--units"),
    ("llm.layers.0.resid_post", {"op": "steer"}, "unknown intervention"),
    ("llm.layers.0.pre_attn_norm_scale", {"op": "zero"}, "derived"),
    ("llm.layers.0.resid_post", {"op": "add", "vector": np.ones(3)}, "has 32 features but"),
    ("llm.layers.0.resid_mid", {"op": "clamp", "units": (40,)}, "goes past"),
])
def test_bad_interventions_fail_with_one_line(adapter, hook, iv, message):
    with pytest.raises(ToolkitError, match=message):
        Steering(adapter, [Intervention(hook, **iv)])


def test_denoise_limits_an_action_expert_edit_to_chosen_steps(pi0_adapter, pi0_single_thread):
    from synthetic import camera_episodes

    ep = camera_episodes(["pick up the ketchup"], n_episodes=1, n_steps=1)[0]
    inputs = pi0_adapter.prepare([(ep, next(ep.steps()))])
    plan = build_plan("pi0", pi0_adapter.experts, pi0_adapter.sites, sites=["action"], layers="1", pool="none",
                      dtype="float32")

    def run(ivs):
        with Steering(pi0_adapter, ivs) as steer, Capture(pi0_adapter, plan) as cap:
            cap.begin(inputs)
            steer.begin(inputs)
            pi0_adapter.run(inputs, [sample_generator(0, 0)])
            return cap.collect()["action/resid_post"][0, 0]  # (denoise, token, feature)

    bare = run([])
    got = run([Intervention("action.layers.1.resid_post", "zero", 1.0, denoise=(3,))])
    np.testing.assert_array_equal(got[:3], bare[:3])  # the steps before are untouched
    assert np.abs(got[3]).max() == 0 and not np.allclose(got[4:], bare[4:])  # step 3 zeroed; later steps follow
    with pytest.raises(ToolkitError, match="once per policy call"):
        Steering(pi0_adapter, [Intervention("vlm.layers.1.resid_post", "zero", 1.0, denoise=(0,))])


# --------------------------------------------------------------------------- statistics


def test_shift_test_is_calibrated_on_skewed_and_heavy_nulls_and_has_power():
    rng = np.random.default_rng(0)
    # skewed per-episode shifts with mean 0 at 10 episodes: a sign-flip test (symmetry assumed) rejects ~10 %
    p = np.array([shift_test(rng.exponential(1.0, 10) - 1.0, n_boot=400, seed=i) for i in range(600)])
    assert 0.02 <= (p < 0.05).mean() <= 0.08
    p = np.array([shift_test(rng.standard_t(3, 15), n_boot=400, seed=i) for i in range(400)])
    assert (p < 0.05).mean() <= 0.08
    joint = np.array([shift_test(rng.normal(size=(10, 3)), n_boot=400, seed=i)[0] for i in range(300)])
    assert 0.02 <= (joint < 0.05).mean() <= 0.08
    assert shift_test(rng.normal(1.0, 1.0, 15)) < 0.01
    hits = [shift_test(rng.normal(0.8, 1.0, 20), n_boot=400, seed=i) < 0.05 for i in range(200)]
    assert np.mean(hits) >= 0.8


def test_bootstrap_t_interval_and_test_agree_and_handle_degenerate_episodes():
    rng = np.random.default_rng(3)
    for i in range(50):  # the interval excludes 0 exactly when the test rejects at its level
        b = bootstrap_t(rng.normal(0.4, 1.0, (12, 2)), n_boot=300, seed=i)
        assert np.array_equal((b.low > 0) | (b.high < 0), b.p <= 0.05)
    same = bootstrap_t(np.full((6, 1), 2.0))  # every episode shifted alike: no spread, yet no doubt
    assert same.low[0] == same.high[0] == 2.0 and same.p[0] == pytest.approx(1 / 2001)
    zero = bootstrap_t(np.zeros((6, 1)))
    assert zero.p[0] == 1.0 and zero.low[0] == zero.high[0] == 0.0


def test_bootstrap_interval_covers_the_mean_and_mcnemar_is_exact():
    rng = np.random.default_rng(1)
    cover = []
    for i in range(300):
        lo, hi = bootstrap_mean(rng.exponential(1.0, (25, 1)), n_boot=500, seed=i)
        cover.append(lo[0] <= 1.0 <= hi[0])
    assert 0.88 <= np.mean(cover) <= 0.99
    assert np.isnan(bootstrap_mean(np.ones((1, 1)))[0][0])  # one episode: no interval
    # 6 episodes gained, 0 lost: two-sided binomial 2 * 0.5^6
    assert mcnemar_exact(np.ones(8), np.r_[np.zeros(6), np.ones(2)]) == pytest.approx(2 * 0.5 ** 6)
    assert mcnemar_exact(np.ones(4), np.ones(4)) == 1.0


# --------------------------------------------------------------------------- probe -> intervene -> measure (tiny pi0)

OPTS = dict(model_options={"num_steps": 2}, dataset_options=dict(n_tasks=2, n_episodes=4, n_steps=2))


@pytest.fixture(scope="module")
def probed(tmp_path_factory, pi0_single_thread):
    """An unmodified tiny-pi0 store and a real `toolkit probe` run on it (task, text_only layer 2)."""
    from toolkit.run.api import extract
    from toolkit.analysis.probe import Selection, probe

    root = tmp_path_factory.mktemp("probe")
    with registered(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = extract(model="pi0", dataset="synthetic", store=root / "base.zarr", sites=["text_only"], layers="2",
                        dtype="float32", **OPTS)
    probe(store, Selection(site="text_only", layers="2"), targets=["task"]).save(root / "probe")
    return root, store


def test_probe_weights_are_read_from_a_real_probe_run(probed):
    root, _ = probed
    p = probe_direction(root / "probe")
    assert p.hook == "text_only.layers.2.resid_post"
    assert p.W.shape == (128, 2) and p.classes == ["task 0", "task 1"]
    assert np.array_equal(p.direction("task 1"), p.W[:, 1]) and p.direction(None).shape == (128, 2)
    with pytest.raises(ToolkitError, match="no saved weights"):
        probe_direction(root / "probe", 7)


def test_adding_alpha_w_shifts_the_probe_score_by_alpha_w_squared(probed, tmp_path):
    root, _ = probed
    with registered():
        run = intervene(out=tmp_path, model="pi0", dataset="synthetic", direction=root / "probe", probe_class="task 1",
                        alphas=[0, 0.5, 2], figures=False, **OPTS)
    rows = {(r["metric"], r["alpha"]): r for r in run.rows if r["metric"] in ("probe_score_shift", "action_l2")}
    w = probe_direction(root / "probe").W[:, 1]
    for alpha in (0.5, 2):
        r = rows[("probe_score_shift", alpha)]
        assert r["predicted"] == pytest.approx(alpha * w @ w)
        assert r["value"] == pytest.approx(alpha * w @ w, rel=1e-4)
        assert rows[("action_l2", alpha)]["value"] > 0
    assert rows[("probe_score_shift", 0.0)]["value"] == 0 and rows[("action_l2", 0.0)]["value"] == 0
    # alpha = 0: the intervened store is bit-identical to the unmodified one (actions and activations)
    base, zero = open_store(run.baseline), open_store(run.conditions[0].store)
    assert np.array_equal(base.coord("policy_action"), zero.coord("policy_action"))
    assert np.array_equal(base.read("text_only", "resid_post"), zero.read("text_only", "resid_post"))
    assert zero.attrs["intervention"][0]["alpha"] == 0 and "intervention" not in base.attrs
    assert open_store(run.conditions[1].store).attrs["intervention"][0]["op"] == "add"
    assert (tmp_path / "effects.csv").is_file() and (tmp_path / "report.md").is_file()


def test_ablating_the_probes_directions_sends_it_to_chance(probed, tmp_path):
    root, _ = probed
    with registered():
        run = intervene(out=tmp_path, model="pi0", dataset="synthetic", direction=root / "probe", op="ablate", alphas=[1],
                        figures=True, **OPTS)
    acc = next(r for r in run.rows if r["metric"] == "probe_accuracy")
    assert acc["baseline"] == 1.0  # the probe decodes the task on the unmodified activations
    assert acc["value"] == pytest.approx(acc["chance"])  # and is at chance once its directions are gone
    assert {p.name for p in run.figures} == {"dose_response.png", "probe_check.png"}


def test_a_regression_probes_direction_steers_its_prediction(probed, tmp_path):
    from toolkit.analysis.probe import Selection, probe

    root, store = probed
    probe(store, Selection(site="text_only", layers="2"), targets=["field:progress:regression"]).save(root / "regression")
    p = probe_direction(root / "regression")
    assert p.W.shape == (128, 1) and np.array_equal(p.direction(None), p.W[:, 0])
    with registered():
        run = intervene(out=tmp_path, model="pi0", dataset="synthetic", direction=root / "regression", alphas=[3], figures=False, **OPTS)
    shift = next(r for r in run.rows if r["metric"] == "probe_score_shift")
    w = p.W[:, 0]
    assert shift["predicted"] == pytest.approx(3 * w @ w) and shift["value"] == pytest.approx(3 * w @ w, rel=1e-4)
    assert not any(r["metric"] == "probe_accuracy" for r in run.rows)  # no classes to be right about


def test_mean_difference_and_store_mean_match_numpy(probed):
    _, store = probed
    s = open_store(store)
    x = s.read("text_only", "resid_post")[:, 0].astype(np.float64).mean(1)  # (n, F): layer 2, pooled token
    task = s.coord("task_id")
    d = mean_difference(s, "text_only.layers.2.resid_post", "task=1", "task=0")
    np.testing.assert_allclose(d, x[task == 1].mean(0) - x[task == 0].mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(store_mean(s, "text_only.layers.2.resid_post"), x.mean(0), rtol=1e-6, atol=1e-8)
    with pytest.raises(ToolkitError, match="no sample"):
        mean_difference(s, "text_only.layers.2.resid_post", "task=9", "task=0")


def test_the_cli_runs_a_between_groups_sweep_and_reports_bad_input(probed, tmp_path):
    from toolkit.cli.main import cli

    with registered():
        res = CliRunner().invoke(cli, ["intervene", "--model", "pi0", "--dataset", "synthetic", "--out", str(tmp_path),
                                       "--hook", "text_only.layers.1,2.resid_post", "--between", "task=1", "task=0",
                                       "--alpha", "0,1", "--model-option", "num_steps=2", "--dataset-option",
                                       "n_tasks=2", "--dataset-option", "n_episodes=2", "--dataset-option",
                                       "n_steps=1", "--no-progress", "--no-figures"])
        assert res.exit_code == 0, res.output
        import pandas as pd

        table = pd.read_csv(tmp_path / "effects.csv")
        assert set(table.hook) == {"text_only.layers.1.resid_post", "text_only.layers.2.resid_post"}
        assert set(table.alpha) == {0.0, 1.0}
        bad = CliRunner().invoke(cli, ["intervene", "--model", "pi0", "--dataset", "synthetic", "--out",
                                       str(tmp_path / "x"), "--hook", "text_only.layers.2.resid_post", "--op", "add"])
    assert bad.exit_code == 2 and "needs a direction" in bad.output and "Traceback" not in bad.output

# The closed-loop intervention tests live in tests/test_intervention_sim.py, run by tests/test_sim_process.py.
