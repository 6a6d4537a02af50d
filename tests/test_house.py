"""The house: layers that import only downward (import-linter contracts), no torch before a model is needed, one
run specification that the CLI, the API, the store, resume and repair all read, and commands that register as a
plugin's do."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from synthetic import registered
from toolkit.cli import cli
from toolkit.run.spec import RunSpec
from toolkit.sdk.errors import ToolkitError

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: layers, no cycles, click only in the CLI, no torch in the
    store, analysis never imports capture/run/plugins, plugins import only the SDK, the core names no plugin."""
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)  # its own process: it reconfigures
    assert res.returncode == 0, res.stdout[-4000:]  # logging
    assert "0 broken" in res.stdout


def test_every_package_is_in_the_distribution():
    """pyproject.toml lists the packages a wheel holds: every folder with an __init__.py must be there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "toolkit").rglob("__init__.py")}
    found |= {".".join(("toolkit_plugins", *p.parent.relative_to(ROOT / "plugins").parts)).rstrip(".")
              for p in (ROOT / "plugins").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import toolkit",
    "from toolkit.cli import cli\ntry:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass",
    "from toolkit.cli import cli\ntry:\n    cli(['extract', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass",
], ids=["import", "help", "extract-help"])
def test_no_torch_before_a_model_is_needed(code):
    loaded = _modules_after(code)
    assert not {"torch", "transformers"} & loaded


def test_info_loads_no_torch(tmp_path):
    path = tmp_path / "s.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], max_episodes=1, max_steps=2,
                        dataset_options={"n_tasks": 1})
    code = f"from toolkit.cli import cli\ntry:\n    cli(['info', {str(path)!r}], standalone_mode=False)\n" \
           "except SystemExit:\n    pass"
    assert not {"torch", "transformers"} & _modules_after(code)


# --------------------------------------------------------------------------- the run specification


def test_every_extract_flag_is_a_spec_field_and_every_field_offered_is_a_flag():
    command = cli.get_command(click.Context(cli), "extract")
    params = {p.name for p in command.params}
    fields = {n for n, f in RunSpec.model_fields.items() if "extract" in (f.json_schema_extra or {}).get("commands", ())}
    assert fields <= params
    # what is not in the spec says how the run is executed, not what it is
    assert params - fields == {"store", "store_option", "resume", "overwrite", "no_progress"}


def test_a_bad_spec_value_is_one_line_naming_the_flag():
    for fields, says in [({"stride": 0}, "--stride must be at least 1, got 0"),
                         ({"dtype": "float8"}, "--dtype 'float8': Input should be"),
                         ({"model_options": ["num_steps"]}, "--model-option takes KEY=VALUE, got 'num_steps'"),
                         ({"hooks": ["vlm.layers.0.resid_post"], "layers": "0"}, "either --hook or --site"),
                         ({"no_such_option": 1}, "--no-such-option")]:
        with pytest.raises(ToolkitError) as e:
            RunSpec.build(**fields)
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_spec_parses_what_the_cli_and_the_api_give_the_same_way():
    a = RunSpec.build(sites=("vlm,action",), layers=(), model_options=("num-steps=3",), dataset_options=())
    b = RunSpec(sites=["vlm", "action"], model_options={"num_steps": "3"})
    assert a == b and a.layers is None and a.dataset_options == {}
    assert RunSpec.build(layers=[0, 5]).layers == ["0,5"] and RunSpec.build(layers=-1).layers == ["-1"]
    assert repr(RunSpec(model="openvla", layers="-1")) == "RunSpec(model='openvla', dataset='libero', layers=['-1'])"


def test_resume_compares_what_changes_the_bytes_and_nothing_else():
    base = RunSpec(seed=1).stored({"vlm": {"layers": [5]}})
    assert RunSpec.resume_difference(base, RunSpec(seed=1, workers=2, trust_remote_code=True, layers="-1",
                                                   chunk_samples=8).stored({"vlm": {"layers": [5]}})) is None
    assert RunSpec.resume_difference(base, RunSpec(seed=2).stored({"vlm": {"layers": [5]}})) == ("seed", 1, 2)
    assert RunSpec.resume_difference(base, RunSpec(seed=1).stored({"vlm": {"layers": [4]}})) == \
        ("selection.vlm.layers", [5], [4])
    assert RunSpec.resume_difference(base, RunSpec(seed=1, device="cuda:1").stored({"vlm": {"layers": [5]}})) == \
        ("device", "cpu", "cuda")


def test_a_store_made_before_the_selection_was_in_the_spec_rebuilds_its_run():
    old = {"command": "extract", "model": "pi0", "seed": 3, "device": "cpu", "dtype": "float32",
           "selection": {"vlm": {"expert": "vlm", "layers": [0, 5], "streams": ["resid_post"], "tokens": "all",
                                 "pool": "mean", "dtype": "float32"}}}
    spec = RunSpec.from_store(old)
    assert spec.seed == 3 and spec.sites == ["vlm"] and spec.layers == ["vlm=0,5"] and spec.pool == ["vlm=mean"]


# --------------------------------------------------------------------------- commands as plugins

COMMAND_PLUGIN = textwrap.dedent('''
    import click

    from toolkit.sdk import hookimpl


    @click.command()
    @click.argument("store")
    def layers(store):
        """Print the layers each site of a store holds."""
        from toolkit.store import open_store

        s = open_store(store)
        for site in s.sites:
            click.echo(f"{site}: {s.layers(site)}")


    @hookimpl
    def register_commands(cli):
        cli.add_command(layers)
''')


@pytest.fixture
def command_plugin(tmp_path, monkeypatch):
    """The docs/plugins.md command plugin, registered as a plugin module would be."""
    import importlib

    from toolkit.sdk.plugins import plugin_manager

    (tmp_path / "toolkit_layers.py").write_text(COMMAND_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toolkit_layers")
    pm = plugin_manager()
    pm.register(module, name="toolkit_layers")
    group = type(cli)(name="toolkit", callback=cli.callback, params=cli.params)  # a fresh group: registers anew
    try:
        yield module, group
    finally:
        pm.unregister(module)


def test_a_plugin_adds_a_command_as_the_built_in_ones_are_added(command_plugin, tmp_path):
    module, group = command_plugin
    assert "layers" in group.list_commands(click.Context(group))
    assert {"extract", "probe", "info", "plugins"} <= set(group.list_commands(click.Context(group)))
    path = tmp_path / "s.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], layers="0,2", max_episodes=1,
                        max_steps=1, dataset_options={"n_tasks": 1})
    res = CliRunner().invoke(group, ["layers", str(path)])
    assert res.exit_code == 0 and res.output == "llm: [0, 2]\n", res.output
    listed = CliRunner().invoke(group, ["plugins"]).output
    assert "  layers         [toolkit_layers]" in listed and "  extract        [toolkit " in listed


def test_two_plugins_adding_the_same_command_is_one_line(command_plugin):
    import types

    from toolkit.cli.main import register_commands
    from toolkit.sdk.hookspecs import hookimpl
    from toolkit.sdk.plugins import plugin_manager

    clash = types.ModuleType("toolkit_clash")
    clash.register_commands = hookimpl(lambda cli: cli.add_command(click.Command("layers")))
    plugin_manager().register(clash, name="toolkit_clash")
    try:
        with pytest.raises(ToolkitError, match="toolkit_clash both add the command `toolkit layers`|"
                                               "toolkit_layers both add the command `toolkit layers`"):
            register_commands(click.Group("toolkit"))
    finally:
        plugin_manager().unregister(clash)


# --------------------------------------------------------------------------- the API, named by hooks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("house") / "s.zarr"
    with registered():
        toolkit.extract(model="tinyvla", dataset="synthetic", store=path, sites=["llm"], dtype="float32", pool="none",
                        streams="resid_post,resid_mid,pre_attn_norm_scale", dataset_options={"n_steps": 3})
    return toolkit.open_store(path)


def test_read_by_hook_name_equals_read_by_site_and_layer(store):
    layers = store.layers("llm")
    last = store.read("llm", "resid_post", layer=layers[-1])
    assert np.array_equal(store.read("llm.layers.-1.resid_post"), last)
    assert np.array_equal(store.read(f"llm.layers.{layers[-1]}.resid_post"), last)
    every = store.read("llm.layers.*.resid_post")
    assert every.shape[:2] == (store.n_samples, len(layers)) and np.array_equal(every[:, -1], last)
    assert np.array_equal(every, store.read("llm", "resid_post"))
    with pytest.raises(ToolkitError, match="matches 2 site/stream pairs"):
        store.read("llm.layers.0.resid_*")
    with pytest.raises(ToolkitError, match="layer 9 is out of range"):
        store.read("llm.layers.9.resid_post")


def test_read_filters_episodes_tasks_and_steps(store):
    ep, task, step = store.coord("episode"), store.coord("task_id"), store.coord("step")
    full = store.read("llm.layers.0.resid_post")
    for kw, mask in [({"episodes": "0-1"}, ep <= 1), ({"tasks": [2]}, task == 2), ({"tasks": "task 1"}, task == 1),
                     ({"steps": -1}, step == step.max()), ({"episodes": [0, 3], "steps": "0"}, np.isin(ep, [0, 3])
                                                           & (step == 0))]:
        assert mask.any() and np.array_equal(store.read("llm.layers.0.resid_post", **kw), full[mask]), kw
    with pytest.raises(ToolkitError, match="has no task 'nope'"):
        store.read("llm.layers.0.resid_post", tasks="nope")


def test_every_stream_opens_in_xarray_with_its_own_widths(store):
    ds = store.dataset("llm")
    assert set(ds.data_vars) == {"resid_post", "resid_mid", "pre_attn_norm_scale"}
    assert ds["pre_attn_norm_scale"].dims[-1] == "feature_pre_attn_norm_scale"
    assert ds.sizes["feature_pre_attn_norm_scale"] == 1 and ds.sizes["feature"] > 1
    np.testing.assert_array_equal(ds["resid_post"].sel(layer=store.layers("llm")[0]).values,
                                  store.read("llm.layers.0.resid_post"))
    tree = store.dataset()
    assert list(tree.children) == ["llm"]


def test_a_stores_repr_is_short_and_says_what_made_it(store):
    text = repr(store)
    assert len(text.splitlines()) <= 15 and "tinyvla (RANDOM weights)" in text and "llm.layers." in text


def test_probe_takes_hook_names_and_its_results_read_short(store, tmp_path):
    from toolkit.analysis.probe import Results

    res = CliRunner().invoke(cli, ["probe", str(store.path), "--hook", "llm.layers.-1.resid_post", "--no-mdl",
                                   "--no-success", "--no-progress", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    results = Results.load(tmp_path / "r")
    assert {int(r["layer"]) for r in results.rows} == {store.layers("llm")[-1]}
    text = repr(results)
    assert len(text) < 2000 and len(text.splitlines()) <= 12
    table = results.table()
    assert list(table.columns[:8]) == ["site", "layer", "t", "step", "target", "split", "metric_name", "metric"]
    assert len(results.table("lead").columns) <= 15
