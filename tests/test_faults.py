"""Faults: the real CLI killed (SIGKILL) at random points leaves only complete files; a killed training resumes.

SIGKILL cannot be caught, so what these tests check is the design: every file is written to a
hidden temporary and renamed into place (:func:`synth.io.atomic_path`), a brain's sidecar goes
before its image, the temporaries of a killed process are removed by the next write into that
folder, and a training checkpoint holds everything (weights, optimiser, EMA, random state) needed
to continue exactly where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from synth.anatomy.testing import make_tiny_segmenter
from synth.grid import Grid

ROOT = Path(__file__).resolve().parents[1]
TINY_GEN_GRID = Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYVISTA_OFF_SCREEN": "true",
       "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_segmenter_dir(tmp_path_factory) -> Path:
    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", TINY_GEN_GRID, steps=2)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "synth", *args]


def _kill_while_writing(cmd: list[str], out: Path, delay: float) -> int:
    """Start ``cmd``, wait for its first file (or temporary) in ``out``, then SIGKILL it ``delay`` s later."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (out.is_dir() and any(out.iterdir())):
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def _complete(path: Path) -> None:
    """Raise unless ``path`` is a whole, readable file of its format."""
    name = path.name.lower()
    if name.endswith((".nii.gz", ".nii")):
        from synth.io import load_nifti

        load_nifti(path)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith((".usda", ".usdc", ".usdz")):
        from pxr import Usd

        assert Usd.Stage.Open(str(path)) is not None, path
    elif name.endswith(".stl"):
        data = path.read_bytes()
        n = int.from_bytes(data[80:84], "little")
        assert len(data) == 84 + 50 * n and n > 0, path
    elif name.endswith((".ply", ".obj", ".glb")):
        import trimesh

        assert len(trimesh.load(path, force="mesh").faces) > 0, path
    else:  # pragma: no cover
        raise AssertionError(f"unexpected file {path}")


def _check_folder(folder: Path) -> list[str]:
    """Every visible file is complete; hidden ones may only be a killed writer's temporaries."""
    if not folder.exists():
        return []
    visible = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            assert ".partial-" in p.name, f"unexpected hidden file {p.name}"
            continue
        _complete(p)
        visible.append(p.name)
    for name in visible:  # a brain's image never exists without its provenance
        if name.endswith(".nii.gz") and "_labels" not in name:
            assert name[: -len(".nii.gz")] + ".json" in visible, f"{name} without its sidecar"
    return visible


def test_export_killed_at_random_points_leaves_only_complete_files(tiny_model_dir, tiny_segmenter_dir, tmp_path):
    def cmd(out: Path, *extra: str) -> list[str]:
        return _cli("export", "--age", "70", "--sex", "F", "--seed", "2", "--model", str(tiny_model_dir),
                    "--segmenter", str(tiny_segmenter_dir), "--device", "cpu", "--out-dir", str(out), *extra)

    full = _timed(cmd(tmp_path / "reference"))
    reference = _check_folder(tmp_path / "reference")
    assert len(reference) == 11  # t1 + sidecar, labels + table, usda usdc usdz stl ply obj glb
    rng = np.random.default_rng(13)
    codes = []
    for i, delay in enumerate(rng.uniform(0.0, 0.1 * full, size=2)):  # at random points of the writing
        out = tmp_path / f"killed{i}"
        codes.append(_kill_while_writing(cmd(out), out, delay))
        visible = _check_folder(out)
        assert set(visible) <= {n.replace("reference", out.name) for n in reference}
    assert -signal.SIGKILL in codes, "no run was killed before it finished"
    # The next write into a folder finishes the job and removes a killed writer's temporaries.
    subprocess.run(cmd(out, "--force"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    assert len(_check_folder(out)) == len(reference)
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_generation_killed_at_random_points_leaves_only_complete_brains(tiny_model_dir, tmp_path):
    def cmd(out: Path, *extra: str) -> list[str]:
        return _cli("generate", "--age", "40", "--sex", "M", "--n", "3", "--model", str(tiny_model_dir), "--device", "cpu",
                    "--quiet", "--out", str(out / "b.nii.gz"), *extra)

    full = _timed(cmd(tmp_path / "reference"))
    assert len(_check_folder(tmp_path / "reference")) == 6
    rng = np.random.default_rng(7)
    codes = []
    for i, delay in enumerate(rng.uniform(0.0, 0.2 * full, size=2)):  # between and during the three brains
        out = tmp_path / f"killed{i}"
        codes.append(_kill_while_writing(cmd(out), out, delay))
        _check_folder(out)
    assert -signal.SIGKILL in codes, "no run was killed before it finished"


TRAIN = """
import os
import sys
sys.path.insert(0, os.getcwd())  # the repository root, for tests.test_train
import torch
torch.set_num_threads(1)
from tests.test_train import TINY_AE, phantoms
from synth.train.autoencoder import AETrainConfig, train_autoencoder

vols, _ = phantoms()
cfg = AETrainConfig(data_dir="", run_dir=sys.argv[1], steps=int(sys.argv[2]), ckpt_every=5, bf16=False,
                    autoencoder=dict(TINY_AE), batch_size=2, lr=3e-3, seed=0)
train_autoencoder(cfg, volumes=vols, progress=False)
"""


def _logged_steps(run: Path) -> list[int]:
    if not (run / "losses.csv").is_file():
        return []
    with open(run / "losses.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("step", "").isdigit()]


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    import torch

    steps = 40
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    run_train = lambda run: subprocess.run([sys.executable, str(script), str(run), str(steps)], cwd=ROOT, env=ENV,  # noqa: E731
                                           check=True, capture_output=True, timeout=300)
    run_train(tmp_path / "straight")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(steps)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_logged_steps(killed)) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    logged = _logged_steps(killed)
    assert 12 <= len(logged) < steps, "the run was not killed mid-training; make it longer"
    stopped_at = torch.load(killed / "last.pt", weights_only=False)["step"]
    assert stopped_at % 5 == 0 and stopped_at <= logged[-1]

    run_train(killed)  # resume from last.pt
    resumed = torch.load(killed / "last.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == steps
    assert _logged_steps(killed) == list(range(1, steps + 1))  # each step logged once
    assert not any(p.name.startswith(".") for p in killed.iterdir())
    # Same code path, same thread count, random state restored from the checkpoint: exactly equal.
    for key in ("state_dict", "ema_state_dict"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name} differs after resuming"
    with open(killed / "losses.csv") as a, open(tmp_path / "straight" / "losses.csv") as b:
        assert [r["loss"] for r in csv.DictReader(a)] == [r["loss"] for r in csv.DictReader(b)]
