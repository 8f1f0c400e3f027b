"""A small full-resolution refiner after the decoder: image -> image + residual.

The first stage's decoder draws the conditional mean of each 8 mm patch, so its images are blurred;
every CPU-sized change to the decoder left its reconstructions told apart from real scans about
99 % of the time (LDM model card). The refiner is a few 3x3x3 convolutions at the image resolution,
without normalisation, whose last layer starts at zero (so an untrained refiner is the identity). It
is trained adversarially on cubes of decoded images (``synthbrain train-refiner``,
:mod:`synth.train.refiner`), shipped beside the model (``refiner.safetensors`` and the ``refiner``
section of ``config.json``), applied by the generator after decoding unless switched off, and named
in every brain's provenance.

With no normalisation and a receptive field of ``2 * layers + 1`` voxels, a cube of an image gives
exactly the refined cube of the whole image away from its edges. :func:`refine_volume` uses that:
it runs only on the brain's bounding box plus a margin of ``layers`` voxels, and leaves the
background at zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_REFINER", "Refiner", "build_refiner", "refine_volume", "receptive_radius"]

DEFAULT_REFINER: dict[str, Any] = {"width": 32, "layers": 5}


class Refiner(nn.Module):
    """``x -> x + f(x)``, ``f`` being ``layers`` 3x3x3 convolutions (LeakyReLU between them).

    Args:
        width: Channels of the hidden layers.
        layers: Convolutions (at least 2); the receptive field is ``2 * layers + 1`` voxels.
    """

    def __init__(self, width: int = 32, layers: int = 5):
        super().__init__()
        if int(width) < 1 or int(layers) < 2:
            raise ValueError(f"a refiner needs width >= 1 and layers >= 2, got width {width}, layers {layers}")
        mods: list[nn.Module] = []
        c = 1
        for _ in range(int(layers) - 1):
            mods += [nn.Conv3d(c, int(width), 3, padding=1), nn.LeakyReLU(0.2)]
            c = int(width)
        self.body = nn.Sequential(*mods)
        self.out = nn.Conv3d(c, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as the identity
        nn.init.zeros_(self.out.bias)
        self.layers = int(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.body(x))


def build_refiner(config: dict[str, Any] | None = None) -> Refiner:
    """A :class:`Refiner` from a config's ``refiner`` section (``width``, ``layers``; other keys ignored)."""
    cfg = {**DEFAULT_REFINER, **(config or {})}
    return Refiner(int(cfg["width"]), int(cfg["layers"]))


def receptive_radius(net: Refiner) -> int:
    """Voxels of context each output voxel sees on either side (one per convolution)."""
    return int(net.layers)


@torch.no_grad()
def refine_volume(net: Refiner, image: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Refine an (X, Y, Z) volume in [0, 1] whose background is zero.

    Only the bounding box of the nonzero voxels plus :func:`receptive_radius` voxels is computed, which
    gives the same values there as the whole volume would (no normalisation: each output sees only its
    receptive field). The result is clipped to [0, 1] and zero wherever ``image`` is zero.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"refine_volume expects an (X, Y, Z) volume, got shape {image.shape}")
    inside = image > 0
    out = np.zeros_like(image)
    if not inside.any():
        return out
    r = receptive_radius(net)
    idx = np.argwhere(inside)
    lo = np.maximum(idx.min(0) - r, 0)
    hi = np.minimum(idx.max(0) + 1 + r, image.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    x = torch.from_numpy(np.ascontiguousarray(image[box]))[None, None].to(device)
    if x.device.type == "cpu":  # oneDNN's 3D convolutions run faster channels-last, as for the decoder (same
        # values to float rounding); the refiner's cost per brain: benchmarks/bench_generate.py
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = net(x).float().clamp_(0, 1).contiguous()[0, 0].cpu().numpy()
    out[box] = np.where(inside[box], y, 0.0)
    return out
