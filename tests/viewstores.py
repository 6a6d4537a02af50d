"""Stores for the viewer's tests (tests/test_view.py, tests/test_view_browser.py): the tiny random pi0 on the
embedded LIBERO sample (8 episodes of 2 tasks, 2 steps each, its 32 px camera images), with and without frames,
a probe on every layer, and a small `toolkit intervene` run (ablating the probe's span) with frames."""

from __future__ import annotations

import warnings
from pathlib import Path

from click.testing import CliRunner

import toolkit

RUN = dict(model="pi0", dataset="libero", sites="vlm", layers="0-2", max_episodes=8, max_steps=2, dtype="float32")


def extract(path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(toolkit.extract(store=path, **{**RUN, **kw}))


def cli(*args: str) -> str:
    from toolkit.cli import cli as group

    result = CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def probe(store: Path, out: Path, *extra: str) -> tuple[Path, str]:
    text = cli("probe", store, "--site", "vlm", "--save-weights", "all", "--folds", "4", "--no-mdl", "--no-success",
               "--controls", "1", "--no-progress", "--out", out, *extra)
    return out, text


def intervene(out: Path, results: Path) -> Path:
    from toolkit.run.intervene import intervene as run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(out=out, direction=f"{results}:2", op="ablate", alphas="1", figures=False, retrain=False,
            **{**RUN, "frames": 64})
    return out


def make_all(root: Path) -> dict[str, Path]:
    frames = extract(root / "frames.zarr", frames=64)
    plain = extract(root / "plain.zarr")
    results, _ = probe(frames, root / "probe", "--no-report")
    return {"frames": frames, "plain": plain, "probe": results}
