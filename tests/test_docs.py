"""The plugin author's guide (docs/plugins.md) runs as written: its plugin module, its tests, its end-to-end run."""

import importlib
import re
import sys
from pathlib import Path

import pytest

from toolkit.sdk.plugins import plugin_manager, registry

GUIDE = Path(__file__).parent.parent / "docs" / "plugins.md"
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    """(file name or None, code) of every python block, in order."""
    out = []
    for info, code in BLOCK.findall(GUIDE.read_text()):
        m = re.search(r"file=(\S+)", info)
        out.append((m.group(1) if m else None, code))
    return out


def test_the_guide_is_linked_from_the_readme():
    assert "docs/plugins.md" in (GUIDE.parent.parent / "README.md").read_text()


def test_the_guides_plugin_passes_its_own_tests_and_runs_end_to_end(tmp_path, monkeypatch, pi0_single_thread):
    found = blocks()
    files = {name: code for name, code in found if name}
    assert set(files) == {"toolkit_toy.py", "test_toy.py"} and len(found) == 3
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        tests = importlib.import_module("test_toy")
        for name in ("test_the_dataset_follows_the_contract", "test_the_model_follows_the_contract"):
            getattr(tests, name)()  # a skip here (no reference check) would fail this test
        for name, code in found:
            if name is None:
                exec(compile(code, f"{GUIDE}:example", "exec"), {})
        assert (tmp_path / "toy.zarr").exists()
    finally:
        toy = sys.modules.pop("toolkit_toy", None)
        sys.modules.pop("test_toy", None)
        if toy is not None and plugin_manager().is_registered(toy):
            plugin_manager().unregister(toy)
        registry.cache_clear()


def test_a_missing_reference_check_is_a_loud_skip():
    from synthetic import SyntheticDataset, toolkit_tinyvla
    from toolkit.testing import check_model_adapter

    class NoReference(toolkit_tinyvla.TinyVLAAdapter):
        reference_hidden_states = None

    episode = next(SyntheticDataset(n_steps=1).episodes())
    with pytest.raises(pytest.skip.Exception, match="NOT compared with the model's own hidden states"):
        check_model_adapter(NoReference(), [(episode, next(episode.steps()))])
