"""Datasets that know their size say so (``length_hint``): extract's progress bar then has a total and an ETA,
and the total is exactly the number of samples the run stores."""

import re
import warnings

import pytest

import toolkit
from toolkit.run.samples import expected_samples
from toolkit.run.spec import RunSpec
from toolkit.sdk.plugins import registry

pytestmark = pytest.mark.usefixtures("pi0_single_thread")


def _extract_with_bar(capsys, tmp_path, **kw):
    """(samples stored, the bar's final 'n/total') of a run with the progress bar on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small random model says so
        path = toolkit.extract(model="robovlms", store=tmp_path / "s.zarr", sites=["context"], dtype="float32",
                               progress=True, **kw)
    bars = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    return toolkit.open_store(path).n_samples, bars[-1]


def test_the_embedded_libero_sample_counts_its_steps(capsys, tmp_path):
    ds = registry()["dataset"]["libero"].obj()
    assert ds.length_hint() == [6] * 40  # 10 tasks x 4 episodes x 6 steps
    assert registry()["dataset"]["libero"].obj(tasks="0-1", episodes="1-3").length_hint() == [6] * 6
    assert expected_samples(ds, RunSpec(max_episodes=3, max_steps=5, stride=2)) == 9
    n, (done, total) = _extract_with_bar(capsys, tmp_path, dataset="libero", max_episodes=3, max_steps=5, stride=2)
    assert n == int(done) == int(total) == 9


def test_libero_pickles_with_latents_give_no_hint_rather_than_a_second_read(monkeypatch):
    from toolkit_plugins import libero

    monkeypatch.setattr(libero, "HINT_BYTES", 1000)  # the sample's pickles are 150 kB each
    assert registry()["dataset"]["libero"].obj().length_hint() is None


def test_h5_counts_the_frames_it_will_read(tmp_path, capsys):
    from test_h5 import write_episode

    for k, (name, n) in enumerate([("1box_vert_left", 9), ("1box_vert_right", 12), ("2box_hori_left", 7)]):
        write_episode(tmp_path / f"episode_20250101_12{k:02d}00_{name}.h5", n=n, size=(24, 32), seed=k)
    h5 = registry()["dataset"]["h5"].obj
    assert h5(str(tmp_path)).length_hint() == [9, 12, 7]
    assert h5(str(tmp_path), frames_per_episode=4).length_hint() == [4, 4, 4]
    assert h5(str(tmp_path), frames_per_episode=8).length_hint() == [8, 8, 7]  # an episode shorter than 8
    strat = h5(str(tmp_path), stratify_by="direction", max_episodes=2, frames_per_episode=3)
    assert strat.length_hint() == [3] * 2 == [ep.n_steps for ep in strat.episodes()]
    n, (done, total) = _extract_with_bar(capsys, tmp_path / "out", dataset="h5", data=str(tmp_path),
                                         dataset_options={"frames_per_episode": 3}, max_steps=2)
    assert n == int(done) == int(total) == 6


def test_rlds_counts_the_steps_it_will_yield(tmp_path, capsys, monkeypatch):
    """TFDS' split info has episodes, not steps: one pass with the images left encoded counts them."""
    pytest.importorskip("tensorflow_datasets")
    from test_rlds import N_STEPS, write_libero_rlds
    from toolkit_plugins import rlds

    d = write_libero_rlds(tmp_path / "rlds")
    ds = rlds.RLDSDataset(str(d))
    assert ds.length_hint() == N_STEPS == [5, 4, 6]
    assert rlds.RLDSDataset(str(d), split="train[1:]").length_hint() == [4, 6]
    assert rlds.RLDSDataset(str(d), split="train+val").length_hint() == [5, 4, 6, 3]
    opts = dict(split="train[1:]", step_stride="2", max_steps_per_episode="5")
    assert rlds.RLDSDataset(str(d), **opts).length_hint() == [2, 3] == \
        [len(list(ep.steps())) for ep in rlds.RLDSDataset(str(d), **opts).episodes()]
    assert rlds.RLDSDataset(str(d), num_episodes="2").length_hint() == [5, 4]
    n, (done, total) = _extract_with_bar(capsys, tmp_path, dataset="rlds", data=str(d), max_steps=3, stride=2)
    assert n == int(done) == int(total) == 6
    monkeypatch.setattr(rlds, "HINT_BYTES", 1000)  # the tiny split is ~100 kB: too big to count now
    assert rlds.RLDSDataset(str(d)).length_hint() is None


def test_lerobot_takes_its_lengths_from_the_metadata(tmp_path, capsys):
    pytest.importorskip("av")
    from toolkit_plugins.lerobot.sample import write_dataset

    w = write_dataset(tmp_path / "lr", "v3.0", lengths=(6, 5, 7))
    lerobot = registry()["dataset"]["lerobot"].obj
    assert lerobot(str(w.root)).length_hint() == [6, 5, 7]
    assert lerobot(str(w.root), episodes="1-2").length_hint() == [5, 7]
    n, (done, total) = _extract_with_bar(capsys, tmp_path / "out", dataset="lerobot", data=str(w.root), stride=3)
    assert n == int(done) == int(total) == 2 + 2 + 3
