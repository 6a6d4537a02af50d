"""--episodes (a run option added after the run specification was introduced: it touched the spec and the code that
uses it, toolkit/run/spec.py and toolkit/run/samples.py, and nothing else): the CLI, the API, the progress total,
resume and one-line errors all follow from the spec."""

import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from synthetic import registered
from toolkit.cli import cli
from toolkit.run.samples import expected_samples, run_episodes
from toolkit.run.spec import RunSpec

OPTS = ["--model", "tinyvla", "--dataset", "synthetic", "--site", "llm", "--layer", "-1", "--dtype", "float32",
        "--dataset-option", "n_steps=2", "--no-progress"]


def test_episodes_picks_dataset_positions_through_the_cli_and_the_api(tmp_path):
    with registered():
        res = CliRunner().invoke(cli, ["extract", str(tmp_path / "cli.zarr"), "--episodes", "1,4-5", *OPTS])
        assert res.exit_code == 0, res.output
        api = toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "api.zarr", sites=["llm"],
                              layers="-1", dtype="float32", dataset_options={"n_steps": 2}, episodes="1,4-5")
    a, b = toolkit.open_store(tmp_path / "cli.zarr"), toolkit.open_store(api)
    keys = list(dict.fromkeys(str(k) for k in a.coord("episode_key")))
    assert keys == ["task_0/episode_1", "task_2/episode_0", "task_2/episode_1"]  # positions 1, 4, 5 of 6
    assert a.attrs["run_spec"]["episodes"] == "1,4-5" and a.n_samples == 6
    np.testing.assert_array_equal(a.read("llm.layers.-1.resid_post"), b.read("llm.layers.-1.resid_post"))


def test_episodes_with_max_episodes_and_the_progress_total():
    from synthetic import SyntheticDataset

    ds = SyntheticDataset(n_steps=3)
    spec = RunSpec(episodes="0,2-5", max_episodes=3)
    assert [ep.key for ep in run_episodes(ds, spec)] == ["task_0/episode_0", "task_1/episode_0",
                                                         "task_1/episode_1"]
    ds.length_hint = lambda: [3] * 6
    assert expected_samples(ds, spec) == 9


def test_resume_keeps_the_episode_selection_and_refuses_another(tmp_path):
    path = tmp_path / "s.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], episodes="0-1",
                        dataset_options={"n_steps": 2})
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], episodes="0-1",
                        dataset_options={"n_steps": 2}, resume=True)
        with pytest.raises(toolkit.ToolkitError, match="episodes='0-1', this run uses episodes='0-2'"):
            toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], episodes="0-2",
                            dataset_options={"n_steps": 2}, resume=True)


@pytest.mark.parametrize("value, says", [("-1", "use non-negative numbers and closed ranges"),
                                         ("x", "malformed episode selection 'x'")])
def test_a_bad_episode_selection_is_one_line_before_anything_runs(tmp_path, value, says):
    res = CliRunner().invoke(cli, ["extract", str(tmp_path / "s.zarr"), "--episodes", value, *OPTS])
    assert res.exit_code == 2 and says in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "s.zarr").exists()
    assert "--episodes" in CliRunner().invoke(cli, ["extract", "--help"]).output
