"""Hostile input: pickles built to exhaust memory or time, and fields of the wrong type.

Each bomb is written into an otherwise valid LIBERO task pickle and fed to `toolkit import` in a child
process whose address space is capped (a bomb that got through would fail there, not take the machine
down); the child reports, per bomb, the exit code, the output, the seconds the command took and, at
the end, its peak RSS.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.sdk import fields, safe_pickle
from toolkit.sdk.errors import ToolkitError
from toolkit_plugins.libero import LiberoDataset
from toolkit_plugins.libero.sample import sample_task, write_latent_pickles

DEEP = 10**6


class _Call:
    """Pickles as ``func(*args)``: how a hostile file names an allowed constructor with huge arguments."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _doubling(levels: int) -> list:
    """A list whose two items are the same list, ``levels`` times: tiny as a pickle, 2**levels as a tree."""
    a: list = [0]
    for _ in range(levels):
        a = [a, a]
    return a


def _self_referencing() -> list:
    a: list = [0]
    a.append(a)
    return [a, [a, a]]


def _zero_stride(shape, dtype):
    itemsize = np.dtype(dtype).itemsize
    return _Call(np.ndarray, shape, np.dtype(dtype), b"\0" * itemsize, 0, (0,) * len(shape))


def _task_with(where: str, value) -> dict:
    task = sample_task(0)
    ep = task["episodes"]["episode_0"]
    step = ep["rollout_steps"]["step_0"]
    if where == "metadata":
        ep["metadata"]["extra"] = value
    elif where == "image":
        step["observation"]["agentview_image"] = value
    elif where == "action":
        step["action"] = value
    return task


BOMBS = {
    "list_range": ("metadata", _Call(list, range(10**9)), "more than 10,000,000 container elements"),
    "set_range": ("metadata", _Call(set, range(3 * 10**8)), "more than 10,000,000 container elements"),
    "self_referencing": ("metadata", _self_referencing(), "refers to itself"),
    "doubling_list": ("metadata", _doubling(80), "expands to more than"),
    "zero_stride_image": ("image", _zero_stride((40000, 50000, 3), np.uint8), "zero stride"),
    "zero_stride_action": ("action", _zero_stride((10**8,), np.float32), "zero stride"),
    "nested_list": ("metadata", "DEEP_MARKER", "waiting on the unpickling stack"),
}


def _write_bomb(directory: Path, name: str) -> Path:
    where, value, _ = BOMBS[name]
    blob = pickle.dumps(_task_with(where, value), protocol=2)  # protocol 2: no frames, opcodes can be spliced
    if value == "DEEP_MARKER":  # a list nested 10**6 deep, spliced in where the marker string was
        marker = b"X" + len(value).to_bytes(4, "little") + value.encode()  # BINUNICODE
        assert blob.count(marker) == 1
        blob = blob.replace(marker, b"]" * DEEP + b"a" * (DEEP - 1))
    directory.mkdir(parents=True)
    path = directory / "task_0_bomb.pkl"
    path.write_bytes(blob)
    return path


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a bomb that gets through fails here
    from click.testing import CliRunner
    from toolkit.cli.main import cli
    import toolkit.run.pipeline, toolkit.sdk.plugins  # imports done before the clock starts: the bomb is what is timed
    toolkit.sdk.plugins.get_dataset("libero")
    out = {}
    for name, data, store in json.loads(sys.argv[1]):
        t = time.perf_counter()
        res = CliRunner().invoke(cli, ["import", "--dataset", "libero", "--data", data, "--store", store])
        out[name] = {"code": res.exit_code, "output": res.output, "seconds": time.perf_counter() - t,
                     "exception": repr(res.exception) if res.exit_code not in (0, 2) else None}
    # this process's own peak (VmHWM: reset by exec), not ru_maxrss, which keeps the forking parent's peak
    try:
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        out["maxrss_mb"] = int(hwm.split()[1]) / 1024
    except OSError:
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    jobs = [(name, str(_write_bomb(root / name, name).parent), str(root / f"{name}.zarr")) for name in BOMBS]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return root, results


@pytest.mark.parametrize("name", list(BOMBS))
def test_every_bomb_fails_fast_with_one_line_naming_the_file(bomb_results, name):
    root, results = bomb_results
    r = results[name]
    lines = [line for line in r["output"].splitlines() if line.strip()]
    assert r["code"] == 2, r
    assert len(lines) == 1, r["output"][-2000:]
    assert "task_0_bomb.pkl" in lines[0] and BOMBS[name][2] in lines[0], lines[0]
    assert r["seconds"] < 5, r
    assert not (root / f"{name}.zarr").exists()
    assert results["maxrss_mb"] < 1024, results["maxrss_mb"]


def test_bomb_pickles_are_small(tmp_path):
    """The bombs are what the issue describes: a few KB (the nested list: two bytes per level)."""
    sizes = {name: _write_bomb(tmp_path / name, name).stat().st_size for name in BOMBS}
    assert sizes["self_referencing"] < 200_000 and sizes["doubling_list"] < 200_000
    assert max(v for k, v in sizes.items() if k != "nested_list") < 200_000
    assert sizes["nested_list"] < 2 * DEEP + 200_000


# --------------------------------------------------------------------------- the unpickler's bounds


def test_bounds_are_checked_before_allocating():
    cases = {
        "bytes(10**10)": (_Call(bytes, 10**10), "allocates more than"),
        "ndarray((10**6, 10**4))": (_Call(np.ndarray, (10**6, 10**4)), "allocates more than"),
        "overlapping view": (_Call(np.ndarray, (1000,), np.dtype("f8"), b"\0" * 1008, 0, (1,)), "overlapping"),
        "str(list)": (_Call(str, _doubling(60)), r"str\(\) of a list"),
    }
    for label, (obj, match) in cases.items():
        with pytest.raises(ToolkitError, match=match):
            safe_pickle.loads(pickle.dumps(obj, protocol=4), label)


@pytest.mark.parametrize("blob", [
    b"(S'touch MARKER'\nios\nsystem\n.",  # INST: protocol 0's class call, names read by the opcode itself
    b"(cos\nsystem\nS'touch MARKER'\no.",  # OBJ
    b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nlist\nX\x06\x00\x00\x00appendq\x00\x86R.",
])
def test_class_building_opcodes_stay_refused(blob, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ToolkitError, match="refusing to unpickle g.pkl: it references"):
        safe_pickle.loads(blob, "g.pkl")
    assert not (tmp_path / "MARKER").exists()


def test_declared_lengths_longer_than_the_file_are_refused_unread():
    for opcode in (b"\x8e", b"\x96", b"\x95"):  # BINBYTES8, BYTEARRAY8, FRAME
        blob = b"\x80\x05" + opcode + (10**11).to_bytes(8, "little") + b"."
        with pytest.raises(ToolkitError, match=r"x\.pkl: the file is truncated or corrupt .*100000000000-byte"):
            safe_pickle.loads(blob, "x.pkl")


def test_limits_are_adjustable_and_shared_parts_count_each_time():
    small = safe_pickle.Limits(max_elements=100, max_depth=6)
    safe_pickle.loads(pickle.dumps(_doubling(5), protocol=4), limits=small)  # 6 levels, 2**6 - 1 lists + 32 zeros
    with pytest.raises(ToolkitError, match="expands to more than 100 values"):
        safe_pickle.loads(pickle.dumps([_doubling(4)] * 5, protocol=4), limits=small)
    with pytest.raises(ToolkitError, match="more than 6 levels deep"):
        safe_pickle.loads(pickle.dumps(_doubling(6), protocol=4), limits=small)
    safe_pickle.check_tree({"a": [np.zeros(3)] * 10, "b": (1, 2)})  # shared leaves are fine


def test_plain_metadata_conversion_is_bounded_too():
    from toolkit_plugins.libero import _plain

    a: list = [1]
    a.append({"x": a})
    with pytest.raises(ToolkitError, match="m.pkl: meta refers to itself"):
        _plain(a, "m.pkl: meta")
    with pytest.raises(ToolkitError, match="more than 100,000 values"):
        _plain([list(range(1000))] * 1000, "m.pkl: meta")  # one list shared 1000 times
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ToolkitError, match="more than 16 levels deep"):
        _plain(deep, "m.pkl: meta")
    assert _plain({"s": np.bool_(True), "v": np.arange(3), "t": (np.float32(1.5),)}, "") == \
        {"s": True, "v": [0, 1, 2], "t": [1.5]}


# --------------------------------------------------------------------------- fields of the wrong type


def _one_task(tmp_path: Path, edit) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    task = sample_task(0)
    edit(task, task["episodes"]["episode_0"])
    (d / "task_0_bad.pkl").write_bytes(pickle.dumps(task, protocol=4))
    return d


def _steps(d: Path):
    return [s for ep in LiberoDataset(str(d)).episodes() for s in ep.steps()]


def _set_step(key, value, step="step_0", obs=False):
    def edit(task, ep):
        target = ep["rollout_steps"][step]
        (target["observation"] if obs else target)[key] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set_step("action", "abc"), r"step_0: action is a str \('abc'\), expected a numeric vector"),
    (_set_step("action", [1.0, float("nan")] + [0.0] * 5), r"step_0: action holds NaN or infinite values"),
    (_set_step("action", np.zeros((5, 7))), r"step_0: action has shape \(5, 7\), expected a 1-D vector"),
    (_set_step("action", np.zeros(9), step="step_10"),
     r"rollout_steps\.step_10: has 9 action values, but .*rollout_steps\.step_0 had 7"),
    (_set_step("state", {"x": 1.0}, obs=True), r"step_0: observation\.state is a dict .*expected a numeric vector"),
    (_set_step("state", ["a", "b"], obs=True), r"step_0: observation\.state is not numeric"),
    (lambda task, ep: task.update(task_id=10**30), r"task_0_bad\.pkl: task_id is 10000000000000000000000000000"),
    (lambda task, ep: task.update(task_id=1.7), r"task_0_bad\.pkl: task_id is 1\.7; expected an integer"),
    (lambda task, ep: task.update(task_id=-1), r"task_id is -1"),
    (lambda task, ep: ep["metadata"].update(success="maybe"), r"episode_0\.metadata: success is 'maybe', which is not "
                                                              "boolean-like"),
    (lambda task, ep: ep["metadata"].update(success=2), r"success is 2, which is not boolean-like"),
])
def test_bad_field_is_one_line_naming_file_episode_and_step(tmp_path, edit, match):
    d = _one_task(tmp_path, edit)
    with pytest.raises(ToolkitError, match=match) as err:
        _steps(d)
    assert "\n" not in str(err.value) and "task_0_bad.pkl" in str(err.value)


def test_bad_field_through_the_cli_leaves_no_store(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    d = tmp_path / "latents"
    write_latent_pickles(d, n_tasks=1, n_episodes=2, n_steps=3, n_layers=2, width=4, n_img=2)
    path = next(d.glob("*.pkl"))
    task = safe_pickle.load(path)
    task["episodes"]["episode_0"]["rollout_steps"]["step_5"]["action"] = np.zeros(9, np.float32)
    path.write_bytes(pickle.dumps(task, protocol=4))
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(cli, ["import", "--dataset", "libero", "--data", str(d), "--store", str(store),
                                   "--no-progress"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0
    assert "step_5: has 9 action values" in res.output and path.name in res.output
    assert not store.exists() and not list(tmp_path.glob(".*creating*"))


def test_success_words_are_mapped_explicitly(tmp_path):
    from toolkit.run.samples import iter_samples, sample_fields
    from toolkit.run.spec import RunSpec

    assert [fields.success(v, "") for v in (True, np.bool_(False), 1, 0.0, "no", "Yes", "FAILED", b"true", None)] == \
        [1, 0, 1, 0, 0, 1, 0, 1, -1]
    d = _one_task(tmp_path, lambda task, ep: ep["metadata"].update(success="no"))
    samples = list(iter_samples(LiberoDataset(str(d)), RunSpec(max_episodes=1, max_steps=1)))
    assert list(sample_fields(samples)["success"]) == [0]  # never bool("no") == True


def test_task_id_accepts_exact_integers_only():
    assert [fields.task_id(v, "") for v in (3, np.int64(4), 5.0, "6", np.array([7]))] == [3, 4, 5, 6, 7]
    for bad in (1.7, 10**30, -1, True, "x", None, float("nan")):
        with pytest.raises(ToolkitError, match="task_id is"):
            fields.task_id(bad, "f.pkl")


def test_images_are_bounded_before_conversion():
    with pytest.raises(ToolkitError, match=r"an image of shape \(40000, 50000, 3\) is out of bounds"):
        fields.image_shape((40000, 50000, 3), "x")
    fields.image_shape((1, 720, 1280, 3), "x")
    with pytest.raises(ToolkitError, match="expected \\(H, W, 3\\) uint8"):
        fields.image(np.zeros((4, 4, 3), np.float32), "x")


def test_pipeline_checks_third_party_steps_before_the_model_runs(tmp_path):
    """A dataset adapter that yields a 9-dim action after 7-dim ones: `toolkit extract` stops with one line
    naming the episode and step, before the model sees the batch, and no store is left."""
    from synthetic import SyntheticDataset, dataset_registered, registered

    from toolkit.sdk.adapters import Step

    class Ragged(SyntheticDataset):
        name = "ragged"

        def episodes(self):
            for ep in super().episodes():
                steps = list(ep.steps())
                steps[1] = Step(index=1, images=steps[1].images, state=steps[1].state,
                                action=np.zeros(9, np.float32))
                ep._steps = steps
                yield ep

    with registered(), dataset_registered(Ragged):
        with pytest.raises(ToolkitError, match=r"episode task_0/episode_0 step 1: has 9 action values, but "
                                               r"episode task_0/episode_0 step 0 had 7"):
            toolkit.extract(model="tinyvla", dataset="ragged", store=tmp_path / "s.zarr", batch_size=2)
    assert not (tmp_path / "s.zarr").exists()
