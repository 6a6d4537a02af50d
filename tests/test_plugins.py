"""Third-party plugins: a separately packaged adapter, installed with pip, works through the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import toolkit
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.plugins import get_dataset, get_model, registry

FIXTURE = Path(__file__).parent / "fixtures" / "toolkit-tinyvla"


def _toolkit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The fixture package built and installed by pip into a folder of its own (its wheel's module and
    entry-point metadata), which the CLI processes get on PYTHONPATH: the test environment is left as it was."""
    root = tmp_path_factory.mktemp("plugin")
    shutil.copytree(FIXTURE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "--target",
                    str(root / "site"), str(root / "src")], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"),
                                                                       os.environ.get("PYTHONPATH")]))}


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


@pytest.mark.slow  # pip builds and installs the fixture package, then four CLI processes
def test_a_pip_installed_plugin_is_listed_and_runs_through_extract(installed_plugin, tmp_path):
    store = tmp_path / "tiny.zarr"
    commands = {
        "json": ["plugins", "--json"],
        "verbose": ["plugins", "--verbose"],
        # the plugin's own typed option, set through the flag the plugin adds to the CLI
        "extract": ["extract", "--model", "tinyvla", "--dataset", "libero", "--store", str(store), "--max-episodes",
                    "3", "--no-progress", "--tiny-layers", "2"],
        "bad": ["extract", str(tmp_path / "bad.zarr"), "--model", "tinyvla", "--model-option", "layers=many"],
    }
    # independent of each other, and each spends seconds loading every plugin: all four at once
    procs = {name: subprocess.Popen([sys.executable, "-m", "toolkit", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=installed_plugin)
             for name, args in commands.items()}
    res = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        res[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    for name in ("json", "verbose", "extract"):
        assert res[name].returncode == 0, res[name].stderr

    listed = json.loads(res["json"].stdout)
    tiny = next(m for m in listed["model"] if m["name"] == "tinyvla")
    assert tiny["plugin"] == "toolkit-tinyvla 0.0.1"
    verbose = res["verbose"].stdout
    assert "layers=int (default 3)  decoder layers of the random model" in verbose
    assert "plugin flag: toolkit extract --tiny-layers  -> model option layers" in verbose
    s = toolkit.open_store(store)
    assert s.attrs["model"]["name"] == "tinyvla" and s.sites == ["llm", "text"]
    assert s.layers("llm") == [0, 1] and s.attrs["model"]["options"] == {"layers": 2}
    assert s.summary()["n_episodes"] == 3 and s.n_samples == 3 * 6  # the embedded sample: 6 steps per episode
    bad = res["bad"]
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "error: tinyvla option layers='many': Input should be a valid integer, unable to parse string as an integer"


def test_plugins_lists_every_adapter_its_options_and_plugin_flags():
    """`toolkit plugins` in this process, the fixture's tinyvla registered here (the pip-installed plugin, in
    processes of its own: the slow test above)."""
    from click.testing import CliRunner

    from synthetic import registered
    from toolkit.cli.main import cli

    with registered():
        listed = CliRunner().invoke(cli, ["plugins", "--json", "--verbose"])
        verbose = CliRunner().invoke(cli, ["plugins", "--verbose"])
    assert listed.exit_code == 0 and verbose.exit_code == 0, listed.output + verbose.output
    models = {m["name"]: m for m in json.loads(listed.stdout)["model"]}
    assert models["pi0"]["plugin"].startswith("toolkit ") and "tinyvla" in models
    assert {"name": "layers", "type": "int", "default": 3, "help": "decoder layers of the random model"} in \
        models["tinyvla"]["options"]
    assert "synthetic" in {d["name"] for d in json.loads(listed.stdout)["dataset"]}
    assert "layers=int (default 3)  decoder layers of the random model" in verbose.stdout
    assert "plugin flag: toolkit extract --tiny-layers  -> model option layers" in verbose.stdout


def test_typed_options_validate_convert_and_fill_in_defaults():
    from synthetic import toolkit_tinyvla

    a = toolkit_tinyvla.TinyVLAAdapter(layers="2")
    assert a.opts == {"layers": 2, "hidden": 32} and a.experts["llm"].n_layers == 2
    with pytest.raises(ToolkitError, match="tinyvla has no option 'depth'; options: layers, hidden"):
        toolkit_tinyvla.TinyVLAAdapter(depth=2)
    with pytest.raises(ToolkitError, match="tinyvla option hidden=30: Input should be a multiple of 4"):
        toolkit_tinyvla.TinyVLAAdapter(hidden=30)


def test_untyped_option_defaults_keep_working():
    """The older ``option_defaults`` dict: unknown names rejected, values passed through, defaults filled in."""
    from toolkit.sdk.adapters import ModelAdapter
    from toolkit.sdk.options import describe_options, parse_options

    class Legacy(ModelAdapter):
        name = "legacy"
        option_defaults = {"window": None, "camera": "agentview"}

    assert parse_options(Legacy, {"window": "4"}, "legacy") == {"window": "4", "camera": "agentview"}
    with pytest.raises(ToolkitError, match="legacy has no option 'size'; options: window, camera"):
        parse_options(Legacy, {"size": 1}, "legacy")
    assert [(d.name, d.default) for d in describe_options(Legacy)] == [("window", None), ("camera", "agentview")]


def test_two_plugins_adding_the_same_flag_is_an_error():
    import types

    from toolkit.sdk.options import CliOption
    from toolkit.sdk.hookspecs import hookimpl
    from toolkit.sdk.plugins import cli_options, plugin_manager

    clash = types.ModuleType("toolkit_test_clash")

    @hookimpl
    def register_cli_options(register):
        register("extract", CliOption("--suite", "suite", "another --suite"))

    clash.register_cli_options = register_cli_options
    pm = plugin_manager()
    pm.register(clash)
    try:
        with pytest.raises(ToolkitError, match="both add --suite to `toolkit extract`"):
            cli_options("extract")
    finally:
        pm.unregister(clash)


def test_a_bad_selection_fails_before_the_model_is_built(tmp_path, monkeypatch):
    """tinyvla's architecture() knows its layers from the options alone: layer 5 of 3 fails at once."""
    from synthetic import registered, toolkit_tinyvla

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the selection was checked")

    monkeypatch.setattr(toolkit_tinyvla, "TinyVLA", never)
    with registered():
        with pytest.raises(ToolkitError, match="layer 5 is out of range: available layers at site 'llm': 0-2"):
            toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path / "s.zarr", layers="5")
    assert not (tmp_path / "s.zarr").exists()
