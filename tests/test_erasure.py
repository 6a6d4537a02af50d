"""Removing what a probe found, and checking that it is gone: the direction basis (a two-class probe is one
direction), amnesic probing (a retrained probe after removal), complete linear erasure (LEACE, INLP), and the
erase intervention on the live tiny model and through `toolkit intervene`."""

import warnings

import numpy as np
import pytest

from synthetic import registered, tinyvla_batch, toolkit_tinyvla
from toolkit.analysis.directions import (
    Eraser,
    ProbeDirection,
    ablation_eraser,
    amnesic,
    decodability,
    direction_basis,
    inlp,
    leace,
    load_eraser,
    probe_direction,
    retrain,
)
from toolkit.capture.hooks import Capture
from toolkit.capture.intervention import Intervention, Steering, _basis
from toolkit.capture.plan import build_plan
from toolkit.run.samples import sample_generator
from toolkit.sdk.errors import ToolkitError

TOL = 0.05  # "at chance": a retrained probe's out-of-fold accuracy at most chance + TOL
HOOK = "text.layers.1.resid_post"


def three_direction_label(seed=0, n_episodes=200, steps=5, features=8):
    """A two-class label (one per episode) carried by three orthogonal directions u1, u2, u3: class means ±1
    along each, noise 0.5 along u1 and 1 elsewhere, so a probe leans on u1 while u2 and u3 carry the label too.
    Features are a random rotation of those coordinates, scaled and shifted."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.normal(size=(features, features)))[0]
    episode = np.repeat(np.arange(n_episodes), steps)
    label = (np.arange(n_episodes) % 2)[episode]
    coords = rng.normal(size=(len(episode), features))
    coords[:, 0] *= 0.5
    coords[:, :3] += (2 * label - 1)[:, None]
    return coords @ rotation.T * 3 + 5, label, episode


# --------------------------------------------------------------------------- the basis


def test_a_two_class_probe_spans_exactly_one_direction():
    rng = np.random.default_rng(0)
    w = rng.normal(size=64)
    # a two-class probe's columns, as saved: negatives of each other up to float32 rounding only
    W32 = np.stack([w, -w * (1 + 1e-7 * rng.normal(size=64))], 1).astype(np.float32)
    assert not np.array_equal(W32[:, 0], -W32[:, 1])
    q, r = np.linalg.qr(W32.astype(np.float64))
    assert (np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()).sum() == 2  # the old rule kept a noise direction
    assert direction_basis(W32).shape == (64, 1) and _basis(W32.astype(np.float64)).shape == (64, 1)
    np.testing.assert_allclose(np.abs(direction_basis(W32)[:, 0] @ w) / np.linalg.norm(w), 1, atol=1e-6)
    three = rng.normal(size=(64, 3)).astype(np.float32)
    assert direction_basis(three).shape == (64, 3) and _basis(three.astype(np.float64)).shape == (64, 3)
    # a probe's span: a classifier's column contrasts (C − 1 directions), even when its columns drift together
    four = rng.normal(size=(64, 4))
    drifted = (four - four.mean(1, keepdims=True) + 1e-5 * rng.normal(size=(64, 1))).astype(np.float32)
    probe = ProbeDirection(drifted.astype(np.float64), np.zeros(4), np.zeros(64), {"kind": "classification"},
                           list("abcd"), {})
    assert probe.span().shape == (64, 3) and direction_basis(drifted).shape == (64, 4)
    two = ProbeDirection(W32.astype(np.float64), np.zeros(2), np.zeros(64), {"kind": "classification"}, ["a", "b"], {})
    assert two.span().shape == (64, 1) and ablation_eraser(W32).rank == 1


def test_ablating_a_two_class_probe_in_the_live_model_removes_one_direction():
    adapter, batch = toolkit_tinyvla.TinyVLAAdapter(), tinyvla_batch()
    w = np.random.default_rng(1).normal(size=32)
    W32 = np.stack([w, -w * (1 + 3e-8)], 1).astype(np.float32).astype(np.float64)
    iv = Intervention(HOOK, "ablate", 1.0, W32)
    assert iv.describe()["rank"] == 1
    bare, got, text = _run(adapter, batch, []), _run(adapter, batch, [iv]), adapter.prepare(batch).spans["llm"]["text"]
    diff = (got - bare)[:, text].reshape(-1, 32)
    s = np.linalg.svd(diff, compute_uv=False)
    assert s[1] < 1e-5 * s[0]  # every token moved along one direction only
    np.testing.assert_allclose(np.abs(np.linalg.svd(diff)[2][0] @ w) / np.linalg.norm(w), 1, atol=1e-5)


# --------------------------------------------------------------------------- amnesic probing


def test_removing_one_probe_direction_leaves_a_three_direction_label_decodable():
    x, y, ep = three_direction_label()
    fit = retrain(x, y, ep, final=True)
    assert fit.accuracy > 0.95
    am = amnesic(x, y, ep, fit.probe.W, probe=fit.probe)
    assert am.rank == 1  # a two-class probe: one direction removed
    assert am.same_before > 0.95 and am.same <= am.chance + TOL  # the same probe is at chance, by construction
    assert am.after.accuracy > 0.75 and am.after.summary["ci_low"] > am.chance  # the information is still there
    assert am.decodable is True and "still linearly decodable" in am.text()
    np.testing.assert_array_equal(am.after.fold, am.before.fold)  # same folds before and after


@pytest.mark.parametrize("method", ["leace", "inlp"])
def test_complete_erasure_brings_a_retrained_probe_to_chance_on_held_out_episodes(method):
    x, y, ep = three_direction_label(n_episodes=3000)
    train = ep < 2000  # fit the eraser on 2000 episodes, retrain and score on the 1000 others
    eraser = leace(x[train], y[train]) if method == "leace" else inlp(x[train], y[train], ep[train])
    held = retrain(eraser(x[~train]), y[~train], ep[~train])
    assert held.accuracy <= held.floor + TOL, (method, held.accuracy)
    assert decodability(held)[0] is False
    assert retrain(x[~train], y[~train], ep[~train]).accuracy > 0.95  # it was decodable before
    if method == "leace":
        assert eraser.rank == 1  # two classes: LEACE removes one (oblique) dimension
    else:
        assert eraser.info["reached_chance"] and eraser.rank >= 2  # one probe direction was not enough
        assert eraser.info["accuracy"][-1] <= eraser.info["chance"] + TOL


def test_leace_meets_its_definition():
    rng = np.random.default_rng(3)
    n, F, C = 2000, 10, 3
    y = rng.integers(0, C, n)
    x = rng.normal(size=(n, F)) @ rng.normal(size=(F, F)) + 2 * np.eye(C, F)[y] + 4
    e = leace(x, y)
    xe = e(x)
    z = np.eye(C)[y]
    cross = (xe - xe.mean(0)).T @ (z - z.mean(0)) / n
    assert e.rank == C - 1 and np.abs(cross).max() < 1e-10  # no linear correlation with any class left
    np.testing.assert_allclose(xe.mean(0), x.mean(0), atol=1e-10)  # the mean stays
    np.testing.assert_allclose(e(xe), xe, atol=1e-9)  # a projection: erasing twice changes nothing more
    # least change: the orthogonal projection off the cross-covariance's span also erases, but moves x more
    ortho = ablation_eraser((x - x.mean(0)).T @ (z - z.mean(0)), center=x.mean(0))
    xo = ortho(x)
    assert np.abs((xo - xo.mean(0)).T @ (z - z.mean(0)) / n).max() < 1e-10
    assert ((xe - x) ** 2).sum(1).mean() < ((xo - x) ** 2).sum(1).mean()
    # a continuous concept: no covariance left with it either
    v = x @ rng.normal(size=F)
    xv = leace(x, v[:, None])(x)
    assert np.abs((xv - xv.mean(0)).T @ (v - v.mean()) / n).max() < 1e-8 * np.abs(v).max()


def test_leace_agrees_with_the_concept_erasure_package():
    ce = pytest.importorskip("concept_erasure")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 1500)
    x = rng.normal(size=(1500, 12)) @ rng.normal(size=(12, 12)) + 2 * np.eye(3, 12)[y]
    ref = ce.LeaceEraser.fit(torch.from_numpy(x), torch.from_numpy(np.eye(3)[y]), shrinkage=False, svd_tol=1e-12)
    np.testing.assert_allclose(leace(x, y)(x), ref(torch.from_numpy(x)).numpy(), atol=1e-8)


def test_erasers_save_load_and_fail_in_one_line(tmp_path):
    x, y, ep = three_direction_label(n_episodes=40)
    e = leace(x, y)
    back = load_eraser(e.save(tmp_path / "e.npz"))
    assert back.method == "leace" and back.rank == e.rank
    np.testing.assert_array_equal(back(x), e(x))
    with pytest.raises(ToolkitError, match="does not exist"):
        load_eraser(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", left=np.ones((3, 1)))
    with pytest.raises(ToolkitError, match="lacks center, right"):
        load_eraser(tmp_path / "bad.npz")
    with pytest.raises(ToolkitError, match="one shape"):
        Eraser(np.ones((4, 2)), np.ones((4, 1)), np.zeros(4))
    with pytest.raises(ToolkitError, match="at least 3 folds"):
        retrain(x[:10], y[:10], ep[:10])  # two episodes


# --------------------------------------------------------------------------- the live intervention path


def _run(adapter, batch, interventions):
    """The llm site's unpooled layer-1 resid_post under the interventions: (batch, token, feature)."""
    inputs = adapter.prepare(batch)
    plan = build_plan(adapter.name, adapter.experts, adapter.sites, sites=["llm"], layers="1", streams="resid_post",
                      pool="none", dtype="float32")
    with Steering(adapter, interventions) as steer, Capture(adapter, plan) as cap:
        cap.begin(inputs)
        steer.begin(inputs)
        adapter.run(inputs, [sample_generator(0, i) for i in range(len(batch))])
        return cap.collect()["llm/resid_post"][:, 0].astype(np.float64)


def test_an_eraser_runs_through_the_live_intervention_hooks():
    adapter, batch = toolkit_tinyvla.TinyVLAAdapter(), tinyvla_batch()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    y = rng.integers(0, 3, 300)
    e = leace(x + 3 * np.eye(3, 32)[y], y)  # an oblique, affine rank-2 eraser of a 32-wide stream
    bare = _run(adapter, batch, [])
    text = adapter.prepare(batch).spans["llm"]["text"]
    other = [i for i in range(bare.shape[1]) if i not in text]
    iv = Intervention(HOOK, "erase", 1.0, e.left, right=e.right, center=e.center, source="leace")
    got = _run(adapter, batch, [iv])
    np.testing.assert_allclose(got[:, text], e(bare[:, text]), atol=1e-4)  # exactly the eraser, on the site's tokens
    np.testing.assert_array_equal(got[:, other], bare[:, other])
    half = _run(adapter, batch, [Intervention(HOOK, "erase", 0.5, e.left, right=e.right, center=e.center)])
    np.testing.assert_allclose(half[:, text], e(bare[:, text], 0.5), atol=1e-4)
    assert iv.describe()["rank"] == 2 and "right_sha256" in iv.describe() and "center_norm" in iv.describe()
    # without right: the orthogonal projection off the span of the vector, like ablate
    q = rng.normal(size=(32, 2))
    np.testing.assert_allclose(_run(adapter, batch, [Intervention(HOOK, "erase", 1.0, q)])[:, text],
                               _run(adapter, batch, [Intervention(HOOK, "ablate", 1.0, q)])[:, text], atol=1e-5)
    with Steering(adapter, [Intervention(HOOK, "erase", 0.0, e.left, right=e.right, center=e.center)]):
        assert sum(len(m._forward_hooks) for m in adapter.module.modules()) == 0  # alpha 0: no hook at all
    with pytest.raises(ToolkitError, match="shaped"):
        Intervention(HOOK, "erase", 1.0, e.left, right=e.right[:, :1])
    with pytest.raises(ToolkitError, match="belongs to an erase"):
        Intervention(HOOK, "add", 1.0, e.left[:, 0], center=e.center)
    with pytest.raises(ToolkitError, match="has 32 features but"):
        Steering(adapter, [Intervention(HOOK, "erase", 1.0, np.ones((5, 1)))])


OPTS = dict(dataset_options=dict(n_tasks=2, n_episodes=6, n_steps=2))


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    """A tiny-VLA store of 12 episodes and a saved `toolkit probe` (task, text site, layer 1) on it."""
    from toolkit.analysis.probe import Selection, probe
    from toolkit.run.api import extract

    root = tmp_path_factory.mktemp("erase")
    with registered(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = extract(model="tinyvla", dataset="synthetic", store=root / "base.zarr", sites=["text"], layers="1",
                        dtype="float32", **OPTS)
    probe(store, Selection(site="text", layers="1"), targets=["task"]).save(root / "probe")
    return root


def _intervene(out, **kw):
    from toolkit.run.intervene import intervene

    with registered(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return intervene(out=out, model="tinyvla", dataset="synthetic", alphas=[1], bootstrap=50, **OPTS, **kw)


def test_intervene_reports_the_amnesic_check_and_erases_completely(tiny_probe, tmp_path):
    root = tiny_probe
    ablated = _intervene(tmp_path / "ablate", direction=root / "probe", op="ablate")
    rows = {r["metric"]: r for r in ablated.rows}
    same, again = rows["probe_accuracy"], rows["probe_accuracy_retrained"]
    assert same["baseline"] == 1.0 and same["value"] <= same["chance"] + TOL  # the same probe: at chance
    assert again["value"] > again["chance"] + 0.2 and "still linearly decodable" in again["note"]  # not gone
    if probe_direction(root / "probe").folds:  # results that save their folds: the retrained probe uses them
        assert "the original probe's folds" in again["note"]
    store = __import__("toolkit").open_store(ablated.conditions[0].store)
    assert store.attrs["intervention"][0]["vector_shape"] == [32, 1]  # two classes: one direction removed
    report = (tmp_path / "ablate" / "report.md").read_text()
    assert "Ablation check" in report and "still linearly decodable" in report

    erased = _intervene(tmp_path / "erase", direction=root / "probe", op="erase", erasure="leace")
    rows = {r["metric"]: r for r in erased.rows}
    again = rows["probe_accuracy_retrained"]
    assert again["value"] <= again["chance"] + TOL and "no longer linearly decodable" in again["note"]
    assert again["baseline"] >= 0.9  # retrained on the unmodified run it decodes the task
    assert erased.eraser == tmp_path / "erase" / "eraser.npz" and load_eraser(erased.eraser).rank == 1
    reused = _intervene(tmp_path / "reuse", direction=erased.eraser, op="erase", at=[HOOK], retrain=False)
    assert not any(r["metric"] == "probe_accuracy_retrained" for r in reused.rows)
    import toolkit

    a = toolkit.open_store(erased.conditions[0].store).read(HOOK)
    b = toolkit.open_store(reused.conditions[0].store).read(HOOK)
    np.testing.assert_array_equal(a, b)  # the saved eraser replays the same edit


def test_the_cli_erases_with_inlp_and_prints_the_check(tiny_probe, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    with registered(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["intervene", "--model", "tinyvla", "--dataset", "synthetic", "--out", str(tmp_path / "inlp"),
                "--direction", str(tiny_probe / "probe"), "--op", "erase", "--erasure", "inlp", "--dataset-option",
                "n_tasks=2", "--dataset-option", "n_episodes=6", "--dataset-option", "n_steps=2", "--bootstrap", "50",
                "--no-progress", "--no-figures"]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert "ablation check" in res.output and "linearly decodable" in res.output
        bad = CliRunner().invoke(cli, [*args[:6], str(tmp_path / "bad"), "--direction", str(tiny_probe / "probe"),
                                       "--op", "erase", "--erasure-store", str(tmp_path / "nowhere.zarr")])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
