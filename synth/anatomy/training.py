"""Training of the compact-anatomy segmenter on prepared IXI volumes (whole 80x96x80 volumes).

Loss: Dice + cross-entropy (MONAI ``DiceCELoss``; Milletari et al. 2016 for soft Dice). One whole
volume per step, AdamW, cosine learning rate that ends when either the step or the time budget
ends, bf16 autocast on CPU and CUDA. Augmentations (all seeded from the run's generator):
left-right mirror with Left/Right labels swapped, integer shifts, gamma and contrast, Gaussian blur
(generated brains are smoother than real ones) and noise.

Checkpoints go to a run folder outside the repository (``last.pt``, resumable) with a CSV log.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..io import atomic_path, write_json
from .labels import STRUCTURES, muse_to_compact
from .segmenter import NUM_CLASSES, SegmenterConfig, build_network, default_network, lr_swap_table
from .volumes import dice_scores

__all__ = ["SegTrainConfig", "augment", "evaluate", "export_segmenter", "load_split", "train_segmenter"]


@dataclass
class SegTrainConfig:
    """Hyper-parameters of a segmenter run (every one explicit, with its default)."""

    data_dir: str = ""
    run_dir: str = "/root/runs/seg"
    network: dict[str, Any] = field(default_factory=default_network)
    steps: int = 1500
    max_minutes: float = 18.0
    lr: float = 2e-3
    lr_min: float = 5e-5
    warmup: int = 30
    weight_decay: float = 1e-5
    bf16: bool = True
    seed: int = 0
    ckpt_every: int = 100
    eval_every: int = 250
    n_eval: int = 4
    threads: int = 1
    max_subjects: int | None = None


def load_split(data_dir: str | Path, split: str, limit: int | None = None, progress: bool = True):
    """Images (N, X, Y, Z) float32 and compact labels (N, X, Y, Z) uint8 of one prepared split."""
    from tqdm.auto import tqdm

    from ..data.prepare import PreparedData

    data = PreparedData.load(data_dir)
    rows = data.subset(split)[:limit]
    if not rows:
        raise ValueError(f"no {split!r} subjects in {data_dir}")
    images, labels = [], []
    for row in tqdm(rows, desc=f"load {split}", disable=not progress, leave=False):
        images.append(data.t1(row))
        labels.append(muse_to_compact(data.labels(row)))
    return np.stack(images), np.stack(labels), [r["mrid"] for r in rows]


def _shift(a: np.ndarray, offsets: Iterable[int]) -> np.ndarray:
    """Integer translation with zero fill (no wrap-around)."""
    out = np.zeros_like(a)
    src, dst = [], []
    for o, n in zip(offsets, a.shape):
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, swap: np.ndarray):
    """One random augmentation of an (X, Y, Z) image in [0, 1] and its labels."""
    from scipy.ndimage import gaussian_filter

    if rng.random() < 0.5:  # mirror: x -> -x on the symmetric MNI grid; Left <-> Right
        image, labels = image[::-1], swap[labels[::-1]]
    if rng.random() < 0.7:
        offsets = rng.integers(-4, 5, size=3)
        image, labels = _shift(image, offsets), _shift(labels, offsets)
    image = np.ascontiguousarray(image, dtype=np.float32)
    labels = np.ascontiguousarray(labels)
    brain = image > 0
    if rng.random() < 0.3:
        image = gaussian_filter(image, sigma=rng.uniform(0.3, 1.2))
    if rng.random() < 0.8:
        image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4) * rng.uniform(0.85, 1.1)
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.0, 0.04), image.shape).astype(np.float32) * brain
    image = np.where(brain | (image > 0.02), image, 0.0)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, bf16: bool = False) -> dict[str, float]:
    """Mean Dice per structure name over volumes (flip averaging as :class:`Segmenter` does)."""
    from .segmenter import Segmenter

    grid = {"shape": list(images.shape[1:]), "spacing": 2.0, "origin": [0.0, 0.0, 0.0]}
    seg = Segmenter(SegmenterConfig(network={"out_channels": NUM_CLASSES}, grid=grid), model, device=next(model.parameters()).device)
    was_training = model.training
    per: dict[str, list[float]] = {s.name: [] for s in STRUCTURES}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for img, lab in zip(images, labels):
            pred = seg.segment(img)
            for label, d in dice_scores(pred, lab).items():
                per[STRUCTURES[label - 1].name].append(d)
    model.train(was_training)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in per.items()}


def _lr(cfg: SegTrainConfig, step: int, elapsed: float) -> float:
    """Cosine from ``lr`` to ``lr_min`` over whichever budget (steps or time) runs out first."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), elapsed / (cfg.max_minutes * 60.0))
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * min(1.0, p)))


def train_segmenter(
    cfg: SegTrainConfig,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or resume) a segmenter; returns the network and the run state.

    Args:
        cfg: Hyper-parameters and folders.
        data: ``(images, labels)`` arrays to train on; default: the prepared ``train`` split.
        val: ``(images, labels)`` to log Dice on; default: the first ``n_eval`` ``val`` volumes.
        progress: Show a progress bar.
        log: Where to send one-line messages (default: nowhere).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, data, val, progress, log or (lambda msg: None))
    finally:
        torch.set_num_threads(threads)


def _train(cfg: SegTrainConfig, data, val, progress: bool, log: Callable[[str], None]):
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from ..train.common import Checkpointer, LossLog

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", asdict(cfg))
    if data is None:
        images, labels, _ = load_split(cfg.data_dir, "train", cfg.max_subjects, progress)
    else:
        images, labels = data
    if val is None and cfg.data_dir:
        val = load_split(cfg.data_dir, "val", cfg.n_eval, progress)[:2]

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.network)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Checkpointer(run)
    state = ckpt.resume()
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(cfg.seed)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        rng.bit_generator.state = state["rng"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min)")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    swap = lr_swap_table(cfg.network["out_channels"])
    losslog = LossLog(run / "log.csv", ["loss", "lr", "val_dice"])
    from ..train.common import training_bf16

    cfg.bf16 = training_bf16(cfg.bf16, torch.device("cpu"))  # never emulated bf16
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="segmenter", disable=not progress)
    t0 = time.time() - elapsed

    def save() -> None:
        ckpt.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                   "elapsed": time.time() - t0, "rng": rng.bit_generator.state, "config": asdict(cfg)})

    while step < cfg.steps and time.time() - t0 < cfg.max_minutes * 60:
        i = int(rng.integers(len(images)))
        img, lab = augment(images[i], labels[i], rng, swap)
        lr = _lr(cfg, step, time.time() - t0)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = torch.from_numpy(img)[None, None], torch.from_numpy(lab.astype(np.int64))[None, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        val_dice = float("nan")
        if val is not None and cfg.eval_every and step % cfg.eval_every == 0:
            val_dice = float(np.nanmean(list(evaluate(model, *val, bf16=cfg.bf16).values())))
            log(f"step {step}: val mean Dice {val_dice:.3f}")
        losslog.log(step, loss=loss.item(), lr=lr, val_dice=val_dice)
        if step % cfg.ckpt_every == 0:
            save()
    bar.close()
    losslog.close()
    save()
    elapsed = time.time() - t0
    log(f"stopped at step {step} after {elapsed / 60:.1f} min")
    return model.eval(), {"step": step, "elapsed_s": elapsed}


def export_segmenter(model: torch.nn.Module, folder: str | Path, config: SegmenterConfig) -> Path:
    """Write ``model.safetensors`` (float16) and ``config.json`` into ``folder``, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    from ..io import sha256_file

    record = {**config.to_dict(), "weights_sha256": {"model.safetensors": sha256_file(folder / "model.safetensors")}}
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return folder
