"""Mobile-VLA H5 dataset adapter: reading, instruction rules, sampling, bad files, dataset-stats, extraction."""

import json
import warnings

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from toolkit.cli import cli
from toolkit.sdk.errors import ToolkitError
from toolkit_plugins.h5 import H5Dataset, frame_indices, stratified

EVENTS = ["episode_start", "start_action", "w", "w", "a", "d", "q", "e", "stop_action"]


def write_episode(path, n=9, size=(60, 80), instruction=None, attr_instruction=None, events=True, layout=None,
                  seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=rng.integers(0, 256, (n, *size, 3), dtype=np.uint8), compression="gzip")
        f.create_dataset("actions", data=rng.normal(size=(n, 3)).astype(np.float32), compression="gzip")
        if events:
            f.create_dataset("action_event_types", data=np.array((EVENTS * 3)[:n], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        if instruction is not None:
            f.create_dataset("language_instruction", data=np.array([instruction.encode()], dtype="S256"))
        f.attrs["episode_name"] = path.stem
        f.attrs["num_frames"] = n
        f.attrs["total_duration"] = 12.5
        if attr_instruction is not None:
            f.attrs["language_instruction"] = attr_instruction
        if layout is not None:
            f.attrs["obstacle_layout_type"] = layout
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("mobile_vla")
    write_episode(d / "episode_20250101_120000_1box_vert_left.h5", instruction="Navigate around obstacles and reach "
                  "the front of the beverage bottle on the left", seed=1)
    write_episode(d / "episode_20250101_120100_1box_vert_right.h5", attr_instruction="go right", seed=2)
    write_episode(d / "episode_20250101_120200_2box_hori_left.h5", events=False, seed=3, size=(300, 400))
    write_episode(d / "episode_20250101_120300_2box_hori_right.h5", n=18, seed=4, layout="two_boxes")
    write_episode(d / "episode_20250101_120400_3box_vert_left.h5", seed=5)
    write_episode(d / "episode_20250101_120500_corridor.h5", seed=6)
    (d / "dataset_index.csv").write_text("episode_path,instruction\n"
                                         "/x/episode_20250101_120500_corridor.h5,follow the corridor\n")
    return d


def test_episodes_and_instruction_rules(root):
    eps = list(H5Dataset(str(root)).episodes())
    assert [e.key for e in eps] == sorted(p.stem for p in root.glob("*.h5"))
    by = {e.key: e for e in eps}
    src = {k.split("_", 3)[-1]: (e.instruction, e.metadata["instruction_source"]) for k, e in by.items()}
    assert src["1box_vert_left"] == ("Navigate around obstacles and reach the front of the beverage bottle on the "
                                     "left", "dataset 'language_instruction'")
    assert src["1box_vert_right"] == ("go right", "attribute 'language_instruction'")
    assert src["2box_hori_left"] == ("Navigate to the brown pot on the left", "file name ('left')")
    assert src["corridor"] == ("follow the corridor", "dataset_index.csv")
    e = by["episode_20250101_120300_2box_hori_right"]
    assert e.task == "2box_hori_right" and e.metadata["direction"] == "right" and e.metadata["layout"] == "two_boxes"
    assert e.n_steps == 18 and e.metadata["num_frames"] == 18 and e.metadata["total_duration"] == 12.5
    steps = list(e.steps())
    assert [s.index for s in steps] == list(range(18))
    assert steps[0].images["agentview"].shape == (60, 80, 3) and steps[0].action.shape == (3,)
    assert steps[0].fields == {"event_type": "episode_start"} and steps[4].fields == {"event_type": "a"}
    big = next(by[k] for k in by if "2box_hori_left" in k)
    s0 = next(big.steps())
    assert s0.images["agentview"].shape == (168, 224, 3) and s0.images["agentview"].dtype == np.uint8
    assert s0.fields == {"event_type": ""}


def test_frames_per_episode_and_stratified_sampling(root):
    assert frame_indices(18, 5) == [0, 4, 8, 13, 17] and frame_indices(3, 5) == [0, 1, 2]
    ds = H5Dataset(str(root), frames_per_episode="5", stratify_by="direction", max_episodes="3", seed="1")
    eps = list(ds.episodes())
    assert len(eps) == 3 and all(len(list(e.steps())) == 5 for e in eps)
    assert sorted(e.metadata["direction"] for e in eps) == ["left", "right", "unknown"]
    again = [e.key for e in H5Dataset(str(root), stratify_by="direction", max_episodes=3, seed=1).episodes()]
    assert again == [e.key for e in eps]
    infos = ds.infos()
    picks = stratified(infos, "layout", 2, 0)
    assert len({i.layout for i in picks}) == 2


def test_bad_files_name_file_and_key(root, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_episode(d / "episode_20250101_000000_left.h5")
    with h5py.File(d / "episode_20250101_000100_right.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((3, 8, 8, 3), dtype=np.uint8))
    raw = (root / "episode_20250101_120000_1box_vert_left.h5").read_bytes()
    (d / "episode_20250101_000200_trunc.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ToolkitError, match=r"episode_20250101_000100_right\.h5: missing key 'actions' .*"
                                           r"use --dataset-option skip_bad=true") as err:
        list(H5Dataset(str(d)).episodes())
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning) as rec:
        eps = list(H5Dataset(str(d), skip_bad="true").episodes())
    assert [e.key for e in eps] == ["episode_20250101_000000_left"]
    msgs = [str(w.message) for w in rec]
    assert any("000200_trunc.h5" in m for m in msgs) and msgs[-1].startswith("h5: skipped 2 of 3 files")
    assert not any("skip_bad" in m for m in msgs)  # already set: no advice to set it
    (d / "episode_20250101_000100_right.h5").unlink()
    with pytest.raises(ToolkitError, match=r"000200_trunc\.h5: cannot open as HDF5 .*truncated.*skip_bad=true"):
        list(H5Dataset(str(d)).episodes())
    with pytest.raises(ToolkitError, match="no embedded sample: pass --data DIR"):
        H5Dataset(None)
    with pytest.raises(ToolkitError, match="stratify_by 'colour'"):
        H5Dataset(str(root), stratify_by="colour")
    with pytest.raises(ToolkitError, match="has no option 'nope'"):
        H5Dataset(str(root), nope=1)


def test_dataset_stats_cli(root):
    r = CliRunner().invoke(cli, ["dataset-stats", "--dataset", "h5", "--data", str(root), "--json",
                                                   "--dataset-option", "frames_per_episode=5",
                                                   "--dataset-option", "stratify_by=direction",
                                                   "--dataset-option", "max_episodes=4"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["n_episodes"] == 6 and rep["frames"] == {"total": 63, "min": 9, "max": 18, "mean": 10.5}
    assert rep["by_direction"] == {"left": 3, "right": 2, "unknown": 1}
    assert rep["event_types"]["w"] > 0 and rep["instruction_sources"]["file name ('left')"] == 2
    plan = rep["sampling"]
    assert plan["n_episodes"] == 4 and plan["n_frames"] == 20 and plan["by_stratum"] == {"left": 2, "right": 1,
                                                                                            "unknown": 1}
    r = CliRunner().invoke(cli, ["dataset-stats", "--dataset", "h5", "--data", str(root)])
    assert r.exit_code == 0 and "episodes by direction:" in r.output and "6 episodes" in r.output


def test_extract_robovlms_over_h5(root, tmp_path, pi0_single_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p = toolkit.extract(model="robovlms", dataset="h5", data=str(root), store=tmp_path / "h5.zarr",
                            streams=["text=resid_post", "context=context"], layers="text=-1", max_episodes=2,
                            dataset_options={"frames_per_episode": 3}, dtype="float32", batch_size=3)
    s = toolkit.open_store(p)
    assert s.n_samples == 6 and s.read("context", "context").shape == (6, 1, 1, 64)
    assert list(s.coord("step")) == [0, 4, 8] * 2
    assert list(s.coord("event_type")) == ["episode_start", "a", "stop_action"] * 2
    assert s.coord("dataset_action").shape == (6, 3)


def test_huge_frames_are_refused_before_reading(tmp_path):
    with h5py.File(tmp_path / "episode_20250101_000000_left.h5", "w") as f:
        f.create_dataset("images", shape=(2, 9000, 16000, 3), dtype=np.uint8, chunks=(1, 64, 64, 3))
        f.create_dataset("actions", data=np.zeros((2, 3), np.float32))
    with pytest.raises(ToolkitError, match=r"key 'images': an image of shape \(9000, 16000, 3\) is out of bounds"):
        list(H5Dataset(str(tmp_path)).episodes())
