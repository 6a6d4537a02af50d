"""The store never lies: `verify --repair` and `extract --resume` check the data gives the store's samples before
they change anything.  Cases (a)-(e) of the issue, on a small LIBERO pickle dataset and the tiny random pi0: each
refusal is one line (exit 2) and leaves every file of the store byte-identical (repair) or the store not marked
complete (resume); an honest repair still restores the store bit for bit."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from toolkit.cli.main import cli
from toolkit.store.layout import write_consolidated
from toolkit.store.reader import open_store
from synthetic import write_libero_pickles as write_data

ARGS = ["--model", "pi0", "--dataset", "libero", "--data", "data", "--max-steps", "3", "--chunk-samples", "4",
        "--batch-size", "2", "--no-progress"]
N = 36  # 3 task pickles x 4 episodes x 3 steps


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A folder with the data (relative: the store records ``data``) and the store extracted from it."""
    d = tmp_path_factory.mktemp("clean")
    write_data(d / "data")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        toolkit.extract(model="pi0", dataset="libero", data="data", max_steps=3, chunk_samples=4, batch_size=2,
                        store="s.zarr")
    finally:
        os.chdir(cwd)
    assert open_store(d / "s.zarr").n_samples == N
    return d


@pytest.fixture
def case(clean, tmp_path, monkeypatch):
    d = tmp_path / "case"
    shutil.copytree(clean, d)
    monkeypatch.chdir(d)
    return d


def fingerprint(store):
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def flip(store, chunk, array="vlm/resid_post"):
    f = min(p for p in (store / array / "c" / str(chunk)).rglob("*") if p.is_file())
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 16):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def remove_task(data, task):
    next(data.glob(f"task_{task}_*.pkl")).unlink()


def one_error(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def refused_repair(case, *, chunk=1):
    store = case / "s.zarr"
    flip(store, chunk)
    before = fingerprint(store)
    line = one_error(CliRunner().invoke(cli, ["verify", "--repair", "s.zarr"]))
    assert line.startswith("error: cannot repair s.zarr: ") and line.endswith("(the store is unchanged)"), line
    assert fingerprint(store) == before  # byte-identical: nothing rolled back, nothing rewritten
    return line


def test_a_repair_refuses_when_a_pickle_is_gone(case):
    remove_task(case / "data", 1)
    line = refused_repair(case)
    assert ("sample 12 differs: the store has task_1/episode_0 step 0, the data gives task_2/episode_0 step 0; "
            "restore the data it was made from (data) or re-extract with --overwrite") in line


def test_b_repair_refuses_when_an_episode_is_gone(case):
    for p in (case / "data").glob("*.pkl"):
        p.unlink()
    write_data(case / "data", drop_episode=(1, 2))
    line = refused_repair(case)
    assert "sample 18 differs: the store has task_1/episode_2 step 0, the data gives task_1/episode_3 step 0" in line


def test_c_repair_refuses_a_chunk_past_the_data_end(case):
    remove_task(case / "data", 2)
    line = refused_repair(case, chunk=7)  # samples 28-31: the data now ends at 24
    assert "it holds 36 committed samples but the data now gives 24; restore the data" in line


def test_d_repair_refuses_before_rolling_back_when_the_data_is_gone(case):
    shutil.rmtree(case / "data")
    line = refused_repair(case)
    assert "its run cannot be made again: no such directory data" in line
    assert open_store(case / "s.zarr").n_samples == N and open_store(case / "s.zarr").complete


def test_repair_refuses_before_rolling_back_when_the_model_is_gone(case):
    root = json.loads((case / "s.zarr/zarr.json").read_text())
    root["attributes"]["run_spec"]["checkpoint"] = str(case / "gone")  # a checkpoint folder removed since
    (case / "s.zarr/zarr.json").write_text(json.dumps(root))
    line = refused_repair(case)
    assert "its run cannot be made again: pi0 checkpoint" in line and "does not exist" in line


def test_repair_of_a_closed_loop_store_is_refused_without_the_simulator(case):
    from synthetic import register_libero_sim

    register_libero_sim()
    root = json.loads((case / "s.zarr/zarr.json").read_text())
    root["attributes"]["run_spec"]["dataset"] = "libero-sim"
    (case / "s.zarr/zarr.json").write_text(json.dumps(root))
    line = refused_repair(case)
    assert "closed-loop simulator run (dataset 'libero-sim')" in line and "--overwrite" in line


def test_repair_with_the_data_intact_restores_the_store_bit_for_bit(case, clean):
    flip(case / "s.zarr", 2)
    flip(case / "s.zarr", 8, "action/resid_post")
    res = CliRunner().invoke(cli, ["verify", "--repair", "s.zarr"])
    assert res.exit_code == 0, res.output
    assert res.output.count("repaired ") == 2 and "ok: " in res.output
    a, b = open_store(clean / "s.zarr"), open_store(case / "s.zarr")
    assert b.complete and b.n_samples == N
    for f in a.fields():
        assert np.array_equal(a.coord(f), b.coord(f)), f
    for site in a.sites:
        for stream in a.streams(site):
            np.testing.assert_array_equal(a.read(site, stream), b.read(site, stream))


def test_e_resume_refuses_an_interrupted_store_whose_data_shrank(case):
    write_consolidated(case / "s.zarr", 28, False)  # as if killed after 28 committed samples
    remove_task(case / "data", 2)  # the data now gives 24
    line = one_error(CliRunner().invoke(cli, ["extract", "s.zarr", *ARGS, "--resume"]))
    assert line == ("error: cannot resume s.zarr: it holds 28 committed samples but the data now gives 24; restore "
                    "the data it was made from (data) or re-extract with --overwrite")
    s = open_store(case / "s.zarr", warn_incomplete=False)
    assert s.n_samples == 28 and not s.complete  # never marked complete


def test_e_resume_refuses_samples_that_differ(case):
    write_consolidated(case / "s.zarr", 28, False)
    for p in (case / "data").glob("*.pkl"):
        p.unlink()
    write_data(case / "data", drop_episode=(1, 2))
    line = one_error(CliRunner().invoke(cli, ["extract", "s.zarr", *ARGS, "--resume"]))
    assert line.startswith("error: cannot resume s.zarr: sample 18 differs: the store has task_1/episode_2 step 0, "
                           "the data gives task_1/episode_3 step 0; restore the data"), line


def test_e_resume_of_a_complete_store_says_so_and_writes_nothing(case):
    before = fingerprint(case / "s.zarr")
    res = CliRunner().invoke(cli, ["extract", "s.zarr", *ARGS, "--resume"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("s.zarr was already complete: nothing to resume, nothing written"), last
    assert "wrote" not in res.output
    assert fingerprint(case / "s.zarr") == before


def test_e_resume_of_a_complete_store_whose_data_grew_is_refused(case):
    write_data(case / "data", tasks=(3,))
    before = fingerprint(case / "s.zarr")
    line = one_error(CliRunner().invoke(cli, ["extract", "s.zarr", *ARGS, "--resume"]))
    assert line.startswith("error: cannot resume s.zarr: it is complete with 36 samples but the data now gives more "
                           "(sample 36 would be task_3/episode_0 step 0)"), line
    assert fingerprint(case / "s.zarr") == before
