"""The Zarr store: layout, lossless bfloat16, lazy readers without toolkit, commits and truncation."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import toolkit
from synthetic import registered
from toolkit.sdk.errors import ToolkitError
from toolkit.store.codecs import decode


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "run.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, chunk_samples=4, pool=["none", "llm=mean"],
                        streams="resid_post,resid_mid", dtype="float32")
    return path


def test_store_describes_itself(store):
    root = zarr.open_group(str(store), mode="r")
    attrs = root.attrs.asdict()
    assert attrs["format"] == "toolkit-activations" and attrs["complete"] is True
    assert attrs["model"]["name"] == "tinyvla" and attrs["dataset"]["name"] == "synthetic"
    assert attrs["toolkit_version"] == toolkit.__version__
    assert attrs["capture"]["sites"][0]["streams"] == ["resid_post", "resid_mid"]
    arr = root["text/resid_post"]
    assert arr.metadata.dimension_names == ("sample", "layer", "token", "feature")
    assert arr.chunks == (4, 1, 24, 32)  # N samples x one layer: the probe's access pattern
    assert arr.shape == (30, 3, 24, 32)
    assert list(root["text/token"][:]) == list(range(4, 28))
    assert list(root["llm/token"][:]) == [-1]


def test_coordinates_follow_the_samples(store):
    s = toolkit.open_store(store)
    assert s.n_samples == 30
    assert list(s.coord("episode")[:6]) == [0, 0, 0, 0, 0, 1]
    assert list(s.coord("step")[:6]) == [0, 1, 2, 3, 4, 0]
    assert s.coord("task")[0] == "task 0" and s.coord("instruction")[29] == "pick up object number 2"
    assert list(s.coord("success")[::5]) == [0, 1, 1, 0, 0, 1]
    assert s.coord("dataset_action").shape == (30, 7)


def test_xarray_and_dask_read_the_store_without_toolkit(store):
    code = f"""
import sys, xarray as xr, dask.array as da
root = xr.open_zarr({str(store)!r})
site = xr.open_zarr({str(store)!r}, group="text")
x = site["resid_post"].sel(layer=2)
lazy = da.from_zarr({str(store)!r}, component="text/resid_post")
print(sorted(root.coords), x.dims, x.shape, int(x["episode"][7]), site["layer"].values.tolist(),
      lazy.chunksize, float(lazy[:, 2].sum().compute()), "toolkit" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True)
    assert "arning" not in res.stderr, res.stderr  # consolidated metadata: xarray opens the store silently
    out = res.stdout.split("\n")[0]
    expected_sum = float(toolkit.open_store(store).read("text", "resid_post", layer=2).sum())
    coords, rest = out.split("]", 1)
    assert coords == "['episode', 'step', 'success', 'task', 'task_id'"
    assert "('sample', 'token', 'feature') (30, 24, 32) 1 [0, 1, 2] (4, 1, 24, 32)" in rest
    assert rest.strip().endswith("False")
    assert float(rest.split()[-2]) == pytest.approx(expected_sum, rel=1e-5)


def test_bfloat16_is_stored_losslessly_and_decoded_on_read(tmp_path):
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "f32.zarr", sites=["llm"],
                        dtype="float32", pool="none")
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "bf16.zarr", sites=["llm"],
                        dtype="bfloat16", pool="none")
    full = toolkit.open_store(tmp_path / "f32.zarr").read("llm", "resid_post")
    bf = toolkit.open_store(tmp_path / "bf16.zarr")
    raw = bf.array("llm", "resid_post")
    assert raw.dtype == np.uint16 and raw.attrs["stored_dtype"] == "bfloat16"
    expected = torch.from_numpy(full).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf.read("llm", "resid_post"), expected)
    assert decode(np.array([0x3F80], np.uint16), "bfloat16")[0] == 1.0


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_codecs_round_trip(tmp_path, codec):
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "a.zarr", sites=["llm"], codec=codec,
                        dtype="float32")
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "b.zarr", sites=["llm"], codec="zstd",
                        dtype="float32")
    a, b = (toolkit.open_store(tmp_path / n).read("llm", "resid_post") for n in ("a.zarr", "b.zarr"))
    np.testing.assert_array_equal(a, b)


def test_an_existing_store_needs_resume_or_overwrite(store):
    with registered(), pytest.raises(ToolkitError, match="already exists: pass --resume .* or --overwrite"):
        toolkit.extract(model="tinyvla", dataset="synthetic", store=store)


def test_resume_truncates_an_uncommitted_block_and_completes_the_run(tmp_path):
    with registered():
        ref = toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "ref.zarr", chunk_samples=4)
        part = toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "part.zarr", chunk_samples=4)
        root = zarr.open_group(str(part), mode="r+")
        # Simulate a run killed after 12 committed samples, mid-way through writing the next block.
        root.attrs.update({"n_samples": 12, "complete": False})
        for name in ("episode", "llm/resid_post", "text/step"):
            root[name].resize((14, *root[name].shape[1:]))
            root[name][12:14] = 7
        toolkit.extract(model="tinyvla", dataset="synthetic", store=part, chunk_samples=4, resume=True)
    a, b = toolkit.open_store(ref), toolkit.open_store(part)
    assert b.complete and b.n_samples == a.n_samples == 30
    for site in a.sites:
        np.testing.assert_array_equal(a.read(site, "resid_post"), b.read(site, "resid_post"))
    for f in a.fields():
        assert np.array_equal(a.coord(f), b.coord(f))


def test_resume_refuses_a_store_made_from_other_data(tmp_path):
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "s.zarr", chunk_samples=4)
        root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
        root.attrs.update({"n_samples": 8, "complete": False})
        with pytest.raises(ToolkitError, match="it was made with dataset_options.n_steps=None, this run uses "
                                               "dataset_options.n_steps=3; rerun with the store's options or use"):
            toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "s.zarr", resume=True,
                            dataset_options={"n_steps": 3})
        with pytest.raises(ToolkitError, match=r"cannot resume .*: it was made with selection.llm.layers=\[0, 1, 2\]"):
            toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "s.zarr", resume=True,
                            layers="0")


def test_a_failure_before_the_first_commit_leaves_nothing_behind(tmp_path):
    with registered(), pytest.raises(ToolkitError, match="empty"):
        toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "s.zarr",
                        dataset_options={"n_steps": 0})
    assert not (tmp_path / "s.zarr").exists()


def test_info_json_is_what_the_store_says(store):
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    res = CliRunner().invoke(cli, ["info", str(store), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["n_samples"] == 30 and info["n_episodes"] == 6 and info["n_tasks"] == 3
    assert info["sites"]["text"]["streams"]["resid_mid"]["shape"] == [30, 3, 24, 32]
    text = CliRunner().invoke(cli, ["info", str(store)]).output
    assert "site text" in text and "resid_mid" in text and "complete" in text


@pytest.mark.slow  # 144 samples extracted while readers poll
def test_readers_polling_during_a_write_see_a_consistent_committed_prefix(tmp_path):
    """xarray (and Store) opened while extract writes: always one sample count, never an error, and the values
    of the committed prefix are the final ones."""
    import threading
    import warnings

    import xarray as xr

    path = tmp_path / "live.zarr"
    done = threading.Event()
    failure = []

    def write():
        try:
            with registered():
                toolkit.extract(model="tinyvla", dataset="synthetic", store=path, chunk_samples=2, sites=["llm"],
                                dtype="float32", pool="mean", dataset_options={"n_episodes": 6, "n_steps": 8})
        except BaseException as e:  # surfaced below
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=write).start()
    seen = []
    while not done.is_set():
        if not (path / "zarr.json").exists():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no consolidated-metadata or other warnings either
            root = xr.open_zarr(path)
            site = xr.open_zarr(path, group="llm")
        n = root.sizes["sample"]
        ep = root["episode"].values
        x = site["resid_post"].values
        assert len(ep) == n and len(x) == site.sizes["sample"]
        seen.append((n, ep, site.sizes["sample"], x))
    assert not failure, failure
    final = toolkit.open_store(path)
    full_x = final.read("llm", "resid_post")
    full_ep = final.coord("episode")
    assert final.n_samples == 144 and len(seen) >= 3 and len({s[0] for s in seen}) >= 2
    for n, ep, m, x in seen:
        np.testing.assert_array_equal(ep, full_ep[:n])
        np.testing.assert_array_equal(x, full_x[:m])


def test_dataset_is_lazy_decodes_bfloat16_and_has_t_as_a_coordinate(tmp_path):
    import ml_dtypes
    import xarray as xr

    path = tmp_path / "pi0.zarr"
    toolkit.extract(model="pi0", dataset="libero", store=path, max_episodes=1, max_steps=2, sites=["action"],
                    layers="0", dtype="bfloat16", pool="mean")
    s = toolkit.open_store(path)
    ds = s.dataset("action")
    x = ds["resid_post"]
    assert x.dtype == np.dtype(ml_dtypes.bfloat16) and type(x.data).__module__.startswith("dask")
    assert x.dims == ("sample", "layer", "denoise", "token", "feature")
    np.testing.assert_array_equal(x.values.astype(np.float32), s.read("action", "resid_post"))
    assert "t" in ds.coords and ds["t"].dims == ("denoise",) and list(ds["episode"].values) == [0, 0]
    plain = xr.open_zarr(path, group="action")  # without toolkit: t is a coordinate there too
    assert "t" in plain.coords and "episode" in plain.coords
    np.testing.assert_allclose(plain["t"].values, ds["t"].values)


def test_info_on_a_store_whose_model_attribute_is_a_string(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli.main import cli
    from toolkit.store.layout import ArraySpec
    from toolkit.store.writer import StoreWriter

    w = StoreWriter(tmp_path / "s.zarr")
    w.initialize({"model": "synthetic", "dataset": "hand-made"},
                 [ArraySpec("vlm/resid_post", (1, 1, 4), "float32", ("layer", "token", "feature")),
                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.array([0], np.int32))}, ["episode"], chunk_samples=2)
    w.append({"vlm/resid_post": np.ones((3, 1, 1, 4), np.float32), "episode": np.arange(3, dtype=np.int32)})
    w.close()
    res = CliRunner().invoke(cli, ["info", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert "model     synthetic" in res.output and "dataset   hand-made" in res.output


def test_a_long_block_is_committed_on_time_and_reads_back_whole(tmp_path):
    """commit_seconds: a partly filled chunk is written and committed early (a kill loses at most that long);
    the next write into the same chunk keeps the committed rows."""
    import time

    from toolkit.store.layout import ArraySpec
    from toolkit.store.writer import StoreWriter

    x = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
    w = StoreWriter(tmp_path / "s.zarr")
    w.initialize({"model": "m"}, [ArraySpec("vlm/resid_post", (2, 3), "float32", ("layer", "feature")),
                                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.arange(2, dtype=np.int32))}, ["episode"], chunk_samples=8)
    w.commit_seconds = 0.0
    w.append({"vlm/resid_post": x[:3], "episode": np.zeros(3, np.int32)})
    deadline = time.time() + 10
    while toolkit.open_store(tmp_path / "s.zarr", warn_incomplete=False).n_samples < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert toolkit.open_store(tmp_path / "s.zarr", warn_incomplete=False).n_samples == 3  # before any chunk filled
    w.append({"vlm/resid_post": x[3:], "episode": np.ones(7, np.int32)})
    w.close()
    s = toolkit.open_store(tmp_path / "s.zarr")
    assert s.complete and s.n_samples == 10
    np.testing.assert_array_equal(s.read("vlm", "resid_post"), x)
    assert list(s.coord("episode")) == [0] * 3 + [1] * 7


@pytest.mark.parametrize("command", ["stats", "export", pytest.param("probe", marks=pytest.mark.slow)])
def test_readers_of_an_incomplete_store_warn_once_with_the_committed_count(store, tmp_path, command):
    import shutil

    from toolkit.store.layout import write_consolidated

    path = tmp_path / "part.zarr"
    shutil.copytree(store, path)
    write_consolidated(path, 12, False)
    args = {"stats": ["stats", str(path), "--site", "llm", "--json"],
            "export": ["export", str(path), "--out", str(tmp_path / "out"), "--site", "llm"],
            "probe": ["probe", str(path), "--site", "llm", "--out", str(tmp_path / "p")]}[command]
    res = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "incomplete" in line]
    assert lines == [f"warning: {path} is incomplete: 12 samples are committed (a run is writing it or was "
                     "interrupted; its extract command with --resume completes it); using those only"], res.stderr


def _hand_made(path, codec, x, bf, chunk_samples=16, batch=10):
    from toolkit.store.layout import ArraySpec
    from toolkit.store.writer import StoreWriter

    w = StoreWriter(path, codec=codec)
    w.initialize({"model": "m"},
                 [ArraySpec("vlm/resid_post", x.shape[1:], "float16", ("layer", "token", "feature"),
                            chunk_inner=(1, *x.shape[2:])),
                  ArraySpec("vlm/resid_bf", bf.shape[1:], "uint16", ("layer", "token", "feature"),
                            stored_dtype="bfloat16", chunk_inner=(1, *bf.shape[2:])),
                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.arange(x.shape[1], dtype=np.int32))}, ["episode"],
                 chunk_samples=chunk_samples)
    for a in range(0, len(x), batch):
        w.append({"vlm/resid_post": x[a:a + batch], "vlm/resid_bf": bf[a:a + batch],
                  "episode": np.arange(a, min(a + batch, len(x)), dtype=np.int32)})
    w.close()


@pytest.mark.parametrize("codec", ["auto", "zstd", "blosc", "blosc-lz4", "none"])
def test_pool_encoded_chunks_are_zarrs_own_bytes_and_verify(tmp_path, codec):
    """The writer's thread pool encodes chunks itself: every chunk file (the padded last one too) is byte for byte
    what zarr writes for the same values and codecs, reads back identical and passes `toolkit verify`."""
    from toolkit.store.verify import verify

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((45, 3, 4, 8)) * 5).astype(np.float16)
    bf = (rng.standard_normal((45, 3, 4, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    _hand_made(tmp_path / "s.zarr", codec, x, bf)
    s = toolkit.open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(s.array("vlm", "resid_post")[:], x)
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=1), x[:, 1])
    np.testing.assert_array_equal(s.array("vlm", "resid_bf")[:], bf)
    for name, values in (("resid_post", x), ("resid_bf", bf)):
        ours = zarr.open_array(str(tmp_path / "s.zarr" / "vlm" / name), mode="r")
        ref = zarr.create_array(str(tmp_path / f"ref_{name}"), shape=ours.shape, chunks=ours.chunks, dtype=ours.dtype,
                                compressors=ours.metadata.codecs[1:], fill_value=0)
        ref[:] = values
        files = sorted(p.relative_to(tmp_path / "s.zarr" / "vlm" / name)
                       for p in (tmp_path / "s.zarr" / "vlm" / name / "c").rglob("*") if p.is_file())
        assert len(files) == 3 * 3  # ceil(45 / 16) sample chunks x 3 layers
        for f in files:
            assert (tmp_path / "s.zarr" / "vlm" / name / f).read_bytes() == (tmp_path / f"ref_{name}" / f).read_bytes()
    report = verify(tmp_path / "s.zarr")
    assert report["chunks"] >= 18 and not report["bad"] and not report["without_checksum"], report


def test_auto_codec_is_chosen_per_stored_dtype_and_a_resume_keeps_the_stores(tmp_path):
    from toolkit.store.codecs import codec_for, codec_name
    from toolkit.store.writer import StoreWriter

    assert [codec_for("auto", d) for d in ("bfloat16", "float16", "float32", "int32", "str")] == \
        ["blosc-lz4", "none", "blosc-lz4", "zstd", "zstd"]
    assert codec_for("zstd", "bfloat16") == "zstd"
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 2, 4, 8)).astype(np.float16)
    bf = (rng.standard_normal((20, 2, 4, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    _hand_made(tmp_path / "s.zarr", "auto", x, bf)
    s = toolkit.open_store(tmp_path / "s.zarr")
    assert s.attrs["codec"] == "auto"
    assert [codec_name(s.array("vlm", n)) for n in ("resid_post", "resid_bf")] == ["none", "blosc-lz4"]
    assert codec_name(s.root["episode"]) == "zstd"
    # an old store (zstd) resumed with the default keeps zstd: its spec compares equal and its arrays keep zstd
    from toolkit.run.spec import RunSpec

    _hand_made(tmp_path / "old.zarr", "zstd", x, bf)
    w = StoreWriter(tmp_path / "old.zarr", mode="resume", codec="auto", spec={"codec": "auto"},
                    differ=RunSpec.resume_difference)
    assert w.codec == "zstd"
    w.release()
    assert RunSpec.resume_difference({"codec": "zstd"}, {"codec": "auto"}) is None
    assert RunSpec.resume_difference({"codec": "zstd"}, {"codec": "none"}) == ("codec", "zstd", "none")


def test_info_shows_each_streams_codec_and_compression_ratio(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    x = np.zeros((32, 2, 4, 64), np.float16)  # constant: blosc and zstd shrink it many times
    bf = np.zeros((32, 2, 4, 64), np.uint16)
    _hand_made(tmp_path / "s.zarr", "auto", x, bf)
    info = toolkit.open_store(tmp_path / "s.zarr").summary()["sites"]["vlm"]["streams"]
    raw = x.nbytes
    assert info["resid_post"]["codec"] == "none" and info["resid_bf"]["codec"] == "blosc-lz4"
    # none: the raw bytes plus a 4-byte checksum per chunk (2 sample chunks x 2 layers)
    assert info["resid_post"]["compression_ratio"] == pytest.approx(raw / (raw + 4 * 4))
    assert info["resid_bf"]["compression_ratio"] > 20
    out = CliRunner().invoke(cli, ["info", str(tmp_path / "s.zarr")]).output
    assert "(none, compression 1.00x)" in out and "(blosc-lz4, compression" in out


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_store_read_of_uncompressed_chunks_in_place_still_catches_damage(tmp_path, damage):
    """Store.read reads whole uncompressed chunks straight into its output and checks them there; the values are
    exact, and a damaged, short or missing chunk is still one CorruptStoreError naming it."""
    from toolkit.store.chunks import CorruptStoreError

    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3, 4, 8)).astype(np.float16)
    _hand_made(tmp_path / "s.zarr", "none", x, x.view(np.uint16))
    s = toolkit.open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=2), x[:, 2])
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=0, samples=slice(5, 33)), x[5:33, 0])
    chunk = tmp_path / "s.zarr" / "vlm" / "resid_post" / "c" / "1" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[100] ^= 1
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[:-10]))
    else:
        chunk.unlink()
    reason = {"flip": "damaged", "truncate": "damaged", "remove": "missing"}[damage]
    with pytest.raises(CorruptStoreError, match=rf"chunk vlm/resid_post/c/1/2/0/0 \(samples 16-31\) is {reason}"):
        s.read("vlm", "resid_post", layer=2)
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=1), x[:, 1])
