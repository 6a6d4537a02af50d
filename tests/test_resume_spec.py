"""--resume compares the whole run spec: every option that changes the stored bytes must match, complete or not;
and the store's lock: one writer at a time, a second one gets one line naming the holder."""

import errno
import os
import shutil
import socket

import pytest
import zarr

import toolkit
from synthetic import registered
from toolkit.sdk.errors import ToolkitError
from toolkit.store.lock import StoreLock

BASE = dict(model="tinyvla", dataset="synthetic", chunk_samples=4, sites=["llm"], dtype="float32", pool="mean")


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "s.zarr"
    with registered():
        toolkit.extract(store=path, **BASE)
    return path


CHANGES = [
    ("seed", {"seed": 1}, "seed=0, this run uses seed=1"),
    ("model option", {"model_options": {"hidden": 48}}, "model_options.hidden=None, this run uses model_options.hidden=48"),
    ("random weights", {"random_weights": True}, "random_weights=False"),
    ("model dtype", {"model_dtype": "bfloat16"}, "model_dtype='float32', this run uses model_dtype='bfloat16'"),
    ("dtype", {"dtype": "float16"}, "dtype='float32', this run uses dtype='float16'"),
    ("codec", {"codec": "none"}, "codec='auto', this run uses codec='none'"),
    ("stride", {"stride": 2}, "stride=1, this run uses stride=2"),
    ("max steps", {"max_steps": 3}, "max_steps=None, this run uses max_steps=3"),
    ("max episodes", {"max_episodes": 2}, "max_episodes=None"),
    ("batch size", {"batch_size": 2}, "batch_size=1, this run uses batch_size=2"),
    ("dataset option", {"dataset_options": {"n_steps": 4}}, "dataset_options.n_steps=None"),
    ("layers", {"layers": "0,1"}, "selection.llm.layers=[0, 1, 2], this run uses selection.llm.layers=[0, 1]"),
    ("tokens", {"tokens": "last"}, "selection.llm.tokens='all', this run uses selection.llm.tokens='last'"),
    ("pooling", {"pool": "none"}, "selection.llm.pool='mean', this run uses selection.llm.pool='none'"),
    ("streams", {"streams": "resid_mid"}, "selection.llm.streams=['resid_post'], this run uses"),
]


@pytest.mark.parametrize("what,change,message", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_a_changed_option_is_refused_even_when_complete(complete, tmp_path, what, change, message):
    path = tmp_path / "s.zarr"
    shutil.copytree(complete, path)
    before = (path / "zarr.json").read_text()
    with registered(), pytest.raises(ToolkitError, match="cannot resume .*: it was made with ") as e:
        toolkit.extract(store=path, resume=True, **{**BASE, **change})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (path / "zarr.json").read_text() == before  # nothing touched


def test_resume_of_an_incomplete_store_with_another_seed_is_refused(complete, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(complete, path)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs.update({"n_samples": 8, "complete": False})
    with registered(), pytest.raises(ToolkitError, match="seed=0, this run uses seed=1"):
        toolkit.extract(store=path, resume=True, **{**BASE, "seed": 1})


def test_a_second_writer_gets_one_line_naming_the_holder(complete, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(complete, path)
    lock = StoreLock(path)
    lock.acquire()
    try:
        for mode in ({"resume": True}, {"overwrite": True}):
            with registered(), pytest.raises(ToolkitError) as e:
                toolkit.extract(store=path, **BASE, **mode)
            assert f"is being written by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    finally:
        lock.release()
    assert not (tmp_path / f".{path.name}.lock").exists()
    with registered():
        toolkit.extract(store=path, resume=True, **BASE)  # the lock is free again
    new = tmp_path / "new.zarr"
    lock = StoreLock(new)
    lock.acquire()
    try:
        with registered(), pytest.raises(ToolkitError, match="new.zarr is being written by pid"):
            toolkit.extract(store=new, **BASE)
    finally:
        lock.release()
    assert not new.exists() and not list(tmp_path.glob(".new.zarr.*"))


def test_create_leaves_other_runs_and_existing_stores_alone(complete, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(complete, path)
    with registered(), pytest.raises(ToolkitError, match="already exists: pass --resume"):
        toolkit.extract(store=path, **BASE)
    assert (path / "zarr.json").exists()


def test_a_read_only_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that may write anywhere (root)")
        with registered(), pytest.raises(ToolkitError, match="cannot write .*Permission denied"):
            toolkit.extract(store=ro / "s.zarr", **BASE)
    finally:
        os.chmod(ro, 0o755)


def test_disk_full_while_creating_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import zarr.storage._local as local

    real = local._put

    def full(path, value, exclusive=False):
        if "c" in path.parts:  # the first chunk written: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full)
    with registered(), pytest.raises(ToolkitError, match="No space left on device"):
        toolkit.extract(store=tmp_path / "s.zarr", **BASE)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_signal_during_the_last_commit_lets_the_run_finish_and_says_so(tmp_path, monkeypatch):
    """SIGTERM landing while the run commits its last samples (its wind-up) is only recorded: the store is
    completed, the call returns normally, and one warning says the signal came too late to stop it."""
    import signal

    from toolkit.store.reader import open_store
    from toolkit.store.writer import StoreWriter

    close = StoreWriter.close

    def close_with_a_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the run's Signals: recorded, not raised, while winding up
        return close(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "close", close_with_a_signal)
    path = tmp_path / "late.zarr"
    with registered(), pytest.warns(UserWarning, match=r"SIGTERM arrived while the run was committing its last "
                                                       r"samples; it finished instead: .*late\.zarr is complete"):
        toolkit.extract(store=path, **BASE)
    store = open_store(path)
    assert store.complete and store.n_samples > 0
