"""`extract --frames` and `toolkit view`: frames stored as the dataset's images downscaled, the viewer's page holds
exactly the store's numbers (actions, the probe's confidence computed independently from weights.npz), stays
self-contained and bounded, and works without frames and for an intervention run.  The browser side is
tests/test_view_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.plugins import get_dataset
import synthetic
import viewstores as V


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return V.make_all(tmp_path_factory.mktemp("view"))


def page_data(path) -> dict:
    return synthetic.page_data(Path(path).read_text())


def dataset_samples():
    """(episode, step) of the run's samples, in order, from the dataset itself."""
    ds = get_dataset("libero")(None)
    out = []
    for ep in list(ds.episodes())[:V.RUN["max_episodes"]]:
        out += [(ep, st) for st in list(ep.steps())[:V.RUN["max_steps"]]]
    return out


def test_frames_are_the_cameras_images_aligned_with_the_samples(stores):
    s = toolkit.open_store(stores["frames"])
    assert s.cameras == ["agentview", "wrist"]
    samples = dataset_samples()
    assert s.n_samples == len(samples)
    for cam in s.cameras:
        frames = s.frames(cam)
        assert frames.shape == (s.n_samples, 32, 32, 3) and frames.dtype == np.uint8  # 32 px images: never upscaled
        for k, (ep, st) in enumerate(samples):
            np.testing.assert_array_equal(frames[k], st.images[cam])
    meta = s.root["frame_agentview"].metadata
    assert meta.dimension_names == ("sample", "frame_agentview_y", "frame_agentview_x", "rgb")
    assert "ZstdCodec" in [c.__class__.__name__ for c in meta.codecs]  # compressed whatever --codec says


def test_frames_downscale_by_area_and_keep_the_aspect(tmp_path):
    from toolkit.run.frames import downscale, frame_shape

    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert frame_shape(img, 48) == (32, 48) and frame_shape(img, 500) == (64, 96)
    small = downscale(img, (32, 48), "x").astype(float)
    blocks = img.reshape(32, 2, 48, 2, 3).mean((1, 3))
    assert np.abs(small - blocks).max() <= 1  # a 2x2 area mean, rounded
    s = toolkit.open_store(V.extract(tmp_path / "s16.zarr", frames=16, max_episodes=1, max_steps=1))
    ep, st = dataset_samples()[0]
    want = st.images["wrist"].reshape(16, 2, 16, 2, 3).mean((1, 3))
    assert np.abs(s.frames("wrist")[0].astype(float) - want).max() <= 1


def test_frames_cost_per_sample_is_measured(stores):
    s = toolkit.open_store(stores["frames"])
    stored = sum(p.stat().st_size for cam in s.cameras for p in (Path(stores["frames"]) / f"frame_{cam}").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    raw = s.n_samples * 2 * 32 * 32 * 3
    assert 0 < stored < raw
    print(f"frames: {stored / s.n_samples:.0f} bytes per sample stored, {raw / s.n_samples:.0f} raw")


def test_no_frames_unless_asked(stores):
    s = toolkit.open_store(stores["plain"])
    assert s.cameras == [] and not [f for f in s.fields() if f.startswith("frame_")]
    with pytest.raises(ToolkitError, match="made without --frames"):
        s.frames("agentview")


def test_a_dataset_without_images_is_one_line():
    from toolkit.run.frames import FrameKeeper
    from toolkit.run.samples import Sample
    from toolkit.sdk.adapters import Episode, Step

    ep = Episode("e0", "t", 0, "do it")
    with pytest.raises(ToolkitError, match="gives no camera images.*drop --frames"):
        FrameKeeper(64)([Sample(0, 0, ep, Step(0))])
    keep = FrameKeeper(8)
    keep([Sample(0, 0, ep, Step(0, images={"a": np.zeros((16, 16, 3), np.uint8)}))])
    with pytest.raises(ToolkitError, match="step 1 has no 'a' image"):
        keep([Sample(1, 0, ep, Step(1, images={"b": np.zeros((16, 16, 3), np.uint8)}))])


def test_frames_option_is_declared_once_and_checked():
    spec = toolkit.RunSpec.build(frames="128")
    assert spec.frames == 128 and spec.stored({})["frames"] == 128
    with pytest.raises(ToolkitError, match="--frames"):
        toolkit.RunSpec.build(frames=2)


def test_the_page_holds_the_stores_numbers_and_the_probes_confidence(stores, tmp_path):
    out = toolkit.view(stores["frames"], tmp_path / "v.html", results=stores["probe"])
    d = page_data(out)
    s = toolkit.open_store(stores["frames"])
    assert d["runs"] == ["rollout"] and d["cameras"] == ["agentview", "wrist"]
    assert len(d["episodes"]) == 8 and d["meta"]["probe"]["cells"] == ["vlm.0", "vlm.1", "vlm.2"]
    # the confidence in the true task, from weights.npz and the store alone
    with np.load(stores["probe"] / "weights.npz") as z:
        rows = json.loads((stores["probe"] / "results.json").read_text())["rows"]
        details = json.loads((stores["probe"] / "details.json").read_text())
        task = np.array([str(v) for v in s.coord("task")])
        for cell, layer in enumerate((0, 1, 2)):
            r = next(r for r in rows if r["layer"] == layer and r["target"] == "task")
            i = r["id"]
            x = s.read(f"vlm.layers.{layer}.resid_post").mean(1)
            scores = (x - z[f"shift_{i}"]) @ z[f"W_{i}"] + z[f"b_{i}"]
            labels = details[str(i)]["labels"]
            want = scores[np.arange(len(x)), [labels.index(t) for t in task]]
            got = np.concatenate([e["runs"]["rollout"]["conf"][cell] for e in d["episodes"]])
            np.testing.assert_allclose(got, want, atol=6e-4)
    policy = s.coord("policy_action")[:, 0]
    np.testing.assert_allclose(np.concatenate([e["runs"]["rollout"]["action"] for e in d["episodes"]]), policy,
                               atol=6e-5)
    np.testing.assert_allclose(np.concatenate([e["dataset_action"] for e in d["episodes"]]),
                               s.coord("dataset_action"), atol=6e-5)
    e0 = d["episodes"][0]
    assert e0["instruction"] == "pick up the alphabet soup and place it in the basket" and e0["success"] == 1
    assert all(u.startswith("data:image/jpeg;base64,") for u in e0["runs"]["rollout"]["frames"]["wrist"])


def test_the_page_is_self_contained(stores, tmp_path):
    out = toolkit.view(stores["frames"], tmp_path / "v.html", results=stores["probe"])
    html = Path(out).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", html)
    assert "<script src" not in html and 'rel="stylesheet"' not in html and "@import" not in html
    assert "default-src 'none'" in html  # the page's own policy forbids any load but data: images
    assert out.size == len(html.encode()) and out.size < 2 * 2**20


def test_without_frames_the_heatmaps_and_plots_remain(stores, tmp_path):
    d = page_data(toolkit.view(stores["plain"], tmp_path / "v.html", results=stores["probe"]))
    assert d["cameras"] == [] and d["episodes"][0]["runs"]["rollout"]["frames"] == {}
    assert len(d["episodes"][0]["runs"]["rollout"]["conf"]) == 3
    d = page_data(toolkit.view(stores["plain"], tmp_path / "w.html"))  # no probe either: actions alone
    assert d["meta"]["probe"] is None and d["episodes"][0]["runs"]["rollout"]["conf"] is None


def test_the_size_bound_thins_frames_and_episodes_with_a_note(stores, tmp_path):
    out = toolkit.view(stores["frames"], tmp_path / "v.html", max_frames=10, max_episodes=5)
    d = page_data(out)
    kept = sum(u is not None for e in d["episodes"] for f in e["runs"]["rollout"]["frames"].values() for u in f)
    assert len(d["episodes"]) == 5 and 0 < kept <= 10
    assert any("--max-frames 10" in n for n in out.notes) and any("first 5 of 8" in n for n in out.notes)
    d = page_data(toolkit.view(stores["frames"], tmp_path / "e.html", episodes="2,3"))
    assert [e["episode"] for e in d["episodes"]] == [2, 3]
    for budget, framed in ((5, 2), (0, 0)):  # fewer frames than episodes: the first ones keep one frame each
        out = toolkit.view(stores["frames"], tmp_path / "f.html", max_frames=budget)
        d = page_data(out)
        kept = [sum(u is not None for f in e["runs"]["rollout"]["frames"].values() for u in f) for e in d["episodes"]]
        assert kept == [2] * framed + [0] * (8 - framed) and out.notes


def test_cli_and_errors_are_one_line(stores, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import cli

    out = V.cli("view", stores["frames"], "--results", stores["probe"], "-o", tmp_path / "c.html")
    assert "wrote" in out and (tmp_path / "c.html").is_file()
    for args, want in ((["view", str(tmp_path / "nope.zarr")], "is not a store"),
                       (["view", str(stores["frames"]), "--results", str(tmp_path)], "no probe results"),
                       (["view", "--intervention", str(tmp_path)], "not a `toolkit intervene` output folder"),
                       (["view"], "no store given"),
                       (["view", str(stores["frames"]), "--episodes", "50"], "out of range")):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and want in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_probe_writes_its_figures_and_says_where_the_viewer_is(stores, tmp_path):
    out, text = V.probe(stores["plain"], tmp_path / "p")
    assert (out / "figures").is_dir() and any((out / "figures").iterdir()) and (out / "report.html").is_file()
    line = text.strip().splitlines()[-1]
    assert line == (f"figures: {out}/figures/, report: {out}/report.html; see it: toolkit view {stores['plain']} "
                    f"--results {out} -o {out}/view.html")


@pytest.mark.slow
def test_an_intervention_run_side_by_side(stores, tmp_path):
    run = V.intervene(tmp_path / "iv", stores["probe"])
    d = page_data(toolkit.view(intervention=run, out=tmp_path / "iv.html", results=stores["probe"]))
    label = "vlm.layers.2.resid_post ablate alpha=1"
    assert d["runs"] == ["unmodified", label]
    per_task: dict[str, set] = {}
    for e in d["episodes"]:
        base, iv = e["runs"]["unmodified"], e["runs"][label]
        assert base["frames"]["agentview"][0] and iv["frames"]["agentview"][0]
        np.testing.assert_allclose(base["conf"][:2], iv["conf"][:2])  # layers before the ablated one: unchanged
        assert min(base["conf"][2]) > 0.99  # in-sample: the probe reads the task at layer 2 ...
        per_task.setdefault(e["task"], set()).update(round(v, 2) for v in iv["conf"][2])
        assert base["action"] != iv["action"]
    # ... and with its span ablated, every sample of a task gets one and the same score: nothing left to read
    assert all(len(v) == 1 for v in per_task.values()) and len(per_task) == 2


def test_rerun_export_holds_the_same_timelines(stores, tmp_path):
    import os

    try:
        import rerun  # noqa: F401
        from rerun.chunk import RrdReader
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("rerun-sdk is not installed (the test extra has it: pip install 'toolkit[rerun]')",
                        pytrace=False)
        pytest.skip("rerun-sdk is not installed (pip install 'toolkit[rerun]')")
    out = V.cli("view", stores["frames"], "--results", stores["probe"], "--rerun", tmp_path / "v.rrd")
    assert "open it with: rerun" in out
    series: dict[str, dict] = {}
    for chunk in RrdReader(str(tmp_path / "v.rrd")).stream():
        batch = chunk.to_record_batch().to_pydict()
        for name, values in batch.items():
            if ":" in name and not name.startswith("rerun."):
                entry = series.setdefault(chunk.entity_path, {})
                steps = batch.get("step", [None] * len(values))
                entry.update({s: v for s, v in zip(steps, values)})
    s = toolkit.open_store(stores["frames"])
    ep0 = s.coord("episode") == 0
    root = "/episodes/task_0/episode_0"
    predicted = series[f"{root}/action/predicted"]
    np.testing.assert_allclose([predicted[int(k)] for k in s.coord("step")[ep0]], s.coord("policy_action")[ep0, 0],
                               atol=6e-5)
    np.testing.assert_allclose([series[f"{root}/action/dataset"][int(k)] for k in s.coord("step")[ep0]],
                               s.coord("dataset_action")[ep0], atol=6e-5)
    assert {f"{root}/probe/vlm.{layer}" for layer in range(3)} <= set(series)
    assert {f"{root}/camera/agentview", f"{root}/camera/wrist"} <= set(series)
    assert "pick up the alphabet soup" in str(series[f"{root}/instruction"])
    assert len([p for p in series if p.endswith("/action/predicted")]) == 8


def test_import_keeps_frames_too(tmp_path):
    """`toolkit import` (activations a dataset carries) keeps the steps' images as `extract` does."""
    from toolkit_plugins.libero.sample import write_latent_pickles

    write_latent_pickles(tmp_path / "lat", n_tasks=2, n_episodes=1, n_steps=2, n_layers=2, width=8, n_img=4)
    path = toolkit.import_latents(dataset="libero", data=str(tmp_path / "lat"), store=tmp_path / "i.zarr", frames=8)
    s = toolkit.open_store(path)
    ds = get_dataset("libero")(str(tmp_path / "lat"))
    want = [st.images["agentview"] for ep in ds.episodes() for st in ep.steps()]
    assert s.cameras == ["agentview", "wrist"] and s.n_samples == len(want) == 4
    np.testing.assert_array_equal(s.frames("agentview"), np.stack(want))
