"""Shared training machinery: distributed set-up, mixed precision, resumable checkpoints, logs."""

from __future__ import annotations

import copy
import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path
from .defaults import is_model_folder  # noqa: F401 (re-exported)
from ..models.networks import autocast

__all__ = ["DistContext", "setup_distributed", "autocast", "Checkpointer", "LossLog", "EMA", "cosine_lr", "StepClock",
           "is_model_folder", "model_folder_weights", "resume_state", "autoencoder_weights", "autoencoder_config",
           "load_autoencoder_parts"]


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistContext:
    """Initialise DDP when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else a single process.

    One process per GPU on CUDA (NCCL); gloo on CPU. Freed activations stay in the process for the
    next step (:func:`synth.runtime.keep_freed_memory`).
    """
    from ..runtime import keep_freed_memory

    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, dev)


def cosine_lr(step: int, total: int, lr: float, lr_min: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1 + torch.cos(torch.tensor(p * torch.pi)).item())


class StepClock:
    """The per-step schedule shared by both trainers: learning rate, checkpoints, time limit."""

    def __init__(self, steps: int, lr: float, lr_min: float, ckpt_every: int, max_minutes: float | None):
        self.steps, self.lr, self.lr_min = steps, lr, lr_min
        self.ckpt_every, self.max_minutes = ckpt_every, max_minutes
        self.t0 = time.time()

    def set_lr(self, opt: torch.optim.Optimizer, step: int) -> float:
        """Cosine schedule with warm-up; writes the rate into ``opt`` and returns it."""
        lr = cosine_lr(step, self.steps, self.lr, self.lr_min)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    def after(self, step: int) -> tuple[bool, bool]:
        """``(checkpoint now, stop now)`` once ``step`` (0-based) is done."""
        out_of_time = self.max_minutes is not None and (time.time() - self.t0) > self.max_minutes * 60
        save = (step + 1) % self.ckpt_every == 0 or step + 1 == self.steps or out_of_time
        return save, out_of_time


class EMA:
    """Exponential moving average of a model's weights (used for sampling)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm up the average
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class Checkpointer:
    """Atomic ``last.pt`` in a run folder; ``resume()`` returns the saved state or ``None``."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "last.pt"

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def resume(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The random state a resumed run needs to draw what an uninterrupted run would have drawn."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any] | None, rng: np.random.Generator, world_size: int = 1) -> bool:
    """Put back :func:`rng_state` (single-process runs only: a checkpoint holds rank 0's state,
    which other ranks must not copy). Returns whether it was restored."""
    if not state or world_size > 1:
        return False
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    return True


def resume_state(state: dict[str, Any], parts: dict[str, Any], rng: np.random.Generator, reseed: int,
                 world_size: int = 1, optional: tuple[str, ...] = ()) -> tuple[int, np.random.Generator]:
    """Put a checkpoint (:meth:`Checkpointer.resume`) back into a run: each of ``parts`` (the checkpoint's
    key -> the module or optimiser it holds; ``None`` is skipped) gets its ``load_state_dict``; keys in
    ``optional`` may be absent (older checkpoints). Returns ``(step, rng)``: the RNG as saved
    (:func:`restore_rng`), or for checkpoints without one and for several ranks a new one seeded
    ``reseed + step``."""
    for key, obj in parts.items():
        if obj is None or (key in optional and key not in state):
            continue
        obj.load_state_dict(state[key])
    start = int(state["step"])
    if not restore_rng(state.get("rng"), rng, world_size):
        rng = np.random.default_rng(reseed + start)
    return start, rng


class LossLog:
    """Append-only CSV of training metrics (flushed every line, survives a crash).

    ``resume_step``: the step of the checkpoint a run resumes from; rows logged after it by the
    killed run are dropped, so the file holds each step once.
    """

    def __init__(self, path: str | Path, fields: list[str], resume_step: int | None = None):
        self.path = Path(path)
        self.fields = ["step", "time_s", *fields]
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not new:
            self._migrate()
            if resume_step is not None:
                self._truncate(resume_step)
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.fields)
        if new:
            self._w.writeheader()
        self._t0 = time.time()

    def log(self, step: int, **metrics: float) -> None:
        self._w.writerow({"step": step, "time_s": round(time.time() - self._t0, 1), **{k: f"{v:.6g}" for k, v in metrics.items()}})
        self._f.flush()

    def _migrate(self) -> None:
        """A resumed run that logs other columns (say, an added loss term): rewrite the file with
        the new header, old rows kept and blank in the new columns (atomically)."""
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == self.fields:
                return
            rows = list(reader)
            old = [k for k in (reader.fieldnames or []) if k not in self.fields]
        self.fields += old
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def _truncate(self, step: int) -> None:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or self.fields
            rows = list(reader)
        kept = [r for r in rows if str(r.get("step", "")).isdigit() and int(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(kept)

    def close(self) -> None:
        self._f.close()


def training_bf16(requested: bool, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: only when asked (``--no-bf16`` says no) *and* the numeric
    path of :func:`synth.runtime.resolve_precision` is bf16 (a GPU with bf16 or a CPU with AMX, or forced
    through ``$SYNTHBRAIN_PRECISION``). Emulated bf16 trains about a hundred times slower; on a Xeon with
    AVX512-BF16 but no AMX a UNet step took 2.52 s in bf16 against 2.07 s in float32 and an autoencoder
    step about the same (``benchmarks/bench_training_precision.py``)."""
    from ..runtime import resolve_precision

    return bool(requested) and resolve_precision(None, device) == "bf16"


def model_folder_weights(folder: str | Path, part: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(float32 state dict, ModelConfig)`` of one part (``autoencoder`` or ``unet``) of a packaged LDM
    folder, after its weights are checked against the config's SHA-256. Training can start from a
    shipped model this way (its EMA weights; the optimizer starts afresh)."""
    from safetensors.torch import load_file

    from ..models.config import ModelConfig

    config = ModelConfig.load(folder)
    path = Path(folder) / f"{part}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {part}.safetensors")
    return {k: v.float() for k, v in load_file(str(path)).items()}, config


def _checkpoint_file(p: Path) -> Path | None:
    ckpt = p if p.suffix == ".pt" and p.is_file() else p / "last.pt"
    return ckpt if ckpt.is_file() else None


def _checkpoint_config(ckpt: dict, path) -> dict[str, Any]:
    cfg = ckpt.get("config") or {}
    if isinstance(cfg.get("autoencoder"), dict):
        return dict(cfg["autoencoder"])
    raise FileNotFoundError(f"no autoencoder config at {path}: expected a model folder with config.json, "
                            "or a training run folder or .pt checkpoint written by train-autoencoder")


def autoencoder_config(path: str | Path) -> dict[str, Any]:
    """The ``AutoencoderKL`` architecture of a packaged model folder, a training run folder or a ``.pt``
    checkpoint (run folders and snapshots record their training config), for :func:`autoencoder_weights`."""
    p = Path(path)
    if is_model_folder(p):
        from ..models.config import ModelConfig

        return dict(ModelConfig.load(p).autoencoder)
    ckpt = _checkpoint_file(p)
    return _checkpoint_config(torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt else {}, path)


def autoencoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Float32 ``AutoencoderKL`` weights from a packaged model folder (checked against its SHA-256), a
    training run folder (``last.pt``'s EMA weights), a checkpoint file (``.pt``) or a ``.safetensors`` file."""
    p = Path(path)
    if is_model_folder(p):
        return model_folder_weights(p, "autoencoder")[0]
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(p)).items()}
    ckpt = _checkpoint_file(p)
    if ckpt:
        return _ema_weights(torch.load(ckpt, map_location="cpu", weights_only=False))
    raise FileNotFoundError(f"no autoencoder at {path}: expected a model folder with autoencoder.safetensors, "
                            "a training run folder with last.pt, a .pt checkpoint or a .safetensors file")


def _ema_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in ckpt["ema_state_dict"].items()}


def load_autoencoder_parts(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(autoencoder_config(path), autoencoder_weights(path))``, reading a checkpoint file once (a run's
    ``last.pt`` also holds optimiser and discriminator states, tens of MB)."""
    p = Path(path)
    ckpt = None if is_model_folder(p) else _checkpoint_file(p)
    if ckpt is None:
        return autoencoder_config(p), autoencoder_weights(p)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return _checkpoint_config(state, path), _ema_weights(state)
