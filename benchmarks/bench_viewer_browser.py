"""Where the viewer's first brain spends its time in a real browser, milestone by milestone.

Starts ``streamlit run viewer/app.py`` on 127.0.0.1 (the shipped models unless ``--models``), opens
headless Debian chromium (Playwright, ``/usr/bin/chromium --no-sandbox``; never ``playwright
install``), sets age 70, clicks Generate and polls the page every ``--poll`` seconds for:

- ``server done``: the result caption ("age 70, F, CN, seed 0") is on the page (the script run that
  generated the brain has reached the page);
- ``viewer frame``: the NiiVue component's iframe exists (NiiVue layouts only);
- ``canvas``: its WebGL canvas exists;
- ``first brain shown``: NiiVue's picture shows something besides its background (an element
  screenshot, taken only once the canvas exists; the time is taken after the screenshot that saw
  it), or the three server-drawn planes of the "Server PNG" layout have loaded;
- ``refined shown``: the page run after "Refining the 2 mm texture" has begun (its "Labelling the
  structures" line is up) or that line is gone (Fast preview of a model with a refiner, Refiner on
  auto: the refined brain, which follows the brain, is being drawn);
- ``labels shown``: the "labelling the structures" line is gone (the segmentation, which follows the
  brain, is on the page).

Each layout named in ``--layouts`` gets a fresh server and a fresh browser, so nothing is cached
between them; ``--repeat`` repeats the whole set. It prints the CPU (model, PyTorch capability, native
bf16 or not) and the figures, and writes them as JSON with ``--json``.

    python benchmarks/bench_viewer_browser.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_viewer_browser.py --layouts "Multiplanar + 3D" "Server PNG"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_viewer_load import CHROMIUM, PAGE_IDLE_JS, start_server, stop_server  # noqa: E402

NIIVUE = 'iframe[title="niivue_component.niivue_viewer"]'

PAGE_STATE = """(caption) => ({
  caption: document.body.innerText.includes(caption),
  running: !!document.querySelector('[data-testid="stStatusWidget"]')
           && document.querySelector('[data-testid="stStatusWidget"]').innerText.toLowerCase().includes('running'),
  labelling: /labelling the structures/i.test(document.body.innerText),
  refining: document.body.innerText.includes('Refining the 2 mm texture'),
  frame: !!document.querySelector('iframe[title="niivue_component.niivue_viewer"]'),
})"""

# The "Server PNG" layout: an iframe of our own whose three plane images have loaded.
PNG_DRAWN = """() => Array.from(document.querySelectorAll('img')).filter(im => im.complete && im.naturalWidth > 0).length >= 3"""


def _drawn(element) -> bool:
    """Whether ``element``'s picture shows something besides its background (as tests/test_e2e_browser.py)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("L"), float)
    return pixels.std() > 3.0


def cpu_line() -> str:
    from synth.runtime import cpu_description

    d = cpu_description()
    forced = " (forced by ATEN_CPU_CAPABILITY)" if os.environ.get("ATEN_CPU_CAPABILITY") else ""
    return (f"CPU: {d['cpu']}, {d['cores']} cores; PyTorch capability {d['capability']}{forced}; "
            f"native bf16: {d['native_bf16']}; torch {d['torch']}")


def first_brain(url: str, *, settle: float = 5.0, age_clicks: int = 5, poll: float = 0.05, timeout: float = 180.0) -> dict:
    """Seconds from the Generate click to each milestone, for one fresh browser on ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(120_000)
            t = time.perf_counter()
            page.goto(url)
            page.get_by_text("Set the condition in the sidebar").first.wait_for()
            out = {"page load": time.perf_counter() - t}
            age = page.get_by_role("slider", name="Age (years)")
            age.focus()
            for _ in range(age_clicks):
                age.press("ArrowRight")
            page.wait_for_function("() => document.querySelector('input[aria-label=\"Age (years)\"]').value === '70'")
            time.sleep(settle)  # a user takes a few seconds over the sliders; the app loads the model meanwhile
            page.wait_for_function(PAGE_IDLE_JS)
            caption = "age 70, F, CN, seed 0"
            t = time.perf_counter()
            page.get_by_role("button", name="Generate").click()
            while True:
                now = time.perf_counter() - t
                if now > timeout:
                    out["timed out"] = now
                    break
                s = page.evaluate(PAGE_STATE, caption)
                if s["caption"] and "server done" not in out:
                    out["server done"] = now
                    stages = page.locator('[data-testid="stMarkdownContainer"]', has_text="model").filter(has_text=caption).first.inner_text()
                    print(f"  the page's own timing: {stages.split(' · ')[-1]}", flush=True)
                if s["caption"] and not s["running"]:
                    out.setdefault("run finished", now)
                if s["caption"] and s["refining"]:
                    out.setdefault("refining", now)
                if "refining" in out and (s["labelling"] or not s["refining"]):  # the run after the refinement
                    out.setdefault("refined shown", now)
                if s["caption"] and s["labelling"]:
                    out.setdefault("labelling", now)
                if "labelling" in out and not s["labelling"]:
                    out.setdefault("labels shown", now)
                if s["frame"] and "first brain shown" not in out:
                    out.setdefault("viewer frame", now)
                    frame = page.locator(NIIVUE).first.element_handle().content_frame()
                    if frame is not None and frame.evaluate("() => !!document.querySelector('canvas')"):
                        out.setdefault("canvas", now)
                        if _drawn(page.locator(NIIVUE).first):
                            out["first brain shown"] = time.perf_counter() - t  # after the screenshot that saw it
                elif s["caption"] and "first brain shown" not in out:
                    for frame in page.frames[1:]:
                        try:
                            if frame.evaluate(PNG_DRAWN):
                                out["first brain shown"] = time.perf_counter() - t
                                break
                        except Exception:  # noqa: BLE001  (a frame that went away meanwhile)
                            continue
                if "first brain shown" in out and ("labels shown" in out or now > out["first brain shown"] + 30):
                    break
                time.sleep(poll)
            return out
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=str(ROOT / "assets" / "models"), help="models folder to serve")
    ap.add_argument("--layouts", nargs="+", default=["default"],
                    help="viewer layouts to time ('default' = the app's own choice), e.g. 'Multiplanar + 3D' 'Server PNG'")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between setting the age and clicking Generate (a user's time at the sliders)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    print(cpu_line(), flush=True)
    print(f"date {time.strftime('%Y-%m-%d')}; models {args.models}; chromium {CHROMIUM} (software WebGL when headless)", flush=True)
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for layout in args.layouts:
            env = dict(os.environ)
            if layout != "default":
                env["SYNTHBRAIN_VIEWER_LAYOUT"] = layout
            proc, url, log = start_server(args.models, env=env)
            try:
                r = first_brain(url, settle=args.settle)
            finally:
                stop_server(proc)
            rows.setdefault(layout, []).append(r)
            print(f"{layout}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()), flush=True)
    keys = ["server done", "viewer frame", "canvas", "first brain shown", "refined shown", "labels shown"]
    print("\nmedian seconds after the Generate click")
    print("layout".ljust(22) + "".join(k.rjust(19) for k in keys))
    for layout, rs in rows.items():
        cells = []
        for k in keys:
            v = [r[k] for r in rs if k in r]
            cells.append(f"{statistics.median(v):.2f}".rjust(19) if v else "-".rjust(19))
        print(layout.ljust(22) + "".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "date": time.strftime("%Y-%m-%d"), "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
