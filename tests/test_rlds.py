"""The RLDS dataset adapter: a tiny RLDS dataset in OpenVLA's modified_libero_rlds layout is written offline
with tensorflow-datasets and read back, alone and end to end through `toolkit extract --model openvla`."""

import os
import warnings

import numpy as np
import pytest

import toolkit
from toolkit.sdk.errors import ToolkitError
from toolkit_plugins.rlds import RLDSDataset

INSTRUCTIONS = ["pick up the alphabet soup and place it in the basket", "open the top drawer of the cabinet",
                "pick up the alphabet soup and place it in the basket"]
N_STEPS = [5, 4, 6]


def write_libero_rlds(root):
    """3 train + 1 val episodes with the modified_libero_rlds features (32x32 images); returns the version dir."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    feat = tfds.features
    features = feat.FeaturesDict({
        "steps": feat.Dataset({
            "observation": feat.FeaturesDict({
                "image": feat.Image(shape=(32, 32, 3), encoding_format="png"),
                "wrist_image": feat.Image(shape=(32, 32, 3), encoding_format="png"),
                "state": feat.Tensor(shape=(8,), dtype=np.float32),
                "joint_state": feat.Tensor(shape=(7,), dtype=np.float32),
            }),
            "action": feat.Tensor(shape=(7,), dtype=np.float32),
            "discount": feat.Scalar(dtype=np.float32),
            "reward": feat.Scalar(dtype=np.float32),
            "is_first": feat.Scalar(dtype=np.bool_),
            "is_last": feat.Scalar(dtype=np.bool_),
            "is_terminal": feat.Scalar(dtype=np.bool_),
            "language_instruction": feat.Text(),
        }),
        "episode_metadata": feat.FeaturesDict({"file_path": feat.Text()}),
    })

    def episode(e, n, instruction):
        rng = np.random.default_rng(e)
        steps = [{
            "observation": {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                            "wrist_image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                            "state": np.full(8, e + k / 10, dtype=np.float32),
                            "joint_state": np.zeros(7, dtype=np.float32)},
            "action": np.arange(7, dtype=np.float32) + 10 * e + k,
            "discount": 1.0, "reward": float(k == n - 1), "is_first": k == 0, "is_last": k == n - 1,
            "is_terminal": k == n - 1, "language_instruction": instruction,
        } for k in range(n)]
        return f"ep{e}", {"steps": steps, "episode_metadata": {"file_path": f"/demos/ep{e}.hdf5"}}

    train = [episode(e, n, i) for e, (n, i) in enumerate(zip(N_STEPS, INSTRUCTIONS))]
    val = [episode(9, 3, "close the microwave")]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="libero_tiny_no_noops", version="1.0.0", features=features,
        split_datasets={"train": train, "val": val}, data_dir=str(root), file_format="tfrecord",
        disable_shuffling=True)
    return root / "libero_tiny_no_noops" / "1.0.0"


@pytest.fixture(scope="module")
def rlds_dir(tmp_path_factory):
    return write_libero_rlds(tmp_path_factory.mktemp("rlds"))


def test_reads_the_libero_layout(rlds_dir):
    ds = RLDSDataset(str(rlds_dir))
    eps = list(ds.episodes())
    assert [e.instruction for e in eps] == INSTRUCTIONS and [e.n_steps for e in eps] == N_STEPS
    assert [e.task_id for e in eps] == [0, 1, 0] and eps[0].key == "train/episode_000000"
    assert eps[0].metadata["file_path"] == "/demos/ep0.hdf5"
    steps = list(eps[1].steps())
    assert [s.index for s in steps] == [0, 1, 2, 3]
    s = steps[2]
    assert sorted(s.images) == ["agentview", "wrist"] and s.images["agentview"].shape == (32, 32, 3)
    assert s.images["agentview"].dtype == np.uint8
    np.testing.assert_array_equal(s.action, np.arange(7) + 12)
    np.testing.assert_allclose(s.state, np.full(8, 1.2))
    assert s.fields == {"discount": 1.0, "reward": 0.0, "is_first": False, "is_last": False, "is_terminal": False}
    assert steps[-1].fields["is_last"] and steps[-1].fields["reward"] == 1.0


def test_parent_dir_split_slicing_and_step_options(rlds_dir):
    eps = list(RLDSDataset(str(rlds_dir.parent), split="train[1:]").episodes())
    assert [e.instruction for e in eps] == INSTRUCTIONS[1:]
    assert [e.instruction for e in RLDSDataset(str(rlds_dir), split="val").episodes()] == ["close the microwave"]
    ds = RLDSDataset(str(rlds_dir), num_episodes="1", max_steps_per_episode="4", step_stride="2")
    eps = list(ds.episodes())
    assert len(eps) == 1 and [s.index for s in eps[0].steps()] == [0, 2]
    assert eps[0].n_steps == 2 and eps[0].metadata["n_steps"] == N_STEPS[0]  # what it yields; the episode's length


def test_keys_nested_and_episode_level(rlds_dir):
    ds = RLDSDataset(str(rlds_dir), image_key="observation.wrist_image", wrist_image_key="none",
                     instruction_key="episode_metadata.file_path", state_key="observation/joint_state")
    ep = next(ds.episodes())
    assert ep.instruction == "/demos/ep0.hdf5"
    step = next(ep.steps())
    assert list(step.images) == ["agentview"] and step.state.shape == (7,)


def test_wrong_key_lists_the_keys_that_exist(rlds_dir):
    ds = RLDSDataset(str(rlds_dir), image_key="observation/rgb")
    with pytest.raises(ToolkitError) as err:
        next(next(ds.episodes()).steps())
    msg = str(err.value)
    assert "image_key='observation/rgb' is not a step key" in msg and "\n" not in msg
    assert "observation/image" in msg and "language_instruction" in msg and "episode_metadata/file_path" in msg
    with pytest.raises(ToolkitError, match="instruction_key='episode_metadata.task' is not a episode key"):
        next(RLDSDataset(str(rlds_dir), instruction_key="episode_metadata.task").episodes())


@pytest.mark.parametrize("data, opts, match", [
    (None, {}, "needs --data"),
    ("/no/such/rlds", {}, "does not exist"),
    ("{tmp}", {}, "not a TFDS dataset directory"),
    ("{rlds}", {"split": "test"}, "cannot read split 'test'.*splits: train, val"),
    ("{rlds}", {"nope": 1}, "rlds has no option 'nope'"),
    ("{rlds}", {"num_episodes": "x"}, "num_episodes='x' is not an integer"),
])
def test_bad_input_is_one_line_error(rlds_dir, tmp_path, data, opts, match):
    if data:
        data = data.format(tmp=tmp_path, rlds=rlds_dir)
    with pytest.raises(ToolkitError, match=match) as err:
        list(RLDSDataset(data, **opts).episodes())
    assert "\n" not in str(err.value)


def test_missing_tensorflow_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ToolkitError, match=r"pip install 'toolkit\[rlds\]'"):
        list(RLDSDataset(str(tmp_path)).episodes())


def test_extract_openvla_over_rlds_end_to_end(rlds_dir, tmp_path):
    """`toolkit extract --model openvla --dataset rlds --data DIR` through the real CLI."""
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    store = tmp_path / "rlds.zarr"
    res = CliRunner().invoke(cli, ["extract", "--model", "openvla", "--dataset", "rlds", "--data", str(rlds_dir),
                                   "--store", str(store), "--max-episodes", "2", "--max-steps", "3", "--stride", "2",
                                   "--sites", "llm", "--layers", "0,-1", "--no-progress"])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(cli, ["extract", "--model", "openvla", "--dataset", "rlds", "--data", str(rlds_dir),
                                   "--store", str(tmp_path / "bad.zarr"), "--dataset-option", "image_key=rgb"])
    assert bad.exit_code == 2 and "image_key='rgb' is not a step key" in bad.output
    assert not (tmp_path / "bad.zarr").exists()
    s = toolkit.open_store(store)
    assert s.complete and s.n_samples == 4
    assert list(s.coord("step")) == [0, 2, 0, 2] and list(s.coord("episode")) == [0, 0, 1, 1]
    assert list(s.coord("instruction")) == [INSTRUCTIONS[0]] * 2 + [INSTRUCTIONS[1]] * 2
    np.testing.assert_array_equal(s.coord("dataset_action")[1], np.arange(7) + 2)
    assert list(s.coord("is_first")) == [True, False, True, False]
    assert s.coord("reward").dtype == np.float32 and s.read("llm", "resid_post").shape == (4, 2, 1, 64)
    assert s.attrs["dataset"]["keys"]["image_key"] == "observation/image"


def test_view_an_rlds_store_without_frames(rlds_dir, tmp_path):
    """`toolkit view` on an RLDS store with no frames: the actions alone, from the CLI and the Python API."""
    from click.testing import CliRunner

    from synthetic import page_data

    from toolkit.cli.main import cli

    store = tmp_path / "rlds.zarr"
    toolkit.extract(model="openvla", dataset="rlds", data=str(rlds_dir), store=store, max_episodes=2, max_steps=3,
                    sites="llm", layers="0")
    res = CliRunner().invoke(cli, ["view", str(store), "-o", str(tmp_path / "cli.html")])
    assert res.exit_code == 0, res.output
    page = toolkit.view(store, tmp_path / "api.html")
    for html in ((tmp_path / "cli.html").read_text(), open(page).read()):
        data = page_data(html)
        assert data["cameras"] == [] and "data:image/jpeg" not in html  # no frames: heatmaps and plots alone
        assert [e["instruction"] for e in data["episodes"]] == INSTRUCTIONS[:2]
        assert [len(e["steps"]) for e in data["episodes"]] == [3, 3]
        np.testing.assert_allclose(data["episodes"][0]["dataset_action"][1], np.arange(7) + 1)


def test_extract_pi0_over_rlds(rlds_dir, tmp_path, pi0_single_thread):
    """The same data feeds pi0 (agentview + wrist cameras, 8-dim state)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = toolkit.open_store(toolkit.extract(model="pi0", dataset="rlds", data=str(rlds_dir), store=tmp_path / "p.zarr",
                                               sites=["vlm"], layers="0", max_episodes=1, max_steps=1))
    assert s.n_samples == 1 and s.attrs["model"]["cameras"] == ["agentview", "wrist"]


# --------------------------------------------------------------------------- RT-1 / fractal: a dict action

FRACTAL_PARTS = [["world_vector", 3], ["rotation_delta", 3], ["gripper_closedness_action", 1],
                 ["base_displacement_vector", 2], ["base_displacement_vertical_rotation", 1], ["terminate_episode", 3]]


def write_fractal_rlds(root):
    """2 episodes in RT-1's fractal20220817_data layout: the action is a dict, the instruction an observation."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    feat = tfds.features
    features = feat.FeaturesDict({
        "steps": feat.Dataset({
            "observation": feat.FeaturesDict({
                "image": feat.Image(shape=(32, 40, 3), encoding_format="jpeg"),
                "natural_language_instruction": feat.Text(),
                "base_pose_tool_reached": feat.Tensor(shape=(7,), dtype=np.float32),
            }),
            "action": feat.FeaturesDict({  # keys in the order fractal's features.json lists them
                "base_displacement_vector": feat.Tensor(shape=(2,), dtype=np.float32),
                "base_displacement_vertical_rotation": feat.Tensor(shape=(1,), dtype=np.float32),
                "gripper_closedness_action": feat.Tensor(shape=(1,), dtype=np.float32),
                "rotation_delta": feat.Tensor(shape=(3,), dtype=np.float32),
                "terminate_episode": feat.Tensor(shape=(3,), dtype=np.int32),
                "world_vector": feat.Tensor(shape=(3,), dtype=np.float32),
            }),
            "reward": feat.Scalar(dtype=np.float32),
            "is_first": feat.Scalar(dtype=np.bool_),
            "is_last": feat.Scalar(dtype=np.bool_),
            "is_terminal": feat.Scalar(dtype=np.bool_),
        }),
    })

    def episode(e, n):
        steps = [{
            "observation": {"image": np.full((32, 40, 3), 10 * k, np.uint8),
                            "natural_language_instruction": ["pick rxbar chocolate", "open top drawer"][e],
                            "base_pose_tool_reached": np.zeros(7, np.float32)},
            "action": {"world_vector": np.array([1, 2, 3], np.float32) + 100 * e + 10 * k,
                       "rotation_delta": np.array([4, 5, 6], np.float32),
                       "gripper_closedness_action": np.array([7], np.float32),
                       "base_displacement_vector": np.array([8, 9], np.float32),
                       "base_displacement_vertical_rotation": np.array([10], np.float32),
                       "terminate_episode": np.array([0, 1, 0] if k < n - 1 else [1, 0, 0], np.int32)},
            "reward": float(k == n - 1), "is_first": k == 0, "is_last": k == n - 1, "is_terminal": k == n - 1,
        } for k in range(n)]
        return f"ep{e}", {"steps": steps}

    tfds.dataset_builders.store_as_tfds_dataset(
        name="fractal_tiny", version="0.1.0", features=features,
        split_datasets={"train": [episode(0, 3), episode(1, 2)]}, data_dir=str(root), file_format="tfrecord",
        disable_shuffling=True)
    return root / "fractal_tiny" / "0.1.0"


@pytest.fixture(scope="module")
def fractal_dir(tmp_path_factory):
    return write_fractal_rlds(tmp_path_factory.mktemp("fractal"))


def test_dict_action_is_flattened_in_the_documented_order(fractal_dir):
    ds = RLDSDataset(str(fractal_dir), instruction_key="observation/natural_language_instruction")
    eps = list(ds.episodes())
    assert [e.instruction for e in eps] == ["pick rxbar chocolate", "open top drawer"]
    steps = list(eps[1].steps())
    np.testing.assert_array_equal(steps[1].action, [111, 112, 113, 4, 5, 6, 7, 8, 9, 10, 1, 0, 0])
    assert steps[1].action.dtype == np.float32 and steps[1].state is None
    assert steps[1].images["agentview"].shape == (32, 40, 3)
    assert ds.describe()["action_parts"] == FRACTAL_PARTS
    one = RLDSDataset(str(fractal_dir), instruction_key="observation/natural_language_instruction",
                      action_key="action/world_vector")
    np.testing.assert_array_equal(next(next(one.episodes()).steps()).action, [1, 2, 3])
    assert "action_parts" not in one.describe()


def test_fractal_through_extract_stores_the_flat_action(fractal_dir, tmp_path):
    s = toolkit.open_store(toolkit.extract(
        model="openvla", dataset="rlds", data=str(fractal_dir), store=tmp_path / "f.zarr", sites=["llm"], layers="0",
        max_episodes=1, max_steps=2, dataset_options={"instruction_key": "observation/natural_language_instruction"}))
    assert s.n_samples == 2 and s.coord("dataset_action").shape == (2, 13)
    np.testing.assert_array_equal(s.coord("dataset_action")[1][:3], [11, 12, 13])
    assert s.attrs["dataset"]["action_parts"] == FRACTAL_PARTS


@pytest.mark.slow  # TensorFlow's start-up in a process of its own
def test_reading_prints_no_tensorflow_start_up_lines(fractal_dir):
    """TF's oneDNN notice and absl's pre-init warning are switched off before TensorFlow is imported."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    code = ("from toolkit_plugins.rlds import RLDSDataset\n"
            f"ds = RLDSDataset({str(fractal_dir)!r}, instruction_key='observation/natural_language_instruction')\n"
            "print(sum(len(list(e.steps())) for e in ds.episodes()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "5", proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_non_numeric_action_part_is_one_line_pointing_at_action_key():
    from toolkit_plugins.rlds import flatten_action

    parts = flatten_action({"terminate": np.int32(0), "nested": {"b": [1.0], "a": [2.0, 3.0]}, "world_vector": [0.5]},
                           "x")
    assert [(n, a.tolist()) for n, a in parts] == [("world_vector", [0.5]), ("nested.a", [2.0, 3.0]),
                                                   ("nested.b", [1.0]), ("terminate", [0])]
    with pytest.raises(ToolkitError, match=r"ds: ep step 0: action part 'mode' is not numeric .*"
                                           r"action_key=action/PART"):
        flatten_action({"world_vector": [1.0], "mode": "absolute"}, "ds: ep step 0")
