#!/usr/bin/env python
"""The viewer under load: N real browser sessions generating at once, and a soak of many generations.

    python benchmarks/bench_viewer_load.py --sessions 8                 # shipped model, 8 browsers
    python benchmarks/bench_viewer_load.py --soak 200 --every 20        # 200 generations in one process
    python benchmarks/bench_viewer_load.py --sessions 3 --tiny          # a tiny model (what the test runs)

Load: starts ``streamlit run viewer/app.py`` on 127.0.0.1, opens N browser contexts in headless
Debian chromium (Playwright; ``/usr/bin/chromium --no-sandbox``; never ``playwright install``), gives
each session its own seed, and clicks Generate in all of them at once. Checks that every session
finishes, that each one's downloaded provenance names its own seed and its T1 differs from every
other session's (no session sees another's brain), and that the page told waiting users their place
in the queue. Samples the server's resident memory (its process tree, from /proc) throughout.

Soak: in one process, the functions the app calls (``viewer.service.run_generation`` with the
segmenter, plus the NiiVue bytes of each brain) for many seeds, resident memory measured every
``--every`` generations after a garbage collection: it should stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
# true once the page's current script run is over (Streamlit's status widget no longer says "running")
PAGE_IDLE_JS = ("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.toLowerCase().includes('running')")


# -- memory -------------------------------------------------------------------------------------
def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory (MB) of ``pid`` and, with ``children``, of every process below it (Linux /proc)."""
    pids = [pid]
    if children:
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        except OSError:
            out = ""
        for child in out.split():
            pids += [int(child)]
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return total


class MemorySampler(threading.Thread):
    """Samples ``rss_mb(pid)`` every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join(5)
        return self.samples


# -- server -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: str | Path, env: dict | None = None, log: Path | None = None, timeout: float = 90.0):
    """``streamlit run viewer/app.py`` on a free 127.0.0.1 port; returns ``(process, url, log_path)``."""
    port = _free_port()
    log = Path(log or tempfile.mkstemp(prefix="synthbrain-load-", suffix=".log")[1])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "SYNTHBRAIN_MODELS": str(models), **(env or {})}
    cmd = [sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.headless", "true", "--server.port",
           str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url, log
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its process group (only what ``start_server`` started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


# -- browser sessions ---------------------------------------------------------------------------
async def _session(browser, url: str, seed: int, go: asyncio.Event, ready: list, timeout_s: float) -> dict:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = await context.new_page()
    page.set_default_timeout(timeout_s * 1000)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:", "about:")) else None)
    out = {"seed": seed, "places": []}
    try:
        await page.goto(url)
        await page.get_by_text("SynthBrain viewer").first.wait_for()
        seed_box = page.get_by_label("Seed")
        await seed_box.fill(str(seed))
        await seed_box.press("Enter")
        await page.wait_for_function(
            "(s) => document.querySelector('input[aria-label=\"Seed\"]')?.value === String(s)", arg=seed)
        await asyncio.sleep(1.0)  # let the rerun settle
        ready.append(seed)
        await go.wait()
        t = time.perf_counter()
        await page.get_by_role("button", name="Generate").click()
        header = page.get_by_text(re.compile(rf"seed {seed}\b")).first
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await header.is_visible():
                break
            for text in await page.get_by_text("ahead of yours").all_inner_texts():
                m = re.search(r"queued, (\d+) generation", text)
                if m:
                    out["places"].append(int(m.group(1)))
            await asyncio.sleep(0.1)
        await header.wait_for(timeout=1000)
        # The slices: NiiVue, or (a browser whose WebGL runs in software, as headless chromium) the server-drawn planes.
        await page.locator('iframe[title="niivue_component.niivue_viewer"], iframe[title="st.iframe"]').first.wait_for()
        out["seconds"] = time.perf_counter() - t
        # The refined texture (Fast preview of a model with a refiner) and the labels follow the brain (reruns
        # of the page): download once they are on it.
        await page.wait_for_function(
            "() => !/Refining the 2 mm texture|Labelling the structures|Matching the requested volumes/.test(document.body.innerText)",
            timeout=max(1.0, deadline - time.monotonic()) * 1000)
        out["labels_seconds"] = time.perf_counter() - t
        await page.get_by_role("tab", name="Downloads", exact=True).click()
        async with page.expect_download() as dl:
            await page.get_by_role("button", name="Provenance (JSON)").click()
        meta = json.loads(Path(await (await dl.value).path()).read_text())
        out["provenance_seed"] = meta.get("seed")
        async with page.expect_download() as dl:
            await page.get_by_role("button", name="T1 (NIfTI)").click()
        import gzip

        import nibabel as nib

        raw = Path(await (await dl.value).path()).read_bytes()
        img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        out["image_sha"] = hashlib.sha256(img.get_fdata().astype("float32").tobytes()).hexdigest()[:16]
        out["outside"] = outside
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported per session
        out["ok"], out["error"] = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        await context.close()
    return out


async def _run_sessions(url: str, seeds: list[int], timeout_s: float) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        go, ready = asyncio.Event(), []
        tasks = [asyncio.create_task(_session(browser, url, s, go, ready, timeout_s)) for s in seeds]
        t0 = time.monotonic()
        while len(ready) < len(seeds) and time.monotonic() - t0 < timeout_s and not all(t.done() for t in tasks):
            await asyncio.sleep(0.2)
        go.set()  # everyone clicks Generate at once
        results = await asyncio.gather(*tasks)
        await browser.close()
    return results


def load_test(models: str | Path, sessions: int = 8, env: dict | None = None, timeout_s: float = 900.0,
              first_seed: int = 101) -> dict:
    """Run ``sessions`` concurrent browser sessions against a fresh server; returns the figures and checks."""
    proc, url, log = start_server(models, env)
    sampler = MemorySampler(proc.pid)
    try:
        rss_idle = rss_mb(proc.pid)
        sampler.start()
        seeds = [first_seed + 7 * i for i in range(sessions)]
        t = time.perf_counter()
        results = asyncio.run(_run_sessions(url, seeds, timeout_s))
        wall = time.perf_counter() - t
        samples = sampler.stop()
        rss_after = rss_mb(proc.pid)
    finally:
        if sampler.is_alive():
            sampler.stop()
        stop_server(proc)
    ok = [r for r in results if r.get("ok")]
    shas = [r["image_sha"] for r in ok]
    text = Path(log).read_text(errors="replace")
    return {
        "sessions": sessions,
        "finished": len(ok),
        "errors": [r.get("error") for r in results if not r.get("ok")],
        "own_seed_everywhere": all(r["provenance_seed"] == r["seed"] for r in ok),
        "distinct_images": len(set(shas)) == len(shas),
        "told_place_in_queue": sum(1 for r in ok if r["places"]),
        "places_seen": [sorted(set(r["places"]), reverse=True) for r in ok],
        "max_place_seen": max((max(r["places"]) for r in ok if r["places"]), default=0),
        "seconds_per_session": sorted(round(r["seconds"], 2) for r in ok),
        "wall_s": round(wall, 2),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_peak_mb": round(max(samples, default=rss_idle), 1),
        "rss_after_mb": round(rss_after, 1),
        "outside_requests": sorted({u for r in ok for u in r.get("outside", [])})[:5],
        "server_log_tracebacks": text.count("Traceback"),
        "log": str(log),
    }


# -- soak ---------------------------------------------------------------------------------------
def soak(model: str | Path | None, n: int = 200, every: int = 20, segmenter: str | None = None, steps: int | None = None) -> dict:
    """``n`` generations (+ segmentation and the NiiVue bytes) in this process; RSS every ``every``."""
    import synth
    from viewer import niivue, render, service

    gen = synth.load_generator(model, device="cpu") if model else synth.load_generator(device="cpu")
    seg, lut = None, None
    anat = service.anatomy()
    if anat is not None:
        seg = anat.load_segmenter(segmenter, device="cpu") if segmenter else anat.load_segmenter(device="cpu")
        lut = render.label_lut(service.label_colors(anat.STRUCTURES))
    name = Path(str(model)).name if model else synth.DEFAULT_MODEL
    points, times = [], []
    gc.collect()
    points.append((0, rss_mb(os.getpid(), children=False)))
    for i in range(1, n + 1):
        request = service.parse_request(model=name, age=20 + (i * 7) % 70, sex="FM"[i % 2], diagnosis=("CN", "MCI", "AD")[i % 3],
                                        seed=1000 + i, models=[name], steps=steps)
        t = time.perf_counter()
        out = service.run_generation(gen, request, segmenter=seg)
        niivue.t1_bytes(out.brain.image, out.brain.affine)
        if out.labels is not None and lut is not None:
            niivue.label_overlay_bytes(out.labels, out.brain.affine, lut)
        times.append(time.perf_counter() - t)
        del out
        if i % every == 0:
            gc.collect()
            points.append((i, rss_mb(os.getpid(), children=False)))
            print(f"  {i:4d} generations: RSS {points[-1][1]:.0f} MB, median {statistics.median(times):.2f} s each", flush=True)
    first = points[1][1] if len(points) > 1 else points[0][1]
    return {
        "model": name,
        "steps": steps or "model default",
        "generations": n,
        "rss_mb": [(i, round(v, 1)) for i, v in points],
        "growth_after_first_block_mb": round(points[-1][1] - first, 1),
        "median_s": round(statistics.median(times), 3),
    }


def _tiny_models(seconds_per_brain: float | None = None) -> tuple[Path, dict]:
    """A models folder with a tiny generator (and a tiny segmenter when the anatomy extra is installed).

    With ``seconds_per_brain``, the generator's default step count is raised, measured on this
    machine, until one brain takes about that long: a tiny brain otherwise takes milliseconds, and
    a second session's click would then arrive after the first brain is done, with no queue to see.
    """
    from synth import Grid
    from synth.testing import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="synthbrain-load-models-"))
    make_tiny_model(root / "tiny-test-model")
    if seconds_per_brain:
        _slow_down(root / "tiny-test-model", seconds_per_brain)
    env = {}
    try:
        from synth.anatomy.testing import make_tiny_segmenter
    except ImportError:
        pass
    else:
        make_tiny_segmenter(root / "tiny-test-segmenter", Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0)), steps=5)
        env["SYNTHBRAIN_SEGMENTER"] = "tiny-test-segmenter"
    return root, env


def _slow_down(folder: Path, seconds: float, probe_steps: int = 20) -> int:
    """Set ``folder``'s default sampling steps so that one brain takes about ``seconds`` here; returns them."""
    import synth

    gen = synth.load_generator(folder, device="cpu")
    condition = synth.Condition(50, "F", "CN")
    gen.generate(condition, seed=0, steps=probe_steps)  # warm-up
    t = time.perf_counter()
    gen.generate(condition, seed=1, steps=probe_steps)
    per_step = (time.perf_counter() - t) / probe_steps
    steps = int(min(5000, max(probe_steps, seconds / max(per_step, 1e-4))))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sampling"]["steps"] = steps
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=0, help="concurrent browser sessions (0: no load test)")
    p.add_argument("--soak", type=int, default=0, help="generations in one process (0: no soak)")
    p.add_argument("--every", type=int, default=20, help="measure memory every this many soak generations")
    p.add_argument("--steps", type=int, default=None, help="sampling steps in the soak (default: the model's)")
    p.add_argument("--models", default=str(ROOT / "assets" / "models"), help="models folder for the load test")
    p.add_argument("--tiny", action="store_true", help="use a freshly made tiny model instead")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if args.sessions < 1 and args.soak < 1:
        p.error("give --sessions N and/or --soak N")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "load_average_at_start": os.getloadavg()}
    models, env = (args.models, {})
    if args.tiny:
        models, env = _tiny_models(seconds_per_brain=4.0 if args.sessions else None)
    if args.sessions:
        report["load"] = load_test(models, args.sessions, env)
        print(json.dumps(report["load"], indent=2))
    if args.soak:
        model = (Path(models) / "tiny-test-model") if args.tiny else None
        seg = env.get("SYNTHBRAIN_SEGMENTER") and str(Path(models) / env["SYNTHBRAIN_SEGMENTER"])
        report["soak"] = soak(model, args.soak, args.every, seg, args.steps)
        print(json.dumps(report["soak"], indent=2))
    report["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    load = report.get("load")
    bad = load is not None and (load["finished"] != load["sessions"] or not load["own_seed_everywhere"] or not load["distinct_images"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
