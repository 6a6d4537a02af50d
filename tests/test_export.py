"""`toolkit export`: the OpenVLA cache script's per-episode / per-step layout, step_metadata.json, PCA plots,
and one-line errors that leave nothing half-written."""

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import toolkit
from toolkit.cli import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.export import export


@pytest.fixture(scope="module")
def store(tmp_path_factory, pi0_single_thread):
    """openvla over 2 LIBERO sample episodes x 2 steps: llm (last token, 2 layers, input+output), embedding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return toolkit.extract(model="openvla", dataset="libero", store=tmp_path_factory.mktemp("e") / "s.zarr",
                               sites=["llm", "embedding", "projector"], tokens=["llm=-1", "embedding=-1"],
                               pool="none", streams=["llm=resid_pre,resid_post"], dtype="float32",
                               max_episodes=2, max_steps=2)


def run_export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_npy_layout_and_metadata(store, tmp_path):
    res = run_export(store, "--out", tmp_path / "out", "--format", "npy")
    assert res.exit_code == 0, res.output
    s = toolkit.open_store(store)
    root = tmp_path / "out"
    episodes = sorted(p.name for p in root.iterdir())
    assert len(episodes) == 2 and all((root / e / "step_0000").is_dir() for e in episodes)
    s_step = int(s.coord("step")[1])  # sample 1: episode 0's second step
    step = root / episodes[0] / f"step_{s_step:04d}"
    names = sorted(p.name for p in step.iterdir())
    assert names == sorted(["llm.layers.0.resid_pre.npy", "llm.layers.0.resid_post.npy", "llm.layers.1.resid_pre.npy",
                            "llm.layers.1.resid_post.npy", "embedding.layers.0.resid_post.npy",
                            "projector.layers.0.resid_post.npy", "step_metadata.json"])
    i = 1  # sample index of episode 0, step 1
    np.testing.assert_array_equal(np.load(step / "llm.layers.1.resid_post.npy"), s.read("llm", "resid_post", layer=1)[i])
    assert np.load(step / "llm.layers.1.resid_post.npy").shape == (1, 64)
    meta = json.loads((step / "step_metadata.json").read_text())
    assert meta["episode_id"] == str(s.coord("episode_key")[i]) and meta["step_index"] == s_step
    assert meta["original_instruction"] == str(s.coord("instruction")[i])
    assert meta["layers_extracted"]["llm"] == [0, 1] and meta["positions_extracted"]["llm"] == [80]
    assert meta["embedding_shapes"]["llm.layers.0.resid_pre"] == [1, 64]
    assert meta["embedding_shapes"]["projector.layers.0.resid_post"] == [16, 64]
    np.testing.assert_allclose(meta["action_from_dataset"], s.coord("dataset_action")[i], rtol=1e-6)
    assert len(meta["policy_action"][0]) == 7 and meta["model"] == "openvla"


def test_pt_selection_and_visualize(store, tmp_path):
    out = export(store, tmp_path / "pt", format="pt", sites=["llm"], streams=["resid_post"], layers="0,-1",
                 visualize=True)
    ep = sorted(out.iterdir())[0]
    files = sorted(p.name for p in (ep / "step_0000").iterdir())
    assert files == ["llm.layers.0.resid_post.pt", "llm.layers.1.resid_post.pt", "pca_step_visualization.png",
                     "step_metadata.json"]
    t = torch.load(ep / "step_0000" / "llm.layers.1.resid_post.pt")
    np.testing.assert_array_equal(t.numpy(), toolkit.open_store(store).read("llm", "resid_post", layer=1)[0])
    assert (ep / "pca_episode_visualization.png").stat().st_size > 1000
    assert (ep / "step_0000" / "pca_step_visualization.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, match", [
    (["--format", "h5"], "Invalid value for '--format'"),
    (["--site", "vision"], "store has no site 'vision'; sites:"),
    (["--site", "llm", "--layers", "7"], "layer 7 is out of range: available layers at site 'llm' of the store: 0,1"),
    (["--stream", "mlp_out"], "has none of the streams mlp_out"),
])
def test_bad_input_is_one_line_and_writes_nothing(store, tmp_path, args, match):
    res = run_export(store, "--out", tmp_path / "bad", *args)
    assert res.exit_code == 2 and match in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_existing_out_and_not_a_store(store, tmp_path):
    (tmp_path / "out").mkdir()
    res = run_export(store, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "already exists: pass --overwrite" in res.output
    assert run_export(store, "--out", tmp_path / "out", "--overwrite").exit_code == 0
    res = run_export(tmp_path / "nope.zarr", "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "is not a store" in res.output and not (tmp_path / "o2").exists()


def test_failure_midway_leaves_nothing(store, tmp_path, monkeypatch):
    import toolkit.analysis.export as ex

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex.np, "save", boom)
    with pytest.raises(OSError):
        export(store, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ToolkitError, match="unknown export format"):
        export(store, tmp_path / "x", format="csv")
