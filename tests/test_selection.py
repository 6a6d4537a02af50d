import pytest

from toolkit.sdk.errors import ToolkitError
from toolkit.capture.tokens import parse_tokens, per_site
from toolkit.sdk.names import resolve_indices


@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(18))), ("0,5,17", [0, 5, 17]), ("0-5", [0, 1, 2, 3, 4, 5]), ("-1", [17]),
    ("0-2,-1", [0, 1, 2, 17]), ("-3--1", [15, 16, 17]),
])
def test_layer_specs_resolve_against_the_layer_count(spec, expected):
    assert resolve_indices(spec, 18) == expected


@pytest.mark.parametrize("spec,message", [
    ("18", "layer 18 is out of range: available layers: 0-17"), ("-19", "out of range"), ("5-2", "empty"),
    ("a", "malformed layer selection"), ("1,1", "twice"),
])
def test_bad_layer_specs_say_what_is_valid(spec, message):
    with pytest.raises(ToolkitError, match=message):
        resolve_indices(spec, 18)


def test_token_specs_combine_spans_and_positions():
    spans = {"image": list(range(0, 8)), "text": list(range(8, 12))}
    assert parse_tokens("text", spans, 12).positions == (8, 9, 10, 11)
    assert parse_tokens("text,0", spans, 12).positions == (8, 9, 10, 11, 0)
    assert parse_tokens("-1", spans, 12).positions == (11,)
    assert parse_tokens("2-4", spans, 12).positions == (2, 3, 4)
    assert parse_tokens("all", spans, 12).positions is None
    assert parse_tokens("last", spans, 12).last_valid


def test_a_malformed_span_names_the_known_spans():
    with pytest.raises(ToolkitError, match="unknown name 'txt'; names: image, text"):
        parse_tokens("txt", {"image": [0], "text": [1]}, 2)


def test_per_site_options_apply_globally_then_per_site():
    assert per_site(["0-2", "action=5"], ["vlm", "action"], "all", "--layers") == {"vlm": "0-2", "action": "5"}
    assert per_site(["action=5", "0-2"], ["vlm", "action"], "all", "--layers") == {"vlm": "0-2", "action": "5"}
    with pytest.raises(ToolkitError, match="names site 'nope'"):
        per_site(["nope=1"], ["vlm"], "all", "--layers")
