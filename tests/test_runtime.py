"""The numeric path and threads follow the hardware, can be forced, and are recorded."""

import os
import subprocess
import sys
import time

import pytest
import torch

import synth
from synth.runtime import bf16_faster, cpu_description, native_bf16, pick_threads, resolve_precision, usable_cpus


def test_auto_precision_follows_the_capability_the_machine_reports(monkeypatch):
    monkeypatch.delenv("SYNTHBRAIN_PRECISION", raising=False)
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    native = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and (torch.cpu._is_avx512_bf16_supported() or amx)
    assert native_bf16("cpu") == native
    assert bf16_faster("cpu") == (native and amx)
    assert resolve_precision("auto", "cpu") == ("bf16" if native and amx else "fp32")
    assert resolve_precision(None, "cpu") == ("bf16" if native and amx else "fp32")
    assert resolve_precision("auto", "cpu", model_allows=False) == "fp32"  # a model never checked in bf16


@pytest.mark.parametrize("fake_capability,fake_bf16,fake_amx,expected", [
    ("AVX2", True, False, "fp32"), ("AVX2", False, False, "fp32"), ("AVX2", True, True, "fp32"),  # emulated: never
    ("AVX512", False, False, "fp32"), ("DEFAULT", False, False, "fp32"),
    ("AVX512", True, False, "fp32"),  # native but measured slower than float32 (no AMX)
    ("AVX512", True, True, "bf16"), ("AVX512", False, True, "bf16")])  # AMX tiles
def test_auto_chooses_bf16_only_where_it_is_native_and_faster(monkeypatch, fake_capability, fake_bf16, fake_amx, expected):
    monkeypatch.delenv("SYNTHBRAIN_PRECISION", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: fake_capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fake_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: fake_amx, raising=False)
    assert resolve_precision("auto", "cpu") == expected
    assert native_bf16("cpu") == (fake_capability.startswith("AVX512") and (fake_bf16 or fake_amx))
    assert resolve_precision("bf16", "cpu") == "bf16"  # forcing still works


def test_an_avx2_process_on_this_machine_picks_fp32():
    """ATEN_CPU_CAPABILITY=avx2 is how an AVX2-only CPU is reproduced: the real check, in a real process."""
    code = "import synth.runtime as r; print(r.resolve_precision('auto', 'cpu'), r.native_bf16('cpu'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("SYNTHBRAIN_PRECISION", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fp32", "False"]


def test_precision_can_be_forced_by_argument_and_environment(monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "bf16")
    assert resolve_precision(None, "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"  # the argument wins
    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "FP32")
    assert resolve_precision(None, "cpu") == "fp32"
    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "half")
    with pytest.raises(ValueError, match="SYNTHBRAIN_PRECISION must be auto, fp32 or bf16, got 'half'"):
        resolve_precision(None, "cpu")
    with pytest.raises(ValueError, match="`precision` must be auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")


def test_threads_are_checked_and_overridable(monkeypatch):
    monkeypatch.delenv("SYNTHBRAIN_THREADS", raising=False)
    assert pick_threads(3) == 3
    assert 1 <= pick_threads() <= len(os.sched_getaffinity(0))
    assert usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SYNTHBRAIN_THREADS", "1")
    assert pick_threads() == 1
    for bad in (0, -2, "two", "1.5", True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            pick_threads(bad)
    monkeypatch.setenv("SYNTHBRAIN_THREADS", "0")
    with pytest.raises(ValueError, match="SYNTHBRAIN_THREADS must be a positive integer"):
        pick_threads()


def test_threads_leave_out_a_busy_core(monkeypatch):
    """With another process spinning on one of two cores, the automatic choice is one thread."""
    monkeypatch.delenv("SYNTHBRAIN_THREADS", raising=False)
    if len(os.sched_getaffinity(0)) != 2:
        pytest.skip("needs exactly two CPUs")
    from synth.runtime import idle_cpus

    if (idle_cpus(0.3) or 0) < 1.7:
        pytest.skip("this machine is already busy")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
    try:
        time.sleep(0.5)
        assert pick_threads() == 1
    finally:
        spin.kill()
        spin.wait()


def test_adaptive_threads_follow_other_processes_not_this_one(monkeypatch):
    """Threads drop to one while another process holds a core, come back when it stops, and this
    process's own work never counts as load; a count the caller fixed is never changed."""

    import torch

    from synth.runtime import AdaptiveThreads, idle_cpus

    if len(os.sched_getaffinity(0)) != 2:
        pytest.skip("needs exactly two CPUs")
    if (idle_cpus(0.3) or 0) < 1.7:
        pytest.skip("this machine is already busy")
    monkeypatch.delenv("SYNTHBRAIN_THREADS", raising=False)
    before = torch.get_num_threads()
    with AdaptiveThreads(interval=0.3) as gov:
        assert gov.threads == 2 and torch.get_num_threads() == 2
        x = torch.randn(256, 256)
        t = time.monotonic()
        while time.monotonic() - t < 0.4:  # this process busy on both threads: not others' load
            x = x @ x.T / 256
        assert gov.check() == 2
        spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
        try:
            time.sleep(0.5)
            gov.check()
            time.sleep(0.4)
            assert gov.check() == 1 and torch.get_num_threads() == 1
        finally:
            spin.kill()
            spin.wait()
        time.sleep(0.4)
        gov.check()
        time.sleep(0.4)
        assert gov.check() == 2 and torch.get_num_threads() == 2
        assert gov.used[0] == 2 and 1 in gov.used
        assert [n for _, n in gov.changes] == gov.used[1:]
    assert torch.get_num_threads() == before
    with AdaptiveThreads(1, interval=0.0) as fixed:
        time.sleep(0.05)
        assert fixed.check() == 1 and fixed.used == [1]


def test_cpu_description_names_the_hardware():
    d = cpu_description()
    assert d["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(d["native_bf16"], bool) and d["cores"] >= 1 and d["cpu"]


def test_median_seconds_warms_up_then_takes_the_median():
    from synth.runtime import median_seconds

    delays = iter([0.2, 0.0, 0.03, 0.01])  # the first call is the warm-up and is not timed
    assert 0.01 <= median_seconds(lambda: time.sleep(next(delays)), 3) < 0.03


def test_machine_line_says_where_a_benchmark_ran():
    from synth.runtime import machine_line

    d = cpu_description()
    line = machine_line(3, training_precision="fp32")
    assert line.startswith(f"machine: {d['cpu']}, {d['cores']} cores; ")
    assert f"kernels {d['capability']}; native bf16 {'yes' if d['native_bf16'] else 'no'}; " in line
    assert "; training precision fp32; 3 threads; " in line
    assert line.endswith(f"date {time.strftime('%Y-%m-%d')}")


def test_generate_records_the_precision_it_used_and_both_paths_give_a_brain(tiny_generator, monkeypatch):
    monkeypatch.delenv("SYNTHBRAIN_PRECISION", raising=False)
    cond = synth.Condition(age=60, sex="M")
    fp32 = tiny_generator.generate(cond, seed=1, precision="fp32", threads=1)
    bf16 = tiny_generator.generate(cond, seed=1, precision="bf16", threads=1)
    assert fp32.provenance["precision"] == "fp32" and fp32.provenance["bf16"] is False
    assert fp32.provenance["threads"] == 1
    assert bf16.provenance["precision"] == "bf16" and bf16.provenance["bf16"] is True
    assert fp32.image.shape == bf16.image.shape
    # the tiny model's config does not allow bf16, so auto stays on fp32 whatever the CPU
    assert tiny_generator.generate(cond, seed=1).provenance["precision"] == "fp32"
    with pytest.raises(ValueError, match="`precision` must be auto, fp32 or bf16"):
        tiny_generator.generate(cond, seed=1, precision="int8")


def test_cli_generate_takes_precision_threads_and_sampler(tiny_model_dir, tmp_path, capsys):
    import json

    from synth.cli import main

    out = tmp_path / "b.nii.gz"
    assert main(["generate", "--age", "50", "--sex", "F", "--model", str(tiny_model_dir), "--out", str(out),
                 "--precision", "fp32", "--threads", "1", "--sampler", "dpm++2m", "--steps", "3", "--quiet"]) == 0
    side = json.loads(out.with_name("b.json").read_text())
    prov = side.get("provenance", side)
    assert prov["precision"] == "fp32" and prov["sampler"] == "DPM-Solver++(2M)" and prov["steps"] == 3
    assert "fp32" in capsys.readouterr().out
    for bad in (["--precision", "half"], ["--threads", "0"], ["--sampler", "euler"]):
        assert main(["generate", "--age", "50", "--sex", "F", "--model", str(tiny_model_dir),
                     "--out", str(tmp_path / "c.nii.gz"), *bad]) == 2
        assert not (tmp_path / "c.nii.gz").exists()


def test_segmenter_follows_the_same_precision_helper(monkeypatch):
    from synth.anatomy.segmenter import Segmenter, SegmenterConfig, build_network
    from synth.anatomy.testing import tiny_network

    def make(**kw):
        return Segmenter(SegmenterConfig(network=tiny_network()), build_network(tiny_network()), device="cpu", **kw)

    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "auto")
    assert make().precision == resolve_precision("auto", "cpu")
    assert make(precision="fp32").bf16 is False
    assert make(bf16=True).precision == "bf16" and make(bf16=True).bf16 is True
    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "fp32")
    assert make().bf16 is False


_KEEP_CODE = """
import hashlib, sys
import numpy as np
import synth
from synth.runtime import keep_freed_memory

def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

gen = synth.load_generator(sys.argv[1], device='cpu')  # the generators call keep_freed_memory()
kept = keep_freed_memory()
before = rss_mb()
block = np.ones(64 * 2**20 // 8)  # 64 MB, every page touched
del block
after = rss_mb()
brain = gen.generate(synth.Condition(age=60, sex='F'), seed=5, threads=1)
print(kept, round(after - before), hashlib.sha256(brain.image.tobytes()).hexdigest())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_memory_is_kept_for_reuse_unless_switched_off_and_brains_are_the_same(tiny_model_dir):
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "SYNTHBRAIN_KEEP_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", _KEEP_CODE, str(tiny_model_dir)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        runs[setting] = (out[0], int(out[1]), out[2])
    assert runs["1"][0] == "True" and runs["0"][0] == "False"
    assert runs["1"][1] >= 60  # a freed 64 MB block stays in the process, ready for the next activation
    assert runs["0"][1] <= 8  # glibc's default: unmapped at once
    assert runs["1"][2] == runs["0"][2]  # the same brain, bit for bit
