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


@pytest.mark.slow  # the README's main job, end to end in a process of its own
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


@pytest.mark.slow
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
    pytest.param(["--tokens", "vlm=pixels"], "unknown name 'pixels'; names:", marks=pytest.mark.slow),  # builds pi0
    (["--sites", "brain"], "has no site 'brain'; sites:"),
    (["--streams", "nope"], "has no stream 'nope'"),
    pytest.param(["--max-episodes", "0"], "empty", marks=pytest.mark.slow),  # builds pi0
])
def test_bad_input_gets_one_line_a_nonzero_exit_and_no_store(tmp_path, args, message):
    res = toolkit_cli("extract", "--store", "s.zarr", *args, "--no-progress", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], res.stderr
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow  # builds pi0 in a process of its own before it reads the data
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


# --------------------------------------------------------------------------- one spelling everywhere


def _invoke(*args):
    from click.testing import CliRunner

    from synthetic import registered
    from toolkit.cli.main import cli

    with registered():
        return CliRunner().invoke(cli, [str(a) for a in args])


TINY = ("--model", "tinyvla", "--dataset", "synthetic", "--dataset-option", "n_tasks=1", "--dataset-option",
        "n_episodes=1", "--dataset-option", "n_steps=2", "--dtype", "float32", "--no-progress")


def test_the_store_is_positional_and_old_spellings_still_work(tmp_path, pi0_single_thread):
    new = _invoke("extract", tmp_path / "new.zarr", *TINY, "--site", "llm", "--layer", "-1", "--stream", "resid_post")
    old = _invoke("extract", "--store", tmp_path / "old.zarr", *TINY, "--sites", "llm", "--layers", "2",
                  "--streams", "resid_post")
    assert new.exit_code == 0 and old.exit_code == 0, new.output + old.output
    a, b = toolkit.open_store(tmp_path / "new.zarr"), toolkit.open_store(tmp_path / "old.zarr")
    assert a.sites == b.sites == ["llm"] and a.layers("llm") == b.layers("llm") == [2]
    assert (a.read("llm", "resid_post") == b.read("llm", "resid_post")).all()


def test_a_hook_name_selects_site_layer_and_stream(tmp_path, pi0_single_thread):
    res = _invoke("extract", tmp_path / "h.zarr", *TINY, "--hook", "llm.layers.0-1.resid_mid",
                  "--hook", "blocks.2.hook_resid_mid")
    assert res.exit_code != 0 and "several" in res.output  # tinyvla has two sites: 'blocks' is ambiguous
    res = _invoke("extract", tmp_path / "h.zarr", *TINY, "--hook", "llm.layers.0-1.resid_mid",
                  "--hook", "llm.layers.-1.resid_*")
    assert res.exit_code == 0, res.output
    s = toolkit.open_store(tmp_path / "h.zarr")
    assert s.sites == ["llm"] and s.layers("llm") == [0, 1, 2]
    assert s.streams("llm") == ["resid_mid", "resid_post", "resid_pre"]  # every chosen stream at every chosen layer


@pytest.mark.parametrize("args, message", [
    (["extract", "a.zarr", "--store", "b.zarr"], "two stores given"),
    (["import", "--dataset", "libero"], "missing STORE"),
    (["--threads", "0", "info", "x.zarr"], "--threads must be at least 1"),
])
def test_store_and_thread_mistakes_are_one_line(tmp_path, args, message):
    res = _invoke(*args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_extract_help_lists_the_chosen_adapters_options_and_plugin_flags():
    out = _invoke("extract", "--model", "tinyvla", "--dataset", "libero-sim", "--help").output
    assert "--model-option KEY=VALUE of tinyvla" in out and "layers=int" in out and "[default: 3]" in out
    assert "--dataset-option KEY=VALUE of libero-sim" in out and "replan_steps=int" in out
    assert "--save-video" in out and "--tiny-layers" in out  # flags contributed by plugins


def test_the_core_cli_names_no_plugin_flag():
    import inspect

    import toolkit.cli.main

    src = inspect.getsource(toolkit.cli.main)
    assert not any(flag in src for flag in ("--suite", "--trials", "--replan-steps", "--save-video"))


def test_a_run_can_be_given_as_one_spec_object(tmp_path, pi0_single_thread):
    from synthetic import registered
    from toolkit.run.spec import RunSpec

    spec = RunSpec(model="tinyvla", dataset="synthetic", sites=["llm"], layers="-1", dtype="float32", max_episodes=1,
                   dataset_options={"n_tasks": 1, "n_episodes": 1, "n_steps": 2})
    with registered():
        a = toolkit.open_store(toolkit.extract(spec, tmp_path / "spec.zarr"))
        b = toolkit.open_store(toolkit.extract(store=tmp_path / "kw.zarr", **spec.model_dump()))
        with pytest.raises(toolkit.ToolkitError, match="already exists"):
            toolkit.extract(spec, tmp_path / "spec.zarr")
        toolkit.extract(spec, tmp_path / "spec.zarr", overwrite=True)
    assert a.layers("llm") == b.layers("llm") == [2]
    assert (a.read("llm", "resid_post") == b.read("llm", "resid_post")).all()
    # the store records the spec; it rebuilds the same run
    assert RunSpec.from_store(a.attrs["run_spec"]) == spec
