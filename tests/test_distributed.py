"""Multi-process training through torchrun (DDP on CPU with gloo), as on several GPUs."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import write_prepared

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not on PATH")


def train_with_two_processes(tmp_path, run, *extra) -> dict:
    """Three autoencoder steps on two gloo processes; returns the checkpoint."""
    data = write_prepared(tmp_path / "prep", ages=(25, 35, 45, 55), split="train")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "synth.cli", "train-autoencoder",
           "--data", str(data.root), "--run-dir", str(run), "--steps", "3", "--no-bf16", "--quiet", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)


@needs_torchrun
def test_torchrun_two_processes_train_and_checkpoint(tmp_path):
    run = tmp_path / "ae"
    state = train_with_two_processes(tmp_path, run)
    assert state["step"] == 3
    assert len((run / "losses.csv").read_text().strip().splitlines()) == 1 + 3  # only rank 0 logs


@needs_torchrun
def test_torchrun_two_processes_with_the_adversarial_loss(tmp_path):
    run = tmp_path / "adv"
    state = train_with_two_processes(tmp_path, run, "--channels", "16", "16", "--adv-weight", "0.1", "--adv-start", "1")
    assert state["step"] == 3 and "discriminator" in state
    rows = (run / "losses.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and rows[0].split(",")[6:8] == ["adv", "disc"]
