"""`toolkit intervene` reads --units and --denoise in the toolkit's one selection grammar (toolkit.sdk.names)."""

import pytest
from click.testing import CliRunner

from toolkit.cli.main import cli

pytestmark = pytest.mark.usefixtures("pi0_single_thread")


def _intervene(out, *args):
    res = CliRunner().invoke(cli, ["intervene", "--model", "pi0", "--dataset", "libero", "--out", str(out),
                                   "--max-episodes", "2", "--max-steps", "1", "--bootstrap", "20", "--no-figures",
                                   "--no-progress", *args])
    return res.exit_code, res.output


def test_ranges_of_units_and_denoising_steps_reach_intervene(tmp_path, monkeypatch):
    """What the CLI hands to ``toolkit.run.intervene.intervene`` (whose runs test_intervention.py covers)."""
    import toolkit.run.intervene

    seen = {}

    def record(spec, out, **kw):
        seen.update(spec.model_dump())
        raise SystemExit(0)

    monkeypatch.setattr(toolkit.run.intervene, "intervene", record)
    code, out = _intervene(tmp_path / "r", "--hook", "action.layers.0.mlp_act", "--op", "clamp", "--units", "0-2,7",
                           "--value", "3", "--denoise", "1-3")
    assert code == 0, out
    assert seen["units"] == [0, 1, 2, 7] and seen["denoise"] == [1, 2, 3]
    _intervene(tmp_path / "r", "--hook", "action.layers.0.resid_post", "--op", "zero", "--denoise", "all")
    assert seen["units"] is None and seen["denoise"] is None  # all steps


@pytest.mark.parametrize("option, value, says", [
    ("--denoise", "-1", "--denoise selection '-1': use non-negative numbers and closed ranges"),
    ("--units", "3-", "--units selection '3-': use non-negative numbers and closed ranges"),
    ("--units", "x", "malformed --units selection 'x'"),
])
def test_indices_that_need_the_model_are_refused_in_one_line_before_any_run(tmp_path, option, value, says):
    code, out = _intervene(tmp_path / "r", "--hook", "action.layers.0.mlp_act", "--op", "clamp", "--units", "1",
                           option, value)
    assert code != 0 and says in out and out.count("\n") == 1, out
    assert not (tmp_path / "r").exists()
