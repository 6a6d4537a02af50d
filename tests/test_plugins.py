"""Third-party plugins: a separately packaged adapter, installed with pip, works through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import toolkit
from toolkit.errors import ToolkitError
from toolkit.plugins import get_dataset, get_model, registry

FIXTURE = Path(__file__).parent / "fixtures" / "toolkit-tinyvla"


def _toolkit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def installed_plugin():
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(FIXTURE)],
                   check=True, capture_output=True)
    yield
    subprocess.run([*pip, "uninstall", "-y", "toolkit-tinyvla"], check=True, capture_output=True)


def test_builtin_adapters_register_through_the_entry_point_group():
    reg = registry()
    assert reg["model"]["pi0"].plugin.startswith("toolkit ")
    assert reg["dataset"]["libero"].plugin.startswith("toolkit ")
    assert get_model("pi0").name == "pi0" and get_dataset("libero").name == "libero"


def test_unknown_names_list_the_known_ones(tmp_path):
    with pytest.raises(ToolkitError, match="unknown model 'nope'; known models: .*pi0"):
        get_model("nope")
    res = _toolkit("extract", "--model", "nope", "--store", "never.zarr", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: unknown model 'nope'; known models:") and "pi0" in lines[0]
    assert not (tmp_path / "never.zarr").exists()


def test_a_pip_installed_plugin_is_listed_and_runs_through_extract(installed_plugin, tmp_path):
    listed = json.loads(_toolkit("plugins", "--json", check=True).stdout)
    tiny = next(m for m in listed["model"] if m["name"] == "tinyvla")
    assert tiny["plugin"] == "toolkit-tinyvla 0.0.1"
    assert "tinyvla" in _toolkit("plugins", check=True).stdout
    store = tmp_path / "tiny.zarr"
    res = _toolkit("extract", "--model", "tinyvla", "--dataset", "libero", "--store", str(store), "--max-episodes",
                   "3", "--no-progress")
    assert res.returncode == 0, res.stderr
    s = toolkit.open_store(store)
    assert s.attrs["model"]["name"] == "tinyvla" and s.sites == ["llm", "text"]
    assert s.summary()["n_episodes"] == 3 and s.n_samples == 3 * 6  # the embedded sample: 6 steps per episode
