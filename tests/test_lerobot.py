"""The LeRobot dataset adapter on real files written here (tests/lerobot_data.py): v2.0 (PNG images in the parquet,
openpi's LIBERO keys), v2.1 (one mp4 per episode and camera) and v3.0 (several episodes per parquet and mp4 file),
videos in AV1 like lerobot's (H.264 where this PyAV cannot encode AV1).  Frames equal an independent PyAV decode of
the same files at the rows' timestamps; state, action, fields and task text equal the parquet; pi0 and OpenVLA
extract from them through the CLI and the Python API; a store resumes; bad input is one line naming the file.
The datasets come from ``toolkit_plugins.lerobot.sample``, the frames to compare with from ``decode_all`` below."""

import itertools
import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("av")
pytest.importorskip("pyarrow")

import toolkit  # noqa: E402
from toolkit.cli.main import cli  # noqa: E402
from toolkit.run.samples import expected_samples  # noqa: E402
from toolkit.run.spec import RunSpec  # noqa: E402
from toolkit.sdk.errors import ToolkitError  # noqa: E402
from toolkit.testing import check_dataset_adapter  # noqa: E402
from toolkit_plugins.lerobot import LeRobotDataset  # noqa: E402
from toolkit_plugins.lerobot.sample import write_dataset  # noqa: E402

VERSIONS = ("v2.0", "v2.1", "v3.0")


def decode_all(path):
    """Every frame of a video by its presentation time in seconds (rounded to 1e-6), decoded by plain PyAV."""
    import av

    out = {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for frame in c.decode(s):
            out[round(float(frame.pts * s.time_base), 6)] = frame.to_ndarray(format="rgb24")
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot")
    return {v: write_dataset(root / v, v, lengths=(6, 5, 7)) for v in VERSIONS}


def _copy(written, version, tmp_path):
    dst = tmp_path / version
    shutil.copytree(written[version].root, dst)
    return dst


def _quiet_extract(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small random model says so
        return toolkit.extract(dtype="float32", **kw)


# --------------------------------------------------------------------------- what is read


@pytest.mark.parametrize("version", VERSIONS)
def test_the_conformance_suite_passes(written, version):
    check_dataset_adapter(LeRobotDataset(str(written[version].root)))


@pytest.mark.parametrize("version", ("v2.1", "v3.0"))
def test_video_frames_equal_pyav_at_the_rows_timestamps(written, version):
    w = written[version]
    decoded = {}
    ds = LeRobotDataset(str(w.root))
    n = 0
    for ep, src in zip(ds.episodes(), w.episodes, strict=True):
        for step, ts in zip(ep.steps(), src.timestamp, strict=True):
            for cam, name in zip(w.cameras, ("agentview", "wrist"), strict=True):
                path, offset = src.videos[cam]
                if path not in decoded:
                    decoded[path] = decode_all(path)
                want = decoded[path][round(offset + float(ts), 6)]
                np.testing.assert_array_equal(step.images[name], want)
                n += 1
    assert n == 2 * sum(e.length for e in w.episodes)
    if version == "v3.0":  # two episodes share the first file: the second's frames start at its from_timestamp
        assert w.episodes[1].videos[w.cameras[0]] == (w.episodes[0].videos[w.cameras[0]][0], 0.6)


def test_images_inside_the_parquet_are_the_written_pngs(written):
    w = written["v2.0"]
    for ep, src in zip(LeRobotDataset(str(w.root)).episodes(), w.episodes, strict=True):
        for i, step in enumerate(ep.steps()):
            np.testing.assert_array_equal(step.images["agentview"], src.images["image"][i])
            np.testing.assert_array_equal(step.images["wrist"], src.images["wrist_image"][i])


@pytest.mark.parametrize("version", VERSIONS)
def test_state_action_fields_and_task_equal_the_parquet(written, version):
    w = written[version]
    ds = LeRobotDataset(str(w.root))
    assert ds.length_hint() == [6, 5, 7]
    eps = list(ds.episodes())
    assert [e.key for e in eps] == ["episode_000000", "episode_000001", "episode_000002"]
    for ep, src in zip(eps, w.episodes, strict=True):
        steps = list(ep.steps())
        assert ep.n_steps == len(steps) == src.length
        assert (ep.task, ep.instruction, ep.task_id) == (src.task, src.task, src.task_index)
        assert [s.index for s in steps] == list(range(src.length))
        np.testing.assert_array_equal(np.stack([s.state for s in steps]), src.state)
        np.testing.assert_array_equal(np.stack([s.action for s in steps]), src.action)
        np.testing.assert_array_equal([s.fields["timestamp"] for s in steps], src.timestamp)
        if version == "v2.0":  # no success column: success is absent, not False
            assert "success" not in ep.metadata and set(steps[0].fields) == {"timestamp"}
        else:
            assert ep.metadata["success"] is bool(src.success.any())
            np.testing.assert_array_equal([s.fields["next_reward"] for s in steps], src.reward)
        assert ep.metadata["file"] == str(src.data_path) and ep.metadata["codebase_version"] == version


def test_episode_and_task_selection_and_the_length_hint(written):
    root = str(written["v3.0"].root)
    picked = LeRobotDataset(root, episodes="0,2")
    assert [e.key for e in picked.episodes()] == ["episode_000000", "episode_000002"]
    assert picked.length_hint() == [6, 7]
    by_task = LeRobotDataset(root, tasks="1")
    assert [(e.key, e.task_id) for e in by_task.episodes()] == [("episode_000001", 1)]
    assert by_task.length_hint() == [5]
    # the run's own flags on top: --episodes by position, --max-steps, --stride
    ds = LeRobotDataset(root)
    assert expected_samples(ds, RunSpec(max_steps=4, stride=2)) == 6
    assert expected_samples(ds, RunSpec(episodes="1-2", stride=3)) == 2 + 3
    with pytest.raises(ToolkitError, match=r"episodes='7-9' selects none of the dataset's episode indices \(0-2"):
        LeRobotDataset(root, episodes="7-9")
    with pytest.raises(ToolkitError, match=r"tasks=5 selects none of the dataset's task indices \(0, 1\)"):
        LeRobotDataset(root, tasks=5)


def test_only_the_frames_a_run_keeps_are_decoded(written):
    """--stride / --max-steps skip steps without reading their images: a skipped frame is never converted, and
    frames past --max-steps are not decoded at all."""
    root = str(written["v2.1"].root)
    ds = LeRobotDataset(root, wrist_image_key="none")
    ep = next(ds.episodes())
    steps = list(itertools.islice(ep.steps(), 3))  # --max-steps 3
    assert all(not s.images._done for s in steps)
    _ = steps[0].images["agentview"], steps[2].images["agentview"]  # --stride 2
    assert [bool(s.images._done) for s in steps] == [True, False, True]
    assert set(steps[0].images) == {"agentview"}
    assert ds._videos.decoded() == 3  # frames 0-2 of one camera; frames 3-5 and the wrist video untouched


def test_the_camera_mapping_and_its_errors(written, tmp_path):
    w = written["v2.1"]
    ds = LeRobotDataset(str(w.root), image_key="observation.images.wrist_image", wrist_image_key="none")
    step = next(next(ds.episodes()).steps())
    np.testing.assert_array_equal(step.images["agentview"],
                                  decode_all(w.episodes[0].videos["observation.images.wrist_image"][0])[0.0])
    assert set(step.images) == {"agentview"}
    with pytest.raises(ToolkitError, match=r"info.json: no camera 'observation.images.top' for image_key; the "
                                           r"dataset's cameras: observation.images.image, "
                                           r"observation.images.wrist_image"):
        LeRobotDataset(str(w.root), image_key="observation.images.top")
    with pytest.raises(ToolkitError, match="no feature 'qpos' for state_key; the dataset's features: "
                                           "observation.state, action"):
        LeRobotDataset(str(w.root), state_key="qpos")
    with pytest.raises(ToolkitError, match="option image_key cannot be none"):
        LeRobotDataset(str(w.root), image_key="none")
    with pytest.raises(ToolkitError, match="has no option 'camera'"):
        LeRobotDataset(str(w.root), camera="x")
    # a dataset whose cameras have other names: the error lists them
    root = _copy(written, "v2.1", tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"] = {("observation.images.top" if k == "observation.images.image" else k): f
                        for k, f in info["features"].items()}
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ToolkitError, match=r"none of the default cameras .* choose one with --dataset-option "
                                           r"image_key=KEY \(cameras: observation.images.top, "):
        LeRobotDataset(str(root))


def test_a_hub_cache_folder_reads_its_snapshot(written, tmp_path):
    cache = tmp_path / "datasets--physical-intelligence--libero"
    shutil.copytree(written["v2.0"].root, cache / "snapshots" / "abc123")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    ds = LeRobotDataset(str(cache))
    assert ds.root == cache / "snapshots" / "abc123" and ds.length_hint() == [6, 5, 7]


# --------------------------------------------------------------------------- bad input: one line naming the file


def _first_frame(root, **options):
    ds = LeRobotDataset(str(root), **options)
    for ep in ds.episodes():
        for step in ep.steps():
            dict(step.images.items())


def test_a_missing_info_json_or_an_unknown_version_is_one_line(written, tmp_path):
    with pytest.raises(ToolkitError, match=r"meta/info.json is missing: .* is not a LeRobot dataset"):
        LeRobotDataset(str(tmp_path))
    root = _copy(written, "v2.1", tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(ToolkitError, match=r"info.json: codebase_version 'v1.6' is not a LeRobot layout this reader "
                                           r"knows \(v2.0, v2.1, v3.0\)"):
        LeRobotDataset(str(root))
    (root / "meta/info.json").write_text("{not json")
    with pytest.raises(ToolkitError, match="info.json: not readable JSON"):
        LeRobotDataset(str(root))


@pytest.mark.parametrize("version", ("v2.1", "v3.0"))
def test_a_missing_video_names_the_file(written, tmp_path, version):
    root = _copy(written, version, tmp_path)
    video = next((root / "videos").rglob("*.mp4"))
    video.unlink()
    with pytest.raises(ToolkitError, match=f"{video}: the video file of camera .* is missing"):
        _first_frame(root)


def test_a_frame_timestamp_outside_the_video_names_the_file(written, tmp_path):
    root = _copy(written, "v2.1", tmp_path)
    data = root / "data/chunk-000/episode_000001.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(data)
    ts = t.column("timestamp").to_numpy().copy()
    ts[-1] = 2.0  # the video has 5 frames: 0.0-0.4 s
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), data)
    video = root / "videos/chunk-000/observation.images.image/episode_000001.mp4"
    with pytest.raises(ToolkitError, match=f"{video}: no frame at 2.0000 s \\(camera 'observation.images.image', "
                                           r"episode 1 frame 4, timestamp 2.0000 s\): its last frame is at 0.4000 s"):
        _first_frame(root)
    ts[-1] = 0.35  # between two frames: outside lerobot's tolerance
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), data)
    with pytest.raises(ToolkitError, match=f"{video}: no frame at 0.3500 s .* within the tolerance of 0.0001 s"):
        _first_frame(root)
    _first_frame(root, tolerance_s=0.06)  # the user may widen it


def test_a_codec_the_decoder_lacks_names_the_file(written, tmp_path):
    """The mp4's sample entry renamed to a codec tag FFmpeg does not know: PyAV opens the file but has no decoder."""
    root = _copy(written, "v2.1", tmp_path)
    video = root / "videos/chunk-000/observation.images.image/episode_000000.mp4"
    data = video.read_bytes()
    tag = {"libsvtav1": b"av01", "h264": b"avc1", "libx264": b"avc1", "mpeg4": b"mp4v"}[written["v2.1"].codec]
    assert tag in data
    video.write_bytes(data.replace(tag, b"zzz9"))
    with pytest.raises(ToolkitError, match=f"{video}: the video's codec \\((av1|h264|mpeg4)\\) has no decoder in this "
                                           "PyAV/FFmpeg build"):
        _first_frame(root)


def test_an_episode_shorter_than_its_metadata_names_the_file(written, tmp_path):
    root = _copy(written, "v2.1", tmp_path)
    lines = (root / "meta/episodes.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "length": 9})
    (root / "meta/episodes.jsonl").write_text("\n".join(lines))
    with pytest.raises(ToolkitError, match=r"episode_000000.parquet: episode 0 has 6 rows, but the metadata says 9"):
        _first_frame(root)


def test_the_cli_prints_one_line_for_bad_input(written, tmp_path):
    root = _copy(written, "v3.0", tmp_path)
    video = root / "videos/observation.images.image/chunk-000/file-001.mp4"
    video.unlink()
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "s.zarr"), "--model", "pi0", "--dataset", "lerobot",
                                 "--data", str(root), "--episodes", "2", "--no-progress"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(video) in lines[-1] and "missing" in lines[-1], r.output
    assert "Traceback" not in r.output and not (tmp_path / "s.zarr").exists()


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("version", ("v2.0", "v3.0"))
def test_pi0_extracts_from_the_cli(written, tmp_path, version, pi0_single_thread):
    w = written[version]
    store = tmp_path / "pi0.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = CliRunner().invoke(cli, ["extract", str(store), "--model", "pi0", "--dataset", "lerobot", "--data",
                                     str(w.root), "--stride", "2", "--max-steps", "5", "--sites", "vlm",
                                     "--layers", "-1", "--no-progress"])
    assert r.exit_code == 0, r.output
    s = toolkit.open_store(store)
    assert s.complete and s.n_samples == 3 + 3 + 3
    assert list(s.coord("step")) == [0, 2, 4] * 3
    assert list(s.coord("task")) == [w.episodes[e].task for e in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
    want = np.concatenate([e.action[[0, 2, 4]] for e in w.episodes])
    np.testing.assert_array_equal(s.coord("dataset_action"), want)
    if version == "v3.0":
        assert list(s.coord("success")) == [1] * 3 + [0] * 3 + [1] * 3
    else:
        assert list(s.coord("success")) == [-1] * 9  # v2.0 (openpi's LIBERO) records none
    assert s.attrs["dataset"]["codebase_version"] == version


def test_openvla_extracts_through_the_python_api(written, tmp_path, pi0_single_thread):
    w = written["v2.1"]
    path = _quiet_extract(model="openvla", dataset="lerobot", data=str(w.root), store=tmp_path / "ovla.zarr",
                          max_episodes=2, max_steps=2, layers="-1")
    s = toolkit.open_store(path)
    assert s.n_samples == 4 and list(s.coord("episode_key")) == ["episode_000000"] * 2 + ["episode_000001"] * 2
    np.testing.assert_array_equal(s.coord("timestamp"), np.float32([0.0, 0.1, 0.0, 0.1]))


def test_an_interrupted_store_resumes_to_the_uninterrupted_one(written, tmp_path, pi0_single_thread):
    import zarr

    from synthetic import assert_same_store

    kw = dict(model="pi0", dataset="lerobot", data=str(written["v3.0"].root), stride=2, chunk_samples=4,
              batch_size=2, sites=["vlm"], layers="-1")
    ref = _quiet_extract(store=tmp_path / "ref.zarr", **kw)
    part = _quiet_extract(store=tmp_path / "part.zarr", **kw)
    root = zarr.open_group(str(part), mode="r+")
    root.attrs.update({"n_samples": 4, "complete": False})  # as if killed after the first committed block
    _quiet_extract(store=part, resume=True, **kw)
    assert_same_store(ref, part, 3 + 3 + 4)
    _quiet_extract(store=part, resume=True, **kw)  # complete: nothing to add
    assert_same_store(ref, part, 10)
