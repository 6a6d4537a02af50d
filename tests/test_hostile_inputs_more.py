"""Hostile input, continued (issue 21, "the store never lies"): damaged store metadata and coordinate chunks, bad
instructions and images, a lock left by an early failure, a tokenizer that asks to run its own code, and sites
whose streams have different widths.  Each bad input is one line (CLI: ``error: ...``, exit 2), no traceback, and
nothing half-written."""

from __future__ import annotations

import builtins
import pickle
import re
import shutil
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import SyntheticDataset, dataset_registered, registered
from test_hostile_inputs import _one_task, _set_step, _steps
from toolkit_plugins.libero.sample import write_latent_pickles

import toolkit
from toolkit.cli.main import cli
from toolkit.sdk import fields
from toolkit.sdk.errors import ToolkitError
from toolkit.store.chunks import CorruptStoreError


def _cli(*args: str):
    """``toolkit ARGS`` in this process: (exit code, output lines); a traceback fails the test."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output[-2000:]
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


def _one_error(args, *parts: str) -> str:
    code, lines = _cli(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def _nothing_left(store: Path) -> None:
    assert not store.exists(), store
    assert not list(store.parent.glob(f".{store.name}*")), list(store.parent.iterdir())  # no lock, no .creating-*


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 samples (3 tasks, 2 steps each), chunks of 2 samples, two streams of different widths per site."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, chunk_samples=2,
                        streams="resid_post,pre_mlp_norm_scale", dataset_options={"n_episodes": 1, "n_steps": 2})
    return path


@pytest.fixture
def copy(tiny, tmp_path):
    def make(name: str = "s.zarr") -> Path:
        return Path(shutil.copytree(tiny, tmp_path / name))
    return make


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 1. a garbage root zarr.json


@pytest.mark.parametrize("garbage, problem", [
    (b"\x00garbage", "JSONDecodeError"),
    (b'{"not": "zarr"', "JSONDecodeError"),
    (b'{"not": "zarr"}', "no Zarr v3 group metadata"),
])
def test_a_garbage_root_zarr_json_is_one_line_everywhere(copy, tmp_path, garbage, problem):
    store = copy()
    (store / "zarr.json").write_bytes(garbage)
    want = f"{store}: its root zarr.json is not valid Zarr metadata ("
    for args in (["info", store], ["info", store, "--json"], ["verify", store],
                 ["probe", store, "--site", "llm", "--out", tmp_path / "probe", "--no-progress"],
                 ["export", store, "--format", "npy", "--out", tmp_path / "npy"]):
        line = _one_error(args, want, problem)
        assert "re-extract it with --overwrite" in line
    with pytest.raises(ToolkitError, match="its root zarr.json is not valid Zarr metadata") as err:
        toolkit.open_store(store)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("attr, value, problem", [
    ("n_samples", "abc", "attribute n_samples is 'abc', expected a count"),
    ("n_samples", 10**6, "n_samples is 1000000 but its per-sample arrays hold 6"),
    ("sites", 5, "attribute sites is 5, expected a list of site names"),
    ("coordinates", 5, "attribute coordinates is 5"),
])
def test_root_attributes_of_the_wrong_type_are_one_line(copy, attr, value, problem):
    import json

    store = copy()
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"][attr] = value
    (store / "zarr.json").write_text(json.dumps(meta))
    _one_error(["info", store], "its root zarr.json is not valid Zarr metadata", problem)


# --------------------------------------------------------------------------- 2. a damaged coordinate chunk


@pytest.mark.parametrize("coord, commands", [
    ("episode", ("info", "probe", "export")),
    ("task", ("info", "probe", "export")),
    ("step", ("probe", "export")),
    ("instruction", ("export",)),
])
def test_a_damaged_coordinate_chunk_is_one_line_naming_it(copy, tmp_path, coord, commands):
    store = copy()
    _flip(store / coord / "c" / "1")
    chunk = f"chunk {coord}/c/1 (samples 2-3) is damaged (crc32c checksum mismatch"
    args = {"info": ["info", store],
            "probe": ["probe", store, "--site", "llm", "--out", tmp_path / "probe", "--no-progress"],
            "export": ["export", store, "--format", "npy", "--out", tmp_path / "npy"]}
    for command in commands:
        _one_error(args[command], f"{store}: {chunk}", f"toolkit verify {store}")
    with pytest.raises(CorruptStoreError, match=re.escape(chunk)) as err:
        toolkit.open_store(store).coord(coord)
    assert err.value.key == f"{coord}/c/1" and err.value.samples == (2, 3)
    if coord != "instruction":  # a coordinate (instruction is data): read as the xarray dataset is made
        with pytest.raises(CorruptStoreError, match=re.escape(chunk)):
            toolkit.open_store(store).dataset("llm")
    code, lines = _cli("verify", store)
    assert code == 1 and any(f"{coord}/c/1" in line for line in lines), lines


def test_a_damaged_site_copy_of_a_coordinate_is_listed_by_verify(copy):
    store = copy()
    _flip(store / "llm" / "task" / "c" / "0")
    code, lines = _cli("verify", store)
    assert code == 1 and any("llm/task/c/0" in line for line in lines), lines


# --------------------------------------------------------------------------- 3. instructions


HUGE = "x" * (50 * 2**20)


@pytest.mark.parametrize("value, match", [
    ("pick \udc80 up", r"instruction holds a lone surrogate '\\udc80' at character 5"),
    (b"pick it up", r"instruction is a bytes \(b'pick it up'\), expected a str \(decode it in the dataset adapter"),
    (["a", "b"], r"instruction is a list \(\['a', 'b'\]\), expected a str"),
    (HUGE, (r"instruction is 52,428,800 characters long \('xxx.*over the limit of 10,000 "
            r"\(toolkit\.sdk\.fields\.MAX_TEXT\); fix the dataset's instruction field")),
])
def test_instruction_checks(value, match):
    with pytest.raises(ToolkitError, match=match) as err:
        fields.text(value, "instruction", "f.pkl: episode e step 0")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert fields.text("pick the bowl", "instruction", "") == "pick the bowl"
    assert fields.MAX_TEXT == 10_000


def _bad_text_dataset(instruction, closed: bool = False):
    class BadText(SyntheticDataset):
        name = "badtext"
        closed_loop = closed

        def __init__(self, data=None, **options):
            options.pop("seed", None), options.pop("max_steps", None)  # the closed-loop options
            super().__init__(data, n_tasks=1, n_episodes=1, n_steps=2, **options)

        def episodes(self):
            for ep in super().episodes():
                ep.instruction = instruction
                yield ep

        def feedback(self, episode, step, actions):
            pass

    return BadText


@pytest.mark.parametrize("closed", [False, True], ids=["open-loop", "closed-loop"])
@pytest.mark.parametrize("value, match", [
    ("pick \udc80 up", r"episode task_0/episode_0 step 0: instruction holds a lone surrogate '\udc80'"),
    (b"pick it up", "episode task_0/episode_0 step 0: instruction is a bytes (b'pick it up'), expected a str"),
    (["a", "b"], "episode task_0/episode_0 step 0: instruction is a list (['a', 'b']), expected a str"),
    (HUGE, "episode task_0/episode_0 step 0: instruction is 52,428,800 characters long"),
])
def test_a_bad_instruction_stops_the_run_before_the_model_sees_it(tmp_path, monkeypatch, value, match, closed):
    """The text is checked before ``prepare`` (the tokenizer), open- and closed-loop, in one line; no store."""
    from toolkit_tinyvla import TinyVLAAdapter

    prepared = []
    monkeypatch.setattr(TinyVLAAdapter, "prepare", lambda self, batch: prepared.append(batch))
    store = tmp_path / "s.zarr"
    with registered(), dataset_registered(_bad_text_dataset(value, closed)):
        _one_error(["extract", store, "--model", "tinyvla", "--dataset", "badtext", "--batch-size", "1",
                    "--no-progress"], match)
    assert prepared == []
    _nothing_left(store)


@pytest.mark.parametrize("value, match", [
    (b"pick it up", r"task_0_bad\.pkl: task_description: instruction is a bytes \(b'pick it up'\)"),
    (["pick", "up"], r"task_0_bad\.pkl: task_description: instruction is a list"),
    ("pick \udc80 up", r"task_0_bad\.pkl: task_description: instruction holds a lone surrogate"),
])
def test_libero_refuses_an_instruction_that_is_not_text_instead_of_storing_its_repr(tmp_path, value, match):
    d = _one_task(tmp_path, lambda task, ep: task.update(task_description=value))
    with pytest.raises(ToolkitError, match=match):
        _steps(d)
    store = tmp_path / "s.zarr"
    with registered():
        _one_error(["extract", store, "--model", "tinyvla", "--dataset", "libero", "--data", d, "--no-progress"],
                   "task_0_bad.pkl: task_description: instruction ")
    _nothing_left(store)


# --------------------------------------------------------------------------- 4. non-finite images


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_float_image_is_refused_not_made_black(tmp_path, bad):
    img = np.full((8, 8, 3), 0.5, np.float32)
    img[2, 3, 1] = bad
    d = _one_task(tmp_path, _set_step("agentview_image", img, obs=True))
    match = (r"task_0_bad\.pkl: episodes\.episode_0\.rollout_steps\.step_0\.observation\.agentview_image: image "
             r"holds 1 NaN or infinite values \(of 192\); fix the dataset's images")
    with pytest.raises(ToolkitError, match=match):
        _steps(d)
    (tmp_path / "fine").mkdir()
    fine = _one_task(tmp_path / "fine", _set_step("agentview_image", np.full((8, 8, 3), 0.5, np.float32), obs=True))
    assert int(_steps(fine)[0].images["agentview"][0, 0, 0]) == 128  # finite floats in [0, 1] still convert


def test_non_finite_images_are_refused_by_the_sdk_helpers_and_rlds():
    from toolkit.sdk.hf import image_tensor
    from toolkit_plugins.rlds import RLDSDataset

    img = np.zeros((4, 4, 3), np.float64)
    img[0, 0, 0] = np.nan
    rlds = types.SimpleNamespace(keys={"image_key": "observation/image"})
    with pytest.raises(ToolkitError, match=r"ep 3 step 0: image_key='observation/image': image holds 1 NaN"):
        RLDSDataset._image(rlds, img, "image_key", "ep 3 step 0")
    with pytest.raises(ToolkitError, match="cam: image holds 1 NaN or infinite values"):
        fields.finite_image(img, "cam")
    with pytest.raises(ToolkitError, match="pi0: image holds 1 NaN"):
        image_tensor(img, (4, 4), "pi0")
    fields.finite_image(np.zeros((4, 4, 3), np.uint8), "cam")  # integer images cannot be NaN: not scanned


# --------------------------------------------------------------------------- 5. no lock left by an early failure


def test_a_failure_between_taking_the_lock_and_the_sample_loop_leaves_no_lock(tmp_path):
    """LIBERO's length_hint() reads every selected pickle after the writer took the lock and before Run.write's
    cleanup starts: a bad step found there used to leave ``.s.zarr.lock`` behind."""
    d = tmp_path / "latents"
    write_latent_pickles(d, n_tasks=1, n_episodes=2, n_steps=3, n_layers=2, width=4, n_img=2)
    path = next(d.glob("*.pkl"))
    task = pickle.loads(path.read_bytes())
    task["episodes"]["episode_0"]["rollout_steps"]["step_5"]["action"] = np.zeros(9, np.float32)
    path.write_bytes(pickle.dumps(task, protocol=4))
    store = tmp_path / "s.zarr"
    _one_error(["import", "--dataset", "libero", "--data", d, store, "--no-progress"], "step_5: has 9 action values")
    _nothing_left(store)


@pytest.mark.parametrize("where", ["total", "samples"])
def test_any_error_before_the_sample_loop_releases_the_lock(tmp_path, monkeypatch, where):
    from toolkit.run.pipeline import Run

    def fail(self, *a, **k):
        raise ToolkitError(f"{where} failed")

    monkeypatch.setattr(Run, where, fail)
    store = tmp_path / "s.zarr"
    with registered():
        _one_error(["extract", store, "--model", "tinyvla", "--dataset", "synthetic", "--no-progress"],
                   f"{where} failed")
    _nothing_left(store)


# --------------------------------------------------------------------------- 6. no remote code without the flag


def _remote_code_tokenizer(directory: Path) -> Path:
    """A tokenizer directory whose config names its own Python class; importing it writes MARKER."""
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", null]}}')
    (directory / "evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('ran')\n"
        "from transformers import PreTrainedTokenizer\nclass EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    return directory


def _no_prompt(monkeypatch) -> list:
    """``input()`` answers yes and records the call: a prompt would run the code."""
    asked: list = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    return asked


def test_pi0_never_runs_a_tokenizers_own_code_without_trust_remote_code(tmp_path, monkeypatch):
    from toolkit_plugins.pi0.adapter import Pi0Adapter

    tok = _remote_code_tokenizer(tmp_path / "tok")
    asked = _no_prompt(monkeypatch)
    fake = types.SimpleNamespace(opts={"tokenizer": str(tok)}, trust_remote_code=False)
    with pytest.raises(ToolkitError, match=rf"pi0 tokenizer={tok} cannot be loaded \(ValueError: .*custom code"):
        Pi0Adapter._load_tokenizer(fake, None)
    assert asked == [] and not (tok / "MARKER").exists()


def test_text_encoders_never_run_a_directorys_own_code(tmp_path, monkeypatch):
    from toolkit_plugins.targets import _load

    tok = _remote_code_tokenizer(tmp_path / "enc")
    asked = _no_prompt(monkeypatch)
    with pytest.raises(ValueError, match="custom code"):
        _load("minilm", str(tok))
    assert asked == [] and not (tok / "MARKER").exists()


@pytest.mark.slow
def test_extract_refuses_a_remote_code_tokenizer_with_stdin_closed(tmp_path):
    """The whole command, in a child process with no stdin: one line, no prompt, the code never runs."""
    import subprocess
    import sys

    tok = _remote_code_tokenizer(tmp_path / "tok")
    store = tmp_path / "s.zarr"
    proc = subprocess.run([sys.executable, "-m", "toolkit", "extract", str(store), "--model", "pi0", "--dataset",
                           "libero", "--max-episodes", "1", "--max-steps", "1", "--model-option", f"tokenizer={tok}",
                           "--no-progress"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                          check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert f"pi0 tokenizer={tok} cannot be loaded" in errors[0]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not (tok / "MARKER").exists()
    _nothing_left(store)


# --------------------------------------------------------------------------- 7. streams of different widths


def test_every_stream_of_a_site_opens_in_plain_xarray_and_in_store_dataset(tiny):
    xr = pytest.importorskip("xarray")

    s = toolkit.open_store(tiny)
    assert s.dims("llm", "resid_post")[-1] == "feature"
    assert s.dims("llm", "pre_mlp_norm_scale")[-1] == "feature_pre_mlp_norm_scale"  # named so when written
    for site in s.sites:
        plain = xr.open_zarr(tiny, group=site)  # without the toolkit
        ds = s.dataset(site)
        for d in (plain, ds):
            assert set(d.data_vars) == {"resid_post", "pre_mlp_norm_scale"}
            assert d.sizes["feature"] == 32 and d.sizes["feature_pre_mlp_norm_scale"] == 1
        np.testing.assert_array_equal(ds["pre_mlp_norm_scale"].values, s.read(site, "pre_mlp_norm_scale"))
        assert plain["resid_post"].shape == s.read(site, "resid_post").shape
    assert set(s.dataset().children) == {"llm", "text"}


def test_an_older_store_whose_streams_share_feature_still_opens(tmp_path):
    """Stores written before the dimension names were per stream: Store.dataset renames the odd widths."""
    pytest.importorskip("xarray")
    from toolkit.store.layout import ArraySpec
    from toolkit.store.writer import StoreWriter

    path = tmp_path / "old.zarr"
    w = StoreWriter(path)
    dims = ("layer", "token", "feature")
    w.initialize({"model": "m"},
                 [ArraySpec("vlm/resid_post", (2, 1, 8), "float32", dims),
                  ArraySpec("vlm/pre_mlp_norm_scale", (2, 1, 1), "float32", dims),
                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.array([0, 1], np.int32))}, ["episode"], chunk_samples=2)
    w.append({"vlm/resid_post": np.ones((3, 2, 1, 8), np.float32),
              "vlm/pre_mlp_norm_scale": np.full((3, 2, 1, 1), 2, np.float32), "episode": np.arange(3, dtype=np.int32)})
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = toolkit.open_store(path).dataset("vlm")
    assert ds["resid_post"].dims[-1] == "feature" and ds["pre_mlp_norm_scale"].dims[-1] == "feature_pre_mlp_norm_scale"
    assert float(ds["pre_mlp_norm_scale"].sum()) == 12.0


def test_the_feature_dimension_rule():
    from toolkit.run.layout import feature_dim, main_width

    assert main_width([64, 1, 1], 64) == 64  # the hidden size wins where a stream has it
    assert main_width([1, 1, 256], 64) == 1  # else the width most streams have
    assert main_width([256, 1], 64) == 256  # ties: the widest
    assert feature_dim("resid_post", 64, 64) == "feature"
    assert feature_dim("pre_mlp_norm_scale", 1, 64) == "feature_pre_mlp_norm_scale"
