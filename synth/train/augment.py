"""Mild, anatomy-keeping augmentation of registered scans, for training a prior on few subjects.

The default model's UNet denoises its 145 training subjects' latents about twice as well as held-out
subjects' at moderate noise (LDM card, "The prior is over-fitted"): it has learnt those latents rather
than brains. :func:`augment_scan` makes new, plausible scans of the same person for the prior to learn from
(each is encoded once and cached, see ``LDMTrainConfig.augment``):

* a smooth random warp: Gaussian noise on a grid ``warp_spacing`` voxels apart, trilinearly upsampled,
  scaled so its largest displacement is ``max_warp`` voxels (folding needs displacements comparable
  to the spacing, which this stays far below);
* off by default: a small similarity transform about the grid centre (rotation up to ``max_rotation_deg``
  about each axis, isotropic scale within ``1 +- max_scale``, shift up to ``max_shift`` voxels) and a gamma
  change ``exp(U(-max_log_gamma, max_log_gamma))`` of the intensities in [0, 1].

Why the warp alone: the scans are registered to MNI, so their pose hardly varies (brain centres within
0.2-0.4 mm SD). Fine-tunes of the default's UNet on copies that were also rotated (3 degrees), scaled (3 %) and
shifted (1 voxel) drew brains 2-3x as spread in position, more varied than real ones and with ventricles
19 % smaller than asked; the same fine-tune on warped copies alone drew brains placed as the scans are, with
the plain fine-tune's diversity and ventricles (LDM card, "The prior is over-fitted", twelfth session). Gamma
made no difference.

Resampled with cubic B-splines (linear interpolation would blur every copy), the background kept exactly 0.

The condition (age, sex, volume fractions) stays the subject's: the warp moves boundaries by a voxel or
so, which changes a structure's fraction of ICV by a few per cent at most.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["AugmentConfig", "augment_copies", "augment_scan"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; the defaults warp only (see the module's notes). Until 2026-12-01 the defaults
    were rotation 3, scale 0.03, shift 1 and log-gamma 0.1 as well."""

    max_rotation_deg: float = 0.0
    max_scale: float = 0.0
    max_shift: float = 0.0
    max_warp: float = 1.5
    warp_spacing: int = 16
    max_log_gamma: float = 0.0


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def augment_scan(volume: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One augmented copy of an (X, Y, Z) scan in [0, 1] (float32, same shape; outside stays 0).

    Deterministic for a given ``rng`` state. Raises ``ValueError`` for anything but a 3D volume.
    """
    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3:
        raise ValueError(f"augment_scan expects an (X, Y, Z) volume, got shape {vol.shape}")
    shape = np.array(vol.shape, float)
    # voxel coordinates of the output grid, and where each samples the input
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in vol.shape], indexing="ij"), -1)
    centre = (shape - 1) / 2
    rot = _rotation(np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3)))
    scale = 1.0 + rng.uniform(-cfg.max_scale, cfg.max_scale)
    shift = rng.uniform(-cfg.max_shift, cfg.max_shift, 3)
    src = (grid - centre) @ (rot / scale).T.astype(np.float32) + centre + shift.astype(np.float32)
    if cfg.max_warp > 0:
        coarse = [max(2, int(math.ceil(s / cfg.warp_spacing)) + 1) for s in vol.shape]
        noise = torch.from_numpy(rng.standard_normal((1, 3, *coarse)).astype(np.float32))
        field = F.interpolate(noise, size=vol.shape, mode="trilinear", align_corners=True)[0]
        field = field * (cfg.max_warp / float(field.norm(dim=0).max().clamp_min(1e-6)))
        src = src + field.permute(1, 2, 3, 0).numpy()
    # cubic B-spline interpolation: linear interpolation at random sub-voxel offsets would blur every copy
    # (and teach the prior smoother brains than the scans)
    coords = np.moveaxis(src, -1, 0)
    out = ndimage.map_coordinates(vol, coords, order=3, mode="constant", cval=0.0)
    # the spline rings just outside the brain's edge: the background stays exactly 0 (as in every scan)
    inside = ndimage.map_coordinates((vol > 0).astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
    out = np.where(inside, np.clip(out, 0, 1), 0).astype(np.float32)
    gamma = math.exp(rng.uniform(-cfg.max_log_gamma, cfg.max_log_gamma))
    return np.power(out, gamma, dtype=np.float32)


def _copy(volumes: np.ndarray, seed: int, k: int, cfg: AugmentConfig) -> np.ndarray:
    rng = np.random.default_rng([seed, 1, k])
    return np.stack([augment_scan(v[0], rng, cfg)[None] for v in volumes])


def augment_copies(volumes: np.ndarray, copies: int, seed: int = 0, workers: int = 1,
                   cfg: AugmentConfig = AugmentConfig()) -> Iterator[np.ndarray]:
    """Yield ``copies`` augmented copies of (N, 1, X, Y, Z) scans, in order, each an (N, 1, X, Y, Z) float32 array.

    Copy ``k`` is made with its own generator, ``np.random.default_rng([seed, 1, k])``, drawn over the scans
    in order, so the copies are the same whatever ``workers`` is. ``workers > 1`` makes that many copies at
    once in spawned processes (spawned, not forked, so torch's threads in the caller cannot hang them). One
    2 mm scan takes about 0.32 s; two workers make copies 1.6x as fast as one on a 2-core Xeon
    (``benchmarks/bench_augment.py``, 2026-12-01, the same with PyTorch's AVX2 or native kernels). Each
    worker is sent the scans, so memory grows by about ``workers`` times their size.
    """
    volumes = np.asarray(volumes, np.float32)
    if volumes.ndim != 5 or volumes.shape[1] != 1:
        raise ValueError(f"augment_copies expects (N, 1, X, Y, Z) scans, got shape {volumes.shape}")
    if workers <= 1 or copies <= 1:
        for k in range(copies):
            yield _copy(volumes, seed, k, cfg)
        return
    with ProcessPoolExecutor(min(workers, copies), mp_context=get_context("spawn")) as pool:
        yield from pool.map(_copy, repeat(volumes), repeat(seed), range(copies), repeat(cfg))
