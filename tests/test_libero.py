"""The built-in LIBERO dataset adapter, its embedded sample, and the restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.sdk import safe_pickle
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.plugins import get_dataset
from toolkit_plugins.libero import SAMPLE_DIR, LiberoDataset, parse_selection
from toolkit_plugins.libero.sample import DENOISE_T, sample_task, write_latent_pickles, write_sample
from toolkit_plugins.libero.tasks import LIBERO_OBJECT

OBJECT_INSTRUCTIONS = [
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the salad dressing and place it in the basket",
    "pick up the bbq sauce and place it in the basket",
    "pick up the ketchup and place it in the basket",
    "pick up the tomato sauce and place it in the basket",
    "pick up the butter and place it in the basket",
    "pick up the milk and place it in the basket",
    "pick up the chocolate pudding and place it in the basket",
    "pick up the orange juice and place it in the basket",
]


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("latents")
    write_latent_pickles(d, n_tasks=2, n_episodes=2, n_steps=2, n_layers=3, width=8, n_img=4)
    return d


@pytest.fixture(scope="module")
def latent_store(latent_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "s.zarr"
    toolkit.import_latents(dataset="libero", data=str(latent_dir), store=path, pool="none", dtype="float32",
                           streams="all")
    return path


def _raw_steps(directory: Path):
    """(task pickle, episode, step dict) in the adapter's order, read back independently."""
    for path in sorted(directory.glob("*.pkl"), key=lambda p: int(p.name.split("_")[1])):
        task = safe_pickle.load(path)
        for e in sorted(task["episodes"], key=lambda k: int(k.split("_")[1])):
            rollout = task["episodes"][e]["rollout_steps"]
            for k in sorted(rollout, key=lambda k: int(k.split("_")[1])):
                yield task, e, rollout[k]


# --------------------------------------------------------------------------- embedded sample


def test_registered_and_sample_episodes():
    assert get_dataset("libero") is LiberoDataset
    ds = LiberoDataset()
    episodes = list(ds.episodes())
    assert len(episodes) == 40
    assert [e.key for e in episodes[:5]] == ["task_0/episode_0", "task_0/episode_1", "task_0/episode_2",
                                             "task_0/episode_3", "task_1/episode_0"]
    assert list(LIBERO_OBJECT) == OBJECT_INSTRUCTIONS
    assert [episodes[4 * i].instruction for i in range(10)] == OBJECT_INSTRUCTIONS
    assert [e.task_id for e in episodes] == [i // 4 for i in range(40)]
    assert episodes[0].task == "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    successes = [e.metadata["success"] for e in episodes]
    assert 15 <= sum(successes) <= 25 and all(isinstance(s, bool) for s in successes)
    assert all(e.n_steps == 6 and e.metadata["total_steps"] >= 26 for e in episodes)
    assert ds.activation_layout() is None

    steps = list(episodes[5].steps())
    assert [s.index for s in steps] == [0, 5, 10, 15, 20, 25]
    s = steps[2]
    assert set(s.images) == {"agentview", "wrist"}
    for img in s.images.values():
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert s.state.shape == (8,) and s.state.dtype == np.float32
    assert s.action.shape == (7,) and s.action.dtype == np.float32
    assert s.activations is None
    # images differ between tasks and drift along an episode
    assert not np.array_equal(steps[0].images["agentview"], steps[-1].images["agentview"])


def test_sample_is_small_deterministic_and_regenerable(tmp_path):
    files = sorted(SAMPLE_DIR.glob("*.pkl"))
    assert len(files) == 10
    assert sum(f.stat().st_size for f in files) < 2_000_000
    write_sample(tmp_path)
    for f in files:
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f"{f.name} differs from its generator"
    task = safe_pickle.load(files[3])
    assert set(task) == {"task_name", "task_id", "task_description", "episodes"}
    assert task["task_id"] == 3 and task["task_description"] == OBJECT_INSTRUCTIONS[3]
    assert set(task["episodes"]["episode_0"]["metadata"]) == {"success", "total_steps", "episode_idx"}
    assert sample_task(3)["task_name"] == task["task_name"]


def test_options_select_tasks_and_episodes():
    ds = LiberoDataset(tasks="2-3", episodes=[1, "3"])
    assert [e.key for e in ds.episodes()] == ["task_2/episode_1", "task_2/episode_3",
                                              "task_3/episode_1", "task_3/episode_3"]
    assert ds.describe()["options"] == {"tasks": "2-3", "episodes": [1, "3"]}
    assert parse_selection("0-2,5", "tasks") == {0, 1, 2, 5}
    assert parse_selection("all", "tasks") is None
    with pytest.raises(ToolkitError, match="malformed tasks"):
        parse_selection("a-b", "tasks")
    with pytest.raises(ToolkitError, match="matches tasks"):
        LiberoDataset(tasks="40-45")
    with pytest.raises(ToolkitError, match="no option 'bogus'"):
        LiberoDataset(bogus=1)


def test_sample_runs_through_iter_samples():
    from toolkit.run.samples import iter_samples, sample_fields
    from toolkit.run.spec import RunSpec

    samples = list(iter_samples(LiberoDataset(), RunSpec(max_episodes=3, max_steps=4, stride=2)))
    assert [(s.episode.key, s.step.index) for s in samples[:3]] == [
        ("task_0/episode_0", 0), ("task_0/episode_0", 10), ("task_0/episode_1", 0)]
    fields = sample_fields(samples)
    assert fields["dataset_action"].shape == (6, 7)
    assert list(fields["success"][:2]) == [1, 1]


# --------------------------------------------------------------------------- latents


def test_latent_layout(latent_dir):
    layout = LiberoDataset(str(latent_dir)).activation_layout()
    assert layout.model == "pi0"
    assert set(layout.experts) == {"vlm", "action"} and set(layout.sites) == {"vlm", "text_only", "action"}
    vlm, action = layout.experts["vlm"], layout.experts["action"]
    assert (vlm.n_layers, vlm.hidden_size, vlm.denoise_steps) == (3, 8, None)
    assert (action.n_layers, action.hidden_size, action.denoise_steps) == (3, 8, 9)
    assert layout.spans["vlm"]["image"] == list(range(4))
    assert layout.spans["vlm"]["text"] == list(range(4, 52))
    assert layout.spans["action"] == {"state": [0], "actions": [1, 2, 3, 4]}
    assert layout.sites["text_only"].expert == "vlm" and layout.sites["text_only"].tokens == "text"
    assert layout.denoise_t["action"] == DENOISE_T
    assert set(vlm.streams) == {"resid_post", "resid_mid", "pre_attn_norm_scale", "pre_mlp_norm_scale"}


def test_step_activations_match_pickles(tmp_path):
    # t keys written in shuffled order must still come out t-descending
    write_latent_pickles(tmp_path, n_tasks=1, n_episodes=1, n_steps=1, n_layers=2, width=4, n_img=2,
                         denoise_t=(0.3, 0.9, 0.6))
    raw = next(_raw_steps(tmp_path))[2]
    step = next(next(LiberoDataset(str(tmp_path)).episodes()).steps())
    acts = step.activations
    np.testing.assert_array_equal(acts["vlm/resid_post"], raw["vlm_layer_output"]["hidden_states"][:, 0])
    np.testing.assert_array_equal(acts["vlm/resid_mid"], raw["vlm_layer_output"]["post_attn_embedding"][:, 0])
    assert acts["vlm/pre_attn_norm_scale"].shape == (2, 50, 1)
    np.testing.assert_array_equal(acts["vlm/pre_mlp_norm_scale"][..., 0],
                                  raw["vlm_layer_output"]["pre_mlp_norm_scales"][:, 0])
    a = acts["action/resid_post"]
    assert a.shape == (2, 3, 5, 8)
    for d, t in enumerate((0.9, 0.6, 0.3)):
        np.testing.assert_array_equal(a[:, d], raw[f"action_expert_hidden_state_t{t}"]["hidden_states"][:, 0])
    assert LiberoDataset(str(tmp_path)).activation_layout().denoise_t["action"] == (0.9, 0.6, 0.3)


def test_import_stores_exact_pickle_values(latent_dir, latent_store):
    store = toolkit.open_store(latent_store)
    raw = list(_raw_steps(latent_dir))
    assert store.n_samples == len(raw) == 8 and store.complete
    assert [str(k) for k in store.coord("episode_key")[:3]] == ["task_0/episode_0", "task_0/episode_0",
                                                                "task_0/episode_1"]
    assert list(store.coord("step")[:2]) == [0, 5]
    assert str(store.coord("instruction")[0]) == OBJECT_INSTRUCTIONS[0]
    np.testing.assert_array_equal(store.coord("dataset_action"), np.stack([r[2]["action"] for r in raw]))
    for layer in range(3):
        vlm = store.read("vlm", "resid_post", layer=layer)
        assert vlm.shape == (8, 52, 8)
        np.testing.assert_array_equal(vlm, np.stack([r[2]["vlm_layer_output"]["hidden_states"][layer, 0]
                                                     for r in raw]))
        text = store.read("text_only", "resid_post", layer=layer)
        np.testing.assert_array_equal(text, vlm[:, 4:])
        scale = store.read("vlm", "pre_attn_norm_scale", layer=layer)
        np.testing.assert_array_equal(scale[..., 0], np.stack([r[2]["vlm_layer_output"]["pre_attn_norm_scales"]
                                                               [layer, 0] for r in raw]))
        action = store.read("action", "resid_post", layer=layer)
        assert action.shape == (8, 9, 5, 8)
        for d, t in enumerate(DENOISE_T):
            np.testing.assert_array_equal(action[:, d], np.stack(
                [r[2][f"action_expert_hidden_state_t{t}"]["hidden_states"][layer, 0] for r in raw]))
    assert store.dims("action", "resid_post") == ("sample", "layer", "denoise", "token", "feature")
    np.testing.assert_allclose(store.static("action/t"), DENOISE_T, rtol=0, atol=1e-6)
    assert list(store.static("action/denoise")) == list(range(9))
    assert list(store.static("text_only/token")) == list(range(4, 52))


def test_import_mean_pool_over_text(latent_dir, tmp_path):
    path = toolkit.import_latents(dataset="libero", data=str(latent_dir), store=tmp_path / "m.zarr",
                                  sites=["text_only", "vlm"], layers="text_only=1", tokens="vlm=image",
                                  dtype="float32")
    store = toolkit.open_store(path)
    raw = list(_raw_steps(latent_dir))
    pooled = store.read("text_only", "resid_post", layer=1)
    assert pooled.shape == (8, 1, 8)
    want = np.stack([r[2]["vlm_layer_output"]["hidden_states"][1, 0, -48:].mean(0) for r in raw])
    np.testing.assert_allclose(pooled[:, 0], want, rtol=1e-6, atol=1e-6)
    img = store.read("vlm", "resid_post", layer=2)
    want = np.stack([r[2]["vlm_layer_output"]["hidden_states"][2, 0, :4].mean(0) for r in raw])
    np.testing.assert_allclose(img[:, 0], want, rtol=1e-6, atol=1e-6)


def test_import_older_expert_keys(tmp_path):
    write_latent_pickles(tmp_path / "d", n_tasks=1, n_episodes=2, n_steps=2, n_layers=2, width=4, n_img=2,
                         style="experts")
    ds = LiberoDataset(str(tmp_path / "d"))
    layout = ds.activation_layout()
    assert set(layout.experts) == {"vlm", "action", "text_only"}
    assert layout.experts["action"].denoise_steps is None and layout.denoise_t == {}
    assert layout.sites["text_only"].expert == "text_only"
    path = toolkit.import_latents(dataset="libero", data=str(tmp_path / "d"), store=tmp_path / "o.zarr",
                                  pool="none", dtype="float32")
    store = toolkit.open_store(path)
    raw = list(_raw_steps(tmp_path / "d"))
    np.testing.assert_array_equal(store.read("action", "resid_post", layer=1),
                                  np.stack([r[2]["expert_1_hidden_states"][1, 0] for r in raw]))
    np.testing.assert_array_equal(store.read("text_only", "resid_post", layer=0),
                                  np.stack([r[2]["text_only_hidden_states"][0, 0] for r in raw]))


def test_import_of_sample_without_latents_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="carries no activations"):
        toolkit.import_latents(dataset="libero", store=tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


# --------------------------------------------------------------------------- bad input


class _WritesMarker:
    """Unpickling this would create the marker file (a harmless stand-in for os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_code_executing_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    task = sample_task(0)
    task["episodes"]["episode_0"]["rollout_steps"]["step_0"]["observation"]["state"] = _WritesMarker(marker)
    data = tmp_path / "data"
    data.mkdir()
    (data / "task_0_evil.pkl").write_bytes(pickle.dumps(task, protocol=protocol))
    # sanity: plain pickle really would run it
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "control"), protocol=protocol))
    assert (tmp_path / "control").exists()
    # protocols < 4 reach Path.touch through builtins.getattr, which is refused first
    refused = r"refusing to unpickle .*task_0_evil\.pkl: it references \S*(touch|getattr), which is not plain data"
    with pytest.raises(ToolkitError, match=refused):
        list(LiberoDataset(str(data)).episodes())
    assert not marker.exists()


def test_os_system_pickle_is_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'MARKER'}",))

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"a": Evil()}, protocol=4))
    with pytest.raises(ToolkitError, match=r"x\.pkl: it references (os|posix)\.system, which is not plain data"):
        safe_pickle.load(path)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("protocol", range(6))
def test_safe_pickle_round_trips_plain_data(protocol):
    data = {"a": [1, 2.5, (3, None), {4}, frozenset([5]), b"xy", b"", bytearray(b"z"), 1j, slice(1, 2), True],
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "u8": np.zeros((4, 4, 3), np.uint8),
            "fortran": np.asfortranarray(np.ones((2, 3))), "strided": np.arange(16.0).reshape(4, 4)[::2],
            "scalar": np.float32(1.5), "i": np.int64(3), "b": np.bool_(True), "dt": np.dtype(">f4"),
            "rec": np.zeros(2, dtype=[("x", "f4"), ("y", "i2")]), "s": np.array(["ab"]), "r": range(3)}
    out = safe_pickle.loads(pickle.dumps(data, protocol=protocol))
    ref = pickle.loads(pickle.dumps(data, protocol=protocol))
    assert pickle.dumps(out, protocol=4) == pickle.dumps(ref, protocol=4)


class _Sub(np.ndarray):
    pass


def test_ndarray_subclass_and_masked_arrays_are_refused():
    for obj in (np.zeros(2).view(_Sub), np.ma.array([1, 2])):
        with pytest.raises(ToolkitError, match="refusing to unpickle"):
            safe_pickle.loads(pickle.dumps(obj, protocol=2), "m.pkl")


def test_truncated_pickle(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    blob = pickle.dumps(sample_task(1), protocol=4)
    (data / "task_1_cut.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ToolkitError, match=r"task_1_cut\.pkl.*truncated or corrupt"):
        list(LiberoDataset(str(data)).episodes())
    (data / "task_1_cut.pkl").write_bytes(b"")
    with pytest.raises(ToolkitError, match=r"task_1_cut\.pkl"):
        list(LiberoDataset(str(data)).episodes())


def test_missing_keys_name_file_and_key_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    task = sample_task(3)
    del task["episodes"]
    (data / "task_3_x.pkl").write_bytes(pickle.dumps(task, protocol=4))
    with pytest.raises(ToolkitError, match=r"task_3_x\.pkl has no 'episodes'"):
        list(LiberoDataset(str(data)).episodes())
    task = sample_task(3)
    task["episodes"]["episode_0"]["rollout_steps"]["step_20"]["observation"] = [1, 2]
    (data / "task_3_x.pkl").write_bytes(pickle.dumps(task, protocol=4))
    with pytest.raises(ToolkitError, match=r"task_3_x\.pkl: episodes\.episode_0\.rollout_steps\.step_20"
                                           r"\.observation is a list, expected a dict"):
        list(LiberoDataset(str(data)).episodes())
    task = sample_task(3)
    del task["episodes"]["episode_2"]["rollout_steps"]
    (data / "task_3_x.pkl").write_bytes(pickle.dumps(task, protocol=4))
    with pytest.raises(ToolkitError, match=r"episodes\.episode_2 has no 'rollout_steps'"):
        list(LiberoDataset(str(data)).episodes())
    (data / "task_3_x.pkl").write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(ToolkitError, match=r"task_3_x\.pkl holds a list"):
        list(LiberoDataset(str(data)).episodes())


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ToolkitError, match=r"no such directory .*nope \(pass --data DIR"):
        LiberoDataset(str(tmp_path / "nope"))
    with pytest.raises(ToolkitError, match="holds no"):
        LiberoDataset(str(tmp_path))
    with pytest.raises(ToolkitError, match="no such directory"):
        toolkit.import_latents(dataset="libero", data=str(tmp_path / "nope"), store=tmp_path / "s.zarr")


def test_files_sorted_by_task_id_not_name(tmp_path):
    for tid in (10, 2, 1):
        task = sample_task(tid % 10)
        task["task_id"] = tid
        for e in list(task["episodes"])[1:]:
            del task["episodes"][e]
        (tmp_path / f"task_{tid}_{task['task_name']}.pkl").write_bytes(pickle.dumps(task, protocol=4))
    assert [e.key for e in LiberoDataset(str(tmp_path)).episodes()] == [
        "task_1/episode_0", "task_2/episode_0", "task_10/episode_0"]
    # a single file works as --data too
    one = next(tmp_path.glob("task_2_*.pkl"))
    assert [e.key for e in LiberoDataset(str(one)).episodes()] == ["task_2/episode_0"]


def test_import_needs_no_observation_key(tmp_path):
    """Latent pickles carry what `toolkit import` stores; a step without 'observation' is fine."""
    d = tmp_path / "d"
    path, = write_latent_pickles(d, n_tasks=1, n_episodes=1, n_steps=2, n_layers=2, width=4, n_img=2)
    task = safe_pickle.load(path)
    for step in task["episodes"]["episode_0"]["rollout_steps"].values():
        del step["observation"]
    path.write_bytes(pickle.dumps(task, protocol=4))
    s = toolkit.open_store(toolkit.import_latents(dataset="libero", data=str(d), store=tmp_path / "s.zarr",
                                                  sites=["vlm"], dtype="float32"))
    assert s.complete and s.n_samples == 2


def test_text_span_clipped_by_a_short_sequence_warns(tmp_path):
    write_latent_pickles(tmp_path, n_tasks=1, n_episodes=1, n_steps=1, n_layers=2, width=4, n_img=4, text=20)
    with pytest.warns(UserWarning, match=r"24 tokens, not more than pi0's 48 text tokens.*'text_only' equals 'vlm'"):
        layout = LiberoDataset(str(tmp_path)).activation_layout()
    assert layout.spans["vlm"]["text"] == list(range(24))
