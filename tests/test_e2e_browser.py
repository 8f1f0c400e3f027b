"""End to end in a real browser: `streamlit run viewer/app.py` driven by headless Chromium (Playwright).

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install -y chromium``) and the
``playwright`` Python package; never ``playwright install`` (it downloads a browser). Skips with a
reason when either is missing.

Environment:
    SYNTHBRAIN_E2E_MODELS: a models folder to serve instead of a fresh tiny model (e.g. assets/models).
    SYNTHBRAIN_E2E_MODEL: the model to pick in that folder (default: the app's default).
    SYNTHBRAIN_UPDATE_SCREENSHOT=1: write docs/viewer.png (off by default, so CI leaves the tree clean).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "viewer.png"
LOGS: dict[str, Path] = {}  # server URL -> its log file

pytestmark = pytest.mark.e2e

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:g} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = os.environ.get("SYNTHBRAIN_E2E_MODELS")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not models:
        sys.path.insert(0, str(ROOT))
        from synth import Grid
        from synth.testing import make_tiny_model

        models = tmp_path_factory.mktemp("models")
        make_tiny_model(Path(models) / "tiny-test-model")
        try:
            from synth.anatomy.testing import make_tiny_segmenter
        except ImportError:
            pass
        else:  # a tiny segmenter on the tiny model's grid, so labels and surfaces appear
            make_tiny_segmenter(Path(models) / "tiny-test-segmenter", Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0)), steps=5)
            env["SYNTHBRAIN_SEGMENTER"] = "tiny-test-segmenter"
    env["SYNTHBRAIN_MODELS"] = str(models)
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    cmd = [
        sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.headless", "true",
        "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        LOGS[url] = log
        yield url
    finally:
        # Always stop the server and anything it started (its own process group).
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(log.read_text()[-4000:])


@pytest.fixture(scope="module")
def page(server):
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        outside = []
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "data:", "blob:", "about:")) else None)
        pg.outside_requests = outside
        try:
            yield pg
        finally:
            context.close()
            browser.close()


@pytest.fixture(autouse=True)
def _explain_failure(request, server, page):
    """When a test here fails, print the tail of the Streamlit server's log and the page's visible text:
    a timeout alone does not say whether the app raised, is still working, or shows something else."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    log = LOGS.get(server)
    if log is not None and log.exists():
        print("---- streamlit log (tail) ----\n" + log.read_text(errors="replace")[-4000:])
    try:
        print("---- page text ----\n" + page.locator("body").inner_text(timeout=5_000)[-3000:])
        for frame in page.frames[1:]:
            print(f"---- frame {frame.name or frame.url[:80]} ----\n" + frame.locator("body").inner_text(timeout=2_000)[:500])
    except Exception as exc:  # the page itself may be what broke
        print(f"(page text unavailable: {exc})")


def _drawn(element, timeout: float = 30.0) -> bool:
    """Whether ``element``'s picture shows something besides its background (WebGL has drawn)."""
    import io

    import numpy as np
    from PIL import Image

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pixels = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("L"), float)
        if pixels.std() > 3.0:
            return True
        time.sleep(0.5)
    return False


def _assert_no_outbound_attempt(log: Path) -> None:
    """The server log shows no attempt to reach the internet (e.g. trame_vtklocal fetching VTK wasm)."""
    text = log.read_text(errors="replace")
    for sign in ("gaierror", "Name or service not known", "ClientConnector", "gitlab.kitware.com", "Traceback"):
        assert sign not in text, f"the server log shows {sign!r}:\n{text[-3000:]}"


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


NIIVUE = 'iframe[title="niivue_component.niivue_viewer"]'


def _niivue_frame(page, index: int = 0):
    """The Playwright frame of the ``index``-th NiiVue viewer on the page."""
    handle = page.locator(NIIVUE).nth(index).element_handle()
    return handle.content_frame()


REDRAW_JS = """async ([fx, fy]) => {
  const c = document.querySelector('canvas');
  const r = c.getBoundingClientRect();
  const o = {clientX: r.left + r.width * fx, clientY: r.top + r.height * fy, bubbles: true, button: 0};
  const t0 = performance.now();
  c.dispatchEvent(new MouseEvent('mousedown', {...o, buttons: 1}));
  c.dispatchEvent(new MouseEvent('mouseup', {...o, buttons: 0}));
  await new Promise(res => requestAnimationFrame(() => requestAnimationFrame(res)));
  return performance.now() - t0;
}"""


def _phantom(path: Path) -> Path:
    """A small T1-like head made here: the MNI152 template brain in a bright skull shell, shifted 4 mm."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    sys.path.insert(0, str(ROOT))
    from synth.data.register import template_images
    from synth.grid import MNI_2MM

    tpl, mask = template_images(MNI_2MM)
    head = tpl.copy()
    head[ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=2)] = 0.9
    affine = MNI_2MM.affine.copy()
    affine[:3, 3] += (4.0, -3.0, 2.0)
    nib.save(nib.Nifti1Image((head * 300).astype(np.int16), affine), str(path))
    return path


def test_viewer_end_to_end(page, server, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    timings = {}
    # The WebGL probe answers late here (as on a busy machine, where CI once clicked Generate before it had):
    # the first brain may start on NiiVue and must still move to server-drawn slices when the answer comes.
    probe_pages = []

    def late_probe(route):
        probe_pages.append(route.request.url)
        body = route.fetch().text()
        assert 'post("streamlit:setComponentValue"' in body, "the probe's page changed: update this test"
        body = body.replace('post("streamlit:setComponentValue", {value: probe(), dataType: "json"});',
                            'setTimeout(function () { post("streamlit:setComponentValue", {value: probe(), dataType: "json"}); }, 6000);')
        route.fulfill(body=body, content_type="text/html")

    page.route(re.compile(r".*webgl_probe.*index\.html.*"), late_probe)
    t = time.perf_counter()
    page.goto(server)
    page.get_by_text("SynthBrain viewer").first.wait_for()
    page.get_by_text("not for clinical use").first.wait_for()
    page.get_by_text("expressed through morphometry").first.wait_for()
    page.get_by_text("What CN, MCI, AD, GM, WM, z and % ICV mean here").first.click()
    page.get_by_text("mild cognitive impairment").first.wait_for()
    timings["page"] = time.perf_counter() - t

    if os.environ.get("SYNTHBRAIN_E2E_MODEL"):
        page.get_by_text("Advanced").click()
        page.get_by_label("Model").click()
        page.get_by_role("option", name=os.environ["SYNTHBRAIN_E2E_MODEL"]).click()

    # Move the age slider with the keyboard: 65 -> 70.
    age = page.get_by_role("slider", name="Age (years)")
    age.focus()
    for _ in range(5):
        age.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('input[aria-label=\"Age (years)\"]').value === '70'")

    # Generate. Headless chromium draws WebGL in software (SwiftShader), which the page's probe reports,
    # so the first brain is shown as server-drawn planes; NiiVue is one click away.
    t = time.perf_counter()
    page.get_by_role("button", name="Generate").click()
    hover = page.frame_locator('iframe[title="st.iframe"], iframe[srcdoc]').first
    axial = hover.locator("img#axial")
    axial.wait_for(timeout=110_000)
    timings["first brain shown"] = time.perf_counter() - t
    assert probe_pages, "the WebGL probe's page was not intercepted: the late answer went untested"
    page.get_by_text("age 70, F, CN, seed 0").first.wait_for()
    page.get_by_text(re.compile("Your browser draws WebGL in software")).first.wait_for()

    # Server PNG layout: hover over a plane and read the intensity and the structure under the mouse.
    # the refined texture (a model with a refiner, Fast preview) and the labels follow the brain
    page.wait_for_function("() => !/Refining the 2 mm texture|Labelling the structures/.test(document.body.innerText)",
                           timeout=60_000)
    hover = page.frame_locator('iframe[title="st.iframe"], iframe[srcdoc]').first
    axial = hover.locator("img#axial")
    axial.wait_for(timeout=60_000)
    box = axial.bounding_box()
    readout_hover = hover.locator('[data-testid="hover-readout"]')
    text = ""
    for fx, fy in [(0.5, 0.45), (0.45, 0.5), (0.55, 0.4), (0.4, 0.6), (0.6, 0.55), (0.5, 0.3), (0.5, 0.7), (0.3, 0.5)]:
        axial.hover(position={"x": box["width"] * fx, "y": box["height"] * fy})
        page.wait_for_timeout(150)
        text = readout_hover.inner_text()
        if "structure: background" not in text:
            break
    assert text.startswith("axial · voxel (") and "T1 intensity" in text, text
    assert re.search(r"structure: (?!background)\S+", text), f"no structure named under the mouse: {text}"
    timings["hover readout"] = text

    # NiiVue (WebGL): drawn in the browser.
    t = time.perf_counter()
    page.get_by_text("Multiplanar + 3D", exact=True).click()
    page.locator(NIIVUE).first.wait_for(timeout=110_000)
    frame = _niivue_frame(page)
    canvas = frame.locator("canvas").first
    canvas.wait_for()
    assert _drawn(page.locator(NIIVUE).first), "NiiVue stayed blank"
    timings["NiiVue shown after choosing it"] = time.perf_counter() - t
    readout = page.get_by_text(re.compile(r"Crosshair: voxel \(")).first
    readout.wait_for()
    first_readout = readout.inner_text()

    # The legend of the label colours.
    page.get_by_text("What CN, MCI, AD, GM, WM, z and % ICV mean here").first.click()  # fold the glossary again
    page.get_by_text("Legend: label colours").first.click()
    legend = page.locator('[data-testid="label-legend"]').first
    legend.wait_for()
    assert re.search(r"\d+ [A-Z][A-Za-z-]+", legend.inner_text()), legend.inner_text()  # "10 Left-Hippocampus", ...

    if os.environ.get("SYNTHBRAIN_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": 1400, "height": 1500})
        page.evaluate("() => document.querySelectorAll('[data-testid=\"stMain\"], section.main').forEach(e => e.scrollTo(0, 0))")
        time.sleep(3)
        page.screenshot(path=str(SCREENSHOT), full_page=False)
        page.set_viewport_size({"width": 1400, "height": 1000})
        time.sleep(1)

    # Click a slice: the crosshair moves there (the picture changes) and the readout names the structure.
    before = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), float)
    box = canvas.bounding_box()
    canvas.click(position={"x": box["width"] * 0.22, "y": box["height"] * 0.30})
    page.wait_for_function(
        "(b) => [...document.querySelectorAll('p')].some(p => p.innerText.startsWith('Crosshair: voxel') && p.innerText !== b)",
        arg=first_readout, timeout=60_000,
    )
    after = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), float)
    assert np.abs(after - before).mean() > 0.5, "the crosshair did not move"
    clicked = page.get_by_text("Crosshair: voxel").first.inner_text()
    assert "structure:" in clicked and clicked != first_readout

    # Slice redraw in the browser: NiiVue's own click handler and two animation frames (median of 5).
    redraws = [frame.evaluate(REDRAW_JS, [0.15 + 0.03 * i, 0.25 + 0.02 * i]) for i in range(5)]
    timings["slice redraw in the browser, ms (median)"] = sorted(redraws)[2]

    # Morphometry: measured against requested, with the verdict.
    _tab(page, "Morphometry")
    page.get_by_text(re.compile("This brain missed its target|Measured volumes match the request")).first.wait_for(timeout=60_000)

    # 3D: the stpyvista (trame / vtk.js) view.
    _tab(page, "3D")
    page.get_by_text("Isosurface", exact=True).click()  # drawn for any brain, labelled or not
    frame3d = page.locator("iframe#stpyvistaframe")
    frame3d.wait_for()
    page.frame_locator("iframe#stpyvistaframe").locator("canvas").first.wait_for()
    assert _drawn(frame3d), "the 3D view stayed blank"

    # Compare: same seed, age 50 vs 80, the difference map and its colour bar.
    _tab(page, "Compare")
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("B − A (±").first.wait_for(timeout=110_000)

    # Your scan: a NIfTI made here, beside a synthetic brain.
    _tab(page, "Your scan")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(_phantom(tmp_path / "phantom_T1w.nii.gz")))
    page.get_by_text("voxels, read.").first.wait_for(timeout=60_000)
    page.get_by_role("button", name="Prepare and compare").click()
    page.get_by_text("Your scan (phantom_T1w.nii.gz)").first.wait_for(timeout=180_000)
    page.get_by_text("Synthetic brain: age 70, F, CN").first.wait_for()
    assert page.locator(NIIVUE).count() >= 2

    # Downloads: the T1 NIfTI and the slices PNG really arrive.
    _tab(page, "Downloads")
    with page.expect_download() as dl:
        page.get_by_role("button", name="T1 (NIfTI)").click()
    target = tmp_path / dl.value.suggested_filename
    dl.value.save_as(target)
    import nibabel as nib

    img = nib.load(str(target))
    assert len(img.shape) == 3 and b"SYNTHETIC" in img.header["descrip"].tobytes()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Slices (PNG)").click()
    png = tmp_path / dl.value.suggested_filename
    dl.value.save_as(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name.endswith("_slices.png")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Label table (BIDS dseg.tsv)").click()
    tsv = tmp_path / "dseg.tsv"
    dl.value.save_as(tsv)
    assert tsv.read_text().startswith("index\tname")

    # Change a control: the brain on screen is marked out of date until Generate.
    age.focus()
    age.press("ArrowRight")
    page.get_by_text("Out of date").first.wait_for(timeout=30_000)

    assert not page.outside_requests, f"the page reached outside the server: {page.outside_requests[:5]}"
    _assert_no_outbound_attempt(LOGS[server])
    print("e2e timings:", {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()})
