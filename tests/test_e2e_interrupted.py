"""A Generate click is not lost when a rerun interrupts its generation, in a real browser.

Streamlit stops a running script when the browser asks for a rerun. The viewer's first page asks for one by
itself: its WebGL probe answers a moment after the page is drawn. A user who pressed Generate in that moment
saw the generation start and vanish, with no brain (seen twice in a row in ``test_e2e_refined``). Here the
probe's answer is held back until the generation is under way, then given, and the brain must still come.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

if not Path("/usr/bin/chromium").exists():
    pytest.skip("/usr/bin/chromium not found: apt-get install -y chromium", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")

PROBE_POST = 'post("streamlit:setComponentValue", {value: probe(), dataType: "json"});'
STEPS = 150  # a tiny model's brain then takes seconds, so the probe's answer lands while it is sampled


def test_generate_survives_a_rerun_during_its_generation(tmp_path, viewer_bench):
    from synth.testing import make_tiny_model

    bench = viewer_bench
    folder = make_tiny_model(tmp_path / "models" / "tiny-slow")
    config = json.loads((folder / "config.json").read_text())
    config["sampling"]["steps"] = STEPS
    (folder / "config.json").write_text(json.dumps(config))

    def held_probe(route):  # the probe answers when the test says so, not when its page has loaded
        body = route.fetch().text()
        assert PROBE_POST in body, "the probe's page changed: update this test"
        route.fulfill(body=body.replace(PROBE_POST, "window.synthbrainAnswer = function () { " + PROBE_POST + " };"),
                      content_type="text/html")

    proc, url, log = bench.start_server(tmp_path / "models", {"SYNTHBRAIN_THREADS": "2"})
    try:
        with playwright_sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=bench.CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.set_default_timeout(120_000)
                page.route(re.compile(r".*webgl_probe.*index\.html.*"), held_probe)
                page.goto(url)
                page.get_by_text("Set the condition in the sidebar").first.wait_for()
                page.wait_for_function(bench.PAGE_IDLE_JS)
                probe = _probe_frame(page)
                page.get_by_role("button", name="Generate").click()
                sampling = page.get_by_text(re.compile(rf"Sampling: step \d+/{STEPS}")).first
                sampling.wait_for()
                # the answer must come with most of the brain still to sample, or this test tests nothing
                step = int(re.search(r"step (\d+)/", sampling.inner_text()).group(1))
                assert step < STEPS // 2, f"the brain was nearly sampled ({step}/{STEPS}) before the probe answered"
                probe.evaluate("window.synthbrainAnswer()")
                page.get_by_text("age 65, F, CN, seed 0").first.wait_for()  # the brain, after all
                page.get_by_text(re.compile("Your browser draws WebGL in software")).first.wait_for()  # the answer too
                assert not page.get_by_text("Out of date").count()
            finally:
                browser.close()
    finally:
        bench.stop_server(proc)
    assert "Traceback" not in Path(log).read_text(), Path(log).read_text()[-3000:]


def _probe_frame(page):
    """The probe's frame, once its page has loaded and holds back its answer."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('iframe')].some(f => /webgl_probe/.test(f.src || ''))")
    for _ in range(600):
        for frame in page.frames:
            if "webgl_probe" in frame.url and frame.evaluate("typeof window.synthbrainAnswer === 'function'"):
                return frame
        page.wait_for_timeout(100)
    raise AssertionError("the WebGL probe's page never loaded")
