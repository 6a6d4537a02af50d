"""Integrity: a flipped byte, a truncated chunk and a deleted chunk are one line naming the chunk in verify, probe,
stats and export; verify --repair re-extracts them bit-identically."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from synthetic import registered
from toolkit.cli.main import cli
from toolkit.store.chunks import CorruptStoreError, read_chunk
from toolkit.store.reader import open_store

KEY = "llm/resid_post/c/1/0/0/0"  # samples 4-7, layer 0 of the llm site


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "clean.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, chunk_samples=4, sites=["llm"],
                        dtype="float32", pool="mean")
    return path


def flip(f):
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 16):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def truncate(f):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def delete(f):
    f.unlink()


DAMAGE = {"flipped": (flip, "crc32c checksum mismatch"), "truncated": (truncate, "crc32c checksum mismatch"),
          "deleted": (delete, "missing")}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, clean, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(clean, path)
    how, problem = DAMAGE[request.param]
    how(path / KEY)
    return path, problem


def _one_error_line(res):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_read_chunk_names_the_chunk(damaged):
    path, problem = damaged
    s = open_store(path)
    with pytest.raises(CorruptStoreError, match=f"chunk {KEY} \\(samples 4-7\\) is .*{problem}.*toolkit verify"):
        read_chunk(s.array("llm", "resid_post"), (1, 0))
    with pytest.raises(CorruptStoreError, match=KEY):
        s.read("llm", "resid_post", layer=0)
    good = read_chunk(s.array("llm", "resid_post"), (2, 0))
    np.testing.assert_array_equal(good, s.array("llm", "resid_post").zarr[8:12, 0:1])


@pytest.mark.parametrize("command", ["stats", "export", "probe"])
def test_readers_fail_with_one_line_naming_the_chunk(damaged, command, tmp_path):
    path, problem = damaged
    args = {"stats": ["stats", str(path), "--site", "llm", "--json"],
            "export": ["export", str(path), "--out", str(tmp_path / "out"), "--site", "llm"],
            "probe": ["probe", "--store", str(path), "--site", "llm", "--out", str(tmp_path / "p")]}[command]
    with registered():
        line = _one_error_line(CliRunner().invoke(cli, args))
    assert KEY in line and problem in line and "toolkit verify" in line


def test_verify_lists_the_bad_chunk(damaged):
    path, problem = damaged
    res = CliRunner().invoke(cli, ["verify", str(path)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[0] == f"bad {KEY} (samples 4-7): " + lines[0].split(": ", 1)[1] and problem in lines[0]
    assert lines[1].startswith("error: 1 of ") and "samples 4-7" in lines[1] and len(lines) == 2
    res = CliRunner().invoke(cli, ["verify", str(path), "--json"])
    import json

    report = json.loads(res.output)
    assert [b["chunk"] for b in report["bad"]] == [KEY] and report["bad"][0]["samples"] == [4, 7]


def test_verify_passes_a_clean_store(clean):
    res = CliRunner().invoke(cli, ["verify", str(clean)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ok: ") and "30 samples committed, all checksums match" in res.output


def test_verify_repair_re_extracts_bit_identically(clean, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(clean, path)
    flip(path / KEY)
    delete(path / "llm/resid_post/c/5/0/0/0")
    with registered():
        res = CliRunner().invoke(cli, ["verify", str(path), "--repair"])
    assert res.exit_code == 0, res.output
    assert res.output.count("repaired ") == 2 and "ok: " in res.output
    a, b = open_store(clean), open_store(path)
    assert b.complete and b.n_samples == a.n_samples == 30
    np.testing.assert_array_equal(a.read("llm", "resid_post"), b.read("llm", "resid_post"))
    for f in a.fields():
        assert np.array_equal(a.coord(f), b.coord(f)), f


def _bad_lines(res):
    return [line for line in res.output.splitlines() if line.startswith("bad ")]


def test_verify_quick_checks_metadata_and_presence_without_reading(clean, tmp_path):
    res = CliRunner().invoke(cli, ["verify", str(clean), "--quick"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ok (quick check): metadata consistent, ") and "not read, decoded or checksummed" \
        in res.output
    path = tmp_path / "q.zarr"
    shutil.copytree(clean, path)
    flip(path / KEY)  # contents: not what a quick check looks at
    assert CliRunner().invoke(cli, ["verify", str(path), "--quick"]).exit_code == 0
    delete(path / "llm/resid_post/c/5/0/0/0")
    (path / "llm/resid_post/c/6/0/0/0").write_bytes(b"\x00\x01")
    res = CliRunner().invoke(cli, ["verify", str(path), "--quick"])
    assert res.exit_code == 1, res.output
    assert _bad_lines(res) == ["bad llm/resid_post/c/5/0/0/0 (samples 20-23): missing",
                               "bad llm/resid_post/c/6/0/0/0 (samples 24-27): too short (2 bytes: no more than its "
                               "checksum)"]
    assert res.output.splitlines()[-1].startswith("error: 2 of ") and "(quick check, 30 samples committed" in \
        res.output.splitlines()[-1]
    line = _one_error_line(CliRunner().invoke(cli, ["verify", str(path), "--quick", "--repair"]))
    assert "--quick and --repair exclude each other" in line


def _edit_json(f, change):
    meta = json.loads(f.read_text())
    change(meta)
    f.write_text(json.dumps(meta))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_verify_fails_on_a_shrunken_array_zarr_json(clean, tmp_path, quick):
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    _edit_json(path / "llm/resid_post/zarr.json", lambda m: m["shape"].__setitem__(0, 20))
    res = CliRunner().invoke(cli, ["verify", str(path), *(["--quick"] if quick else [])])
    assert res.exit_code == 1, res.output
    assert _bad_lines(res) == ["bad llm/resid_post/zarr.json: gives 20 samples along sample, fewer than the 30 "
                               "committed (a reader that skips the consolidated metadata sees fewer)"]
    assert res.output.splitlines()[-1].startswith("error: 1 metadata file is bad ")
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with registered():  # metadata is not re-extracted: refused, nothing changed
        line = _one_error_line(CliRunner().invoke(cli, ["verify", str(path), "--repair"]))
    assert "cannot repair" in line and "llm/resid_post/zarr.json" in line and "(the store is unchanged)" in line
    assert before == {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_verify_fails_on_a_missing_or_unparseable_array_zarr_json(clean, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    (path / "llm/resid_post/zarr.json").unlink()
    (path / "step/zarr.json").write_text("{not json")
    res = CliRunner().invoke(cli, ["verify", str(path)])
    assert res.exit_code == 1, res.output
    bad = _bad_lines(res)
    assert bad[0] == "bad llm/resid_post/zarr.json: is missing"
    assert bad[1].startswith("bad step/zarr.json: is unparseable (") and len(bad) == 2


def test_verify_reports_any_error_while_reading_as_bad(clean, monkeypatch):
    import toolkit.store.verify as v

    real = v.read_chunk

    def failing(arr, coords):
        if arr.store_path.path == "llm/resid_post" and coords[0] == 2:
            raise ValueError("codec exploded\nsecond line")
        return real(arr, coords)

    monkeypatch.setattr(v, "read_chunk", failing)
    res = CliRunner().invoke(cli, ["verify", str(clean)])
    assert res.exit_code == 1, res.output
    assert _bad_lines(res) == [f"bad llm/resid_post/c/2/{l}/0/0 (samples 8-11): unreadable (ValueError: codec "
                               "exploded)" for l in range(3)]


@pytest.mark.parametrize("root", [b"{not json", b"[1, 2]", b'{"zarr_format": 3, "node_type": "group"}'],
                         ids=["garbage", "a list", "no attributes"])
def test_verify_of_a_store_it_cannot_open_is_one_line(clean, tmp_path, root):
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    (path / "zarr.json").write_bytes(root)
    line = _one_error_line(CliRunner().invoke(cli, ["verify", str(path)]))
    assert str(path) in line
