"""The one selection language (toolkit.sdk.names): grammar, formatting, hook names, and the same answer in every command."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import toolkit
from synthetic import registered
from toolkit.cli.main import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import HookPattern, IndexSpec, format_indices, resolve_hooks, resolve_indices, store_layers

# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("spec, available, expected", [
    ("all", 4, [0, 1, 2, 3]), ("", 3, [0, 1, 2]), ("2", 4, [2]), ("0,3,1", 4, [0, 3, 1]), ("1-3", 5, [1, 2, 3]),
    ("3-", 6, [3, 4, 5]), ("-1", 18, [17]), ("-4-", 18, [14, 15, 16, 17]), ("-3--1", 18, [15, 16, 17]),
    ("0-1,-1", 18, [0, 1, 17]), ("-1", [0, 8, 17], [17]), ("0-17", [0, 8, 17], [0, 8, 17]),
    ("5-10", [0, 8, 17], [8]), ("-2-", [0, 8, 17], [8, 17]), (3, 5, [3]), ([0, "2-3"], 5, [0, 2, 3]),
    ("-1", [17, 0, 8], [17]), ("0-", [17, 0, 8], [0, 8, 17]), ("all", [17, 0, 8], [17, 0, 8]),  # stored out of order
])
def test_selections_resolve_against_what_is_available(spec, available, expected):
    assert resolve_indices(spec, available) == expected


@pytest.mark.parametrize("spec, available, message", [
    ("4", 4, "layer 4 is out of range: available layers: 0-3"),
    ("-5", 4, r"layer -5 is out of range: .*\(-4..-1 count back\)"),
    ("0-40", 18, "range '0-40' is out of range"),
    ("5-2", 18, "range '5-2' is empty"),
    ("3", [0, 8, 17], "layer 3 is out of range: available layers: 0,8,17"),
    ("2-6", [0, 8, 17], "range '2-6' holds no layer"),
    ("1,1", 4, "names a layer twice"),
    ("a", 4, "malformed layer selection 'a'"),
    ("1:3", 4, "malformed layer selection"),
])
def test_bad_selections_say_what_is_available(spec, available, message):
    with pytest.raises(ToolkitError, match=message):
        resolve_indices(spec, available)


def test_a_literal_filter_needs_no_list_of_what_exists():
    assert IndexSpec.parse("0-2,5", "tasks").literal() == {0, 1, 2, 5}
    assert IndexSpec.parse("all", "tasks").literal() is None
    with pytest.raises(ToolkitError, match="non-negative numbers and closed ranges"):
        IndexSpec.parse("3-", "tasks").literal()


def test_a_mask_filters_values_such_as_rollout_steps():
    steps = np.array([0, 1, 2, 10, 11, 50])
    assert IndexSpec.parse("10-", "step").mask(steps).tolist() == [False, False, False, True, True, True]
    assert IndexSpec.parse("-1", "step").mask(steps).tolist() == [False] * 5 + [True]


def test_positions_index_an_axis():
    assert IndexSpec.parse("8,-1").positions([0, 8, 17]) == [1, 2]


@pytest.mark.parametrize("values, text", [
    ([0, 1, 2, 3, 8, 10, 11], "0-3,8,10,11"), ([5], "5"), ([], ""), ([3, 2, 1], "3,2,1"), ([0, 1], "0,1"),
])
def test_formatting_is_compact(values, text):
    assert format_indices(values) == text


@given(st.lists(st.integers(0, 40), unique=True, min_size=1).map(sorted), st.data())
def test_formatting_round_trips_through_the_grammar(available, data):
    chosen = sorted(data.draw(st.lists(st.sampled_from(available), unique=True, min_size=1)))
    assert resolve_indices(format_indices(chosen), available) == chosen


@given(st.integers(1, 30), st.data())
def test_negative_indices_count_back_from_the_last_available(n, data):
    k = data.draw(st.integers(1, n))
    assert resolve_indices(f"-{k}", n) == [n - k]
    assert resolve_indices(f"-{k}-", n) == list(range(n - k, n))
    assert resolve_indices(f"{n - k}-", n) == resolve_indices(f"-{k}--1", n)


@given(st.lists(st.integers(0, 40), unique=True, min_size=1), st.sampled_from(["-1", "0-", "-2-", "1-30", "3,-1"]))
def test_the_order_a_store_holds_layers_in_does_not_change_the_answer(available, spec):
    try:
        want = resolve_indices(spec, sorted(available))
    except ToolkitError as e:
        with pytest.raises(ToolkitError, match=re.escape(str(e))):
            resolve_indices(spec, available)
        return
    assert resolve_indices(spec, available) == want


# --------------------------------------------------------------------------- hook names

SITES = {"vlm": 4, "action": 3}
STREAMS = {"vlm": ["resid_post", "resid_mid"], "action": ["resid_post", "resid_mid", "attn_out"]}


def test_hook_names_with_globs_select_sites_layers_and_streams():
    got = resolve_hooks(["vlm.layers.*.resid_post", "action.layers.0-1.resid_mid", "action.layers.-1.resid_mid"],
                        SITES, STREAMS)
    assert {s: (p.layers, p.streams) for s, p in got.items()} == {
        "vlm": ((0, 1, 2, 3), ("resid_post",)), "action": ((0, 1, 2), ("resid_mid",))}
    got = resolve_hooks(["*.layers.-1.resid_*"], SITES, STREAMS)
    assert got["action"].names() == ["action.layers.2.resid_post", "action.layers.2.resid_mid"]


def test_transformer_lens_spelling_names_the_only_site():
    assert resolve_hooks(["blocks.1.hook_resid_post"], {"llm": 3}, {"llm": ["resid_post"]})["llm"].layers == (1,)
    with pytest.raises(ToolkitError, match="this one has several: write e.g. vlm.layers.0.resid_post"):
        resolve_hooks(["blocks.1.hook_resid_post"], SITES, STREAMS)


@pytest.mark.parametrize("hook, message", [
    ("vlm.5.resid_post", "malformed hook name"), ("text.layers.0.resid_post", "matches no site"),
    ("vlm.layers.0.mlp_out", "site 'vlm' has no stream 'mlp_out'"),
    ("vlm.layers.9.resid_post", "layer 9 is out of range: available layers at site 'vlm': 0-3"),
])
def test_bad_hook_names_fail_with_one_line(hook, message):
    with pytest.raises(ToolkitError, match=message):
        resolve_hooks([hook], SITES, STREAMS)


def test_a_hook_name_parses_to_its_parts():
    p = HookPattern.parse("action.layers.0-5.resid_mid")
    assert (p.site, p.layers.text, p.stream) == ("action", "0-5", "resid_mid")


# --------------------------------------------------------------------------- every command, one answer


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory, pi0_single_thread):
    """tinyvla (3 layers) storing layers 0 and 2 of site llm, pooled, 2 episodes x 2 steps."""
    with registered():
        return toolkit.extract(model="tinyvla", dataset="synthetic", store=tmp_path_factory.mktemp("s") / "s.zarr",
                               sites=["llm"], layers=["0,2"], dtype="float32", max_episodes=2, max_steps=2,
                               progress=False, dataset_options={"n_tasks": 2, "n_episodes": 1, "n_steps": 2})


def _stats_layers(store, spec, hook=False):
    args = ["--hook", f"llm.layers.{spec}.resid_post"] if hook else ["--layer", spec]
    res = CliRunner().invoke(cli, ["stats", str(store), *args, "--json"])
    assert res.exit_code == 0, res.output
    return [int(k) for k in json.loads(res.output)["layers"]]


def _compare_layers(store, spec, tmp):
    res = CliRunner().invoke(cli, ["compare", str(store), str(store), "--layer", spec, "--json", "--no-figures",
                                   "--out", str(tmp)])
    assert res.exit_code == 0, res.output
    return [int(k) for k in json.loads(res.output.split("\nwrote")[0])["layers"]]


def _export_layers(store, spec, tmp, hook=False):
    args = ["--hook", f"*.layers.{spec}.resid_*"] if hook else ["--layers", spec]
    res = CliRunner().invoke(cli, ["export", str(store), "--out", str(tmp), *args, "--overwrite"])
    assert res.exit_code == 0, res.output
    meta = json.loads(next(tmp.rglob("step_metadata.json")).read_text())
    return meta["layers_extracted"]["llm"]


def _probe_layers(store, spec):
    from toolkit.analysis.probe.select import Selection, resolve

    return resolve(toolkit.open_store(store), Selection(site="llm", layers=spec)).layers


SPECS = st.sampled_from(["all", "0", "2", "-1", "-2", "0-2", "0-", "-2-", "-2--1", "2,0", "1-2", "0,-1"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=SPECS)
def test_every_command_resolves_a_spec_to_the_same_layers(sparse_store, tmp_path_factory, spec):
    want = store_layers(toolkit.open_store(sparse_store), "llm", spec)
    tmp = tmp_path_factory.mktemp("cmd")
    assert _stats_layers(sparse_store, spec) == want
    assert _compare_layers(sparse_store, spec, tmp / "cmp") == want
    assert _export_layers(sparse_store, spec, tmp / "exp") == want
    assert _probe_layers(sparse_store, spec) == want
    assert _stats_layers(sparse_store, spec, hook=True) == want  # the same spec inside a hook name
    assert _export_layers(sparse_store, spec, tmp / "hook", hook=True) == want


def test_minus_one_means_the_last_stored_layer_in_every_command(sparse_store, tmp_path):
    assert _stats_layers(sparse_store, "-1") == [2]
    assert _probe_layers(sparse_store, "-1") == [2]
    res = CliRunner().invoke(cli, ["projection", str(sparse_store), "--layer", "-1", "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and "llm/resid_post layer 2," in res.output, res.output


def test_a_layer_the_store_lacks_fails_the_same_way_everywhere(sparse_store, tmp_path):
    for args in (["stats", str(sparse_store), "--layer", "1"],
                 ["export", str(sparse_store), "--out", str(tmp_path / "e"), "--layers", "1"],
                 ["projection", str(sparse_store), "--layer", "1"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "layer 1 is out of range: available layers at site 'llm' of the store: 0,2" \
            in res.output, (args, res.output)


def test_reading_commands_take_hook_names(sparse_store, tmp_path):
    res = CliRunner().invoke(cli, ["projection", str(sparse_store), "--hook", "llm.layers.0.resid_post",
                                   "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and "llm/resid_post layer 0," in res.output, res.output
    res = CliRunner().invoke(cli, ["stats", str(sparse_store), "--hook", "llm.layers.0.*", "--site", "llm"])
    assert res.exit_code == 2 and "either --hook or --site/--stream/--layer" in res.output
    res = CliRunner().invoke(cli, ["stats", str(sparse_store), "--hook", "llm.layers.0.resid_mid"])
    assert res.exit_code == 2 and "site 'llm' has no stream 'resid_mid'; streams: resid_post" in res.output
