"""The CLI end to end: the main job on embedded defaults, help, and one-line errors for bad input."""

import pickle
import subprocess
import sys

import pytest

import toolkit


def toolkit_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`toolkit extract --model pi0 --dataset libero --store ...` on the embedded defaults."""
    d = tmp_path_factory.mktemp("main")
    res = toolkit_cli("extract", "--model", "pi0", "--dataset", "libero", "--store", "stores/libero.zarr",
                      "--max-episodes", "4", cwd=d)
    return d, res


def test_the_main_job_runs_on_embedded_defaults_and_announces_the_random_model(main_job):
    d, res = main_job
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "random" in line.lower()]
    assert len(warnings) == 1, res.stderr
    s = toolkit.open_store(d / "stores" / "libero.zarr")
    assert s.complete and s.sites == ["action", "text_only", "vlm"]
    assert s.n_samples == 4 * 6
    assert s.dims("action", "resid_post") == ("sample", "layer", "denoise", "token", "feature")
    assert s.coord("instruction")[0] == "pick up the alphabet soup and place it in the basket"


def test_info_prints_a_human_summary(main_job):
    d, _ = main_job
    res = toolkit_cli("info", "stores/libero.zarr", cwd=d)
    assert res.returncode == 0
    assert "model     pi0  checkpoint=random init" in res.stdout
    assert "site action" in res.stdout and "denoise=10" in res.stdout


def test_help_has_examples():
    out = toolkit_cli("extract", "--help").stdout
    assert "Examples:" in out and "--resume" in out and "--layers" in out


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'; known datasets:"),
    (["--data", "does/not/exist"], "does/not/exist"),
    (["--layers", "99"], "layer 99 is out of range: available layers at site"),
    (["--tokens", "vlm=pixels"], "unknown name 'pixels'; names:"),
    (["--sites", "brain"], "has no site 'brain'; sites:"),
    (["--streams", "nope"], "has no stream 'nope'"),
    (["--max-episodes", "0"], "empty"),
])
def test_bad_input_gets_one_line_a_nonzero_exit_and_no_store(tmp_path, args, message):
    res = toolkit_cli("extract", "--store", "s.zarr", *args, "--no-progress", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], res.stderr
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "s.zarr").exists()


def test_a_malformed_pickle_names_the_file_and_the_key(tmp_path):
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "task_0_x.pkl", "wb") as f:
        pickle.dump({"task_name": "x", "task_id": 0, "task_description": "do x"}, f)
    res = toolkit_cli("extract", "--data", "data", "--store", "s.zarr", "--no-progress", cwd=tmp_path)
    assert res.returncode == 2
    assert "task_0_x.pkl" in res.stderr and "episodes" in res.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_an_empty_data_directory_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    res = toolkit_cli("extract", "--data", "data", "--store", "s.zarr", cwd=tmp_path)
    assert res.returncode == 2 and "error:" in res.stderr and not (tmp_path / "s.zarr").exists()
