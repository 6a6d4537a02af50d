"""`toolkit view` in a real browser: Debian's Chromium (`apt-get install chromium`), driven headless by
playwright's Python API with ``executable_path`` (playwright's own browser download needs the internet).

The page opens with no console error and no request but the file itself; play moves the step and the frame;
a click on a heatmap cell seeks to its step; the screenshot is not blank.  Without Chromium or playwright these
tests skip, except in CI (``CI`` set: ``.ci/run`` installs both), where they fail with one line saying so."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import toolkit
import viewstores as V

CHROMIUM = os.environ.get("TOOLKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the test extra has it)"
    if not Path(CHROMIUM).is_file():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests cannot run in CI: {why}", pytrace=False)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return V.make_all(tmp_path_factory.mktemp("viewb"))


class Page:
    """A page of the browser opened on a file, recording console messages, page errors and requests."""

    def __init__(self, browser, path: Path, width: int = 1200):
        self.messages: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = Path(path).resolve().as_uri()
        self.page.goto(self.url)
        self.wait("window.viewer !== undefined")

    def wait(self, condition: str, seconds: float = 10.0) -> None:
        """Poll a JavaScript condition (the page's own policy forbids eval, so no ``wait_for_function``)."""
        deadline = time.monotonic() + seconds
        while not self.page.evaluate(condition):
            assert time.monotonic() < deadline, f"timed out waiting for {condition}"
            self.page.wait_for_timeout(50)

    def clean(self) -> None:
        errors = [m for m in self.messages if m.startswith(("error", "pageerror"))]
        assert not errors, errors
        assert self.requests == [self.url], self.requests  # the file itself, nothing else

    def index(self) -> int:
        return self.page.evaluate("window.viewer.i")


def not_blank(png: bytes, colours: int = 200) -> None:
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert a.std() > 20 and len(np.unique(a.reshape(-1, 3), axis=0)) > colours


def test_play_step_and_seek_with_frames(browser, stores, tmp_path):
    path = toolkit.view(stores["frames"], tmp_path / "v.html", results=stores["probe"])
    p = Page(browser, path)
    pg = p.page
    assert pg.inner_text("#step") == "step 0 (1/2)"
    assert pg.inner_text("#instruction") == "pick up the alphabet soup and place it in the basket"
    first = pg.get_attribute("#frame-0-wrist", "src")
    assert first.startswith("data:image/jpeg")
    pg.click("#play")
    p.wait("window.viewer.i === 1")
    assert pg.inner_text("#step") == "step 5 (2/2)"
    assert pg.get_attribute("#frame-0-wrist", "src") != first  # the frame moved with the step
    p.wait("window.viewer.playing === false")  # stops at the episode's end
    assert pg.inner_text("#play") == "play"
    pg.click("#prev")
    assert p.index() == 0 and pg.get_attribute("#frame-0-wrist", "src") == first
    # a click on the heatmap cell of layer vlm.1 at the second step seeks there
    geom = pg.evaluate("(() => { const c = document.getElementById('heatmap-0'); const g = c._geom; "
                       "return {left: g.left, cw: g.cw}; })()")
    pg.click("#heatmap-0", position={"x": geom["left"] + geom["cw"] * 1.5, "y": 4 + 16 * 1.5})
    assert p.index() == 1 and pg.inner_text("#step") == "step 5 (2/2)"
    pg.click("#heatmap-0", position={"x": geom["left"] + geom["cw"] * 0.5, "y": 4 + 16 * 2.5})
    assert p.index() == 0
    # the picker: the second task's episodes, then its failed ones only
    task = "pick_up_the_cream_cheese_and_place_it_in_the_basket"
    s = toolkit.open_store(stores["frames"])
    first = np.unique(s.coord("episode"), return_index=True)[1]
    outcomes = [int(v) for t, v in zip(s.coord("task")[first], s.coord("success")[first]) if str(t) == task]
    pg.select_option("#task-filter", task)
    assert pg.inner_text("#instruction") == "pick up the cream cheese and place it in the basket"
    assert pg.locator("#episode option").count() == len(outcomes) == 4
    pg.select_option("#success-filter", "0")
    assert pg.locator("#episode option").count() == outcomes.count(0) > 0
    assert pg.inner_text("#outcome") == "failure"
    pg.keyboard.press("ArrowRight")
    assert p.index() == 1
    not_blank(pg.screenshot(full_page=True))
    p.clean()


def test_without_frames_the_heatmap_and_plots_work(browser, stores, tmp_path):
    p = Page(browser, toolkit.view(stores["plain"], tmp_path / "v.html", results=stores["probe"]))
    pg = p.page
    assert pg.locator("img").count() == 0 and pg.locator("#heatmap-0").count() == 1
    assert pg.locator("#actions canvas").count() == 7
    pg.fill("#slider", "1")  # the slider seeks
    assert p.index() == 1
    not_blank(pg.locator("#heatmap-0").screenshot(), colours=20)
    p.clean()


@pytest.mark.slow
def test_an_intervention_side_by_side(browser, stores, tmp_path):
    run = V.intervene(tmp_path / "iv", stores["probe"])
    p = Page(browser, toolkit.view(intervention=run, out=tmp_path / "iv.html", results=stores["probe"]))
    pg = p.page
    assert pg.locator(".column").count() == 2 and pg.locator("#heatmap-1").count() == 1
    assert pg.get_attribute("#frame-1-agentview", "src").startswith("data:image/jpeg")
    pg.click("#next")
    assert p.index() == 1
    not_blank(pg.screenshot(full_page=True))
    p.clean()
