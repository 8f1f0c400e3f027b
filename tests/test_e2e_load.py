"""The viewer under load, small: concurrent real browser sessions on a tiny model (benchmarks/bench_viewer_load.py).

The full figures (8 sessions on the shipped model, 200-generation soak) come from running the
benchmark itself; this test runs the same code with 2 sessions so that CI stays quick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

if not Path("/usr/bin/chromium").exists():
    pytest.skip("/usr/bin/chromium not found: apt-get install -y chromium", allow_module_level=True)
pytest.importorskip("playwright.async_api", reason="pip install playwright (never `playwright install`)")


def test_concurrent_sessions_each_get_their_own_brain_and_their_place_in_the_queue(viewer_bench):
    bench = viewer_bench
    models, env = bench._tiny_models(seconds_per_brain=4.0)  # long enough for the second click to queue
    out = bench.load_test(models, sessions=2, env=env, timeout_s=240)
    assert out["finished"] == 2, out["errors"]
    assert out["own_seed_everywhere"] and out["distinct_images"], out
    assert out["told_place_in_queue"] >= 1, out  # the second in line was told it waits
    assert not out["outside_requests"] and out["server_log_tracebacks"] == 0, out
    assert 0 < out["rss_peak_mb"] < 4000


def test_soak_memory_is_measured_and_does_not_grow(viewer_bench):
    bench = viewer_bench
    models, env = bench._tiny_models()
    out = bench.soak(models / "tiny-test-model", n=6, every=2, segmenter=str(models / env["SYNTHBRAIN_SEGMENTER"]) if env else None)
    assert [i for i, _ in out["rss_mb"]] == [0, 2, 4, 6]
    assert out["growth_after_first_block_mb"] < 100, out
