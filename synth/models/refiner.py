"""A small full-resolution refiner after the decoder: image -> image + residual.

The first stage's decoder draws the conditional mean of each 8 mm patch, so its images are blurred;
every CPU-sized change to the decoder left its reconstructions told apart from real scans about
99 % of the time (LDM model card). The refiner is a few 3x3x3 convolutions at the image resolution,
without normalisation, whose last layer starts at zero (so an untrained refiner is the identity). It
is trained adversarially on cubes of decoded images (``synthbrain train-refiner``,
:mod:`synth.train.refiner`), shipped beside the model (``refiner.safetensors`` and the ``refiner``
section of ``config.json``), applied by the generator after decoding unless switched off, and named
in every brain's provenance.

A refiner may also have a **context branch** (``context`` > 0): the image average-pooled to 4 mm, one
convolution, pooled again to 8 mm (the latent's grid, where the prior draws its blotches), ``context``
convolutions there, upsampled back and added (through a 1x1 convolution that starts at zero) to the
full-resolution features after their first layer. It widens the field from ``2 * layers + 1`` voxels
to up to 59 (context 3, 5 layers), so the refiner can see a structure, not only its edge. Its
convolutions run on 1/8 and 1/64 of the voxels, on a box of their own (:func:`refine_volume`):
``benchmarks/bench_refiner.py`` measures a training step at 1.3-1.4x the plain refiner's and a brain at
1.1-1.2x. A refiner with ``context`` 0 is the first (0.4.0) design, weight for weight.

With no normalisation, a cube of an image gives exactly the refined cube of the whole image away from
its edges (:func:`receptive_radius` voxels in; the context branch's pooling grid must start at a
multiple of 4, as the whole volume's does). :func:`refine_volume` uses that: it runs only on the
brain's bounding box plus that margin, and leaves the background at zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_REFINER", "Refiner", "build_refiner", "refine_volume", "receptive_radius", "context_pad",
           "load_refiner", "RefinerMixin"]

DEFAULT_REFINER: dict[str, Any] = {"width": 32, "layers": 5, "context": 0}
GRID = 4  # the context branch's pooling factor: volumes and cubes it sees are padded to multiples of this


class Refiner(nn.Module):
    """``x -> x + f(x)``, ``f`` being ``layers`` 3x3x3 convolutions (LeakyReLU between them), with an
    optional context branch at 8 mm added after the first.

    Args:
        width: Channels of the hidden layers (and of the context branch).
        layers: Full-resolution convolutions (at least 2).
        context: Convolutions of the context branch at 1/4 of the resolution (0: no branch).
    """

    def __init__(self, width: int = 32, layers: int = 5, context: int = 0):
        super().__init__()
        if int(width) < 1 or int(layers) < 2 or int(context) < 0:
            raise ValueError(f"a refiner needs width >= 1, layers >= 2 and context >= 0, got width {width}, "
                             f"layers {layers}, context {context}")
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
        self.context = int(context)
        if self.context:
            self.ctx_in = nn.Conv3d(1, int(width), 3, padding=1)  # at 1/2 resolution
            ctx: list[nn.Module] = []
            for _ in range(self.context):  # at 1/4
                ctx += [nn.Conv3d(int(width), int(width), 3, padding=1), nn.LeakyReLU(0.2)]
            self.ctx = nn.Sequential(*ctx)
            self.ctx_out = nn.Conv3d(int(width), int(width), 1)
            nn.init.zeros_(self.ctx_out.weight)  # the branch starts switched off
            nn.init.zeros_(self.ctx_out.bias)

    def context_features(self, x: torch.Tensor, offset: int | tuple[int, ...] = 0,
                         size: tuple[int, ...] | None = None) -> torch.Tensor:
        """The context branch on ``x`` (padded with zeros at its far faces to a multiple of 4), on ``x``'s grid
        from ``offset`` voxels in (one per axis, or one for all), ``size`` voxels along each axis (default:
        all of ``x``). The pooling grid starts at ``x``'s first voxel; the crop may start anywhere on it.

        The output 1x1 convolution runs before the upsampling (both are linear, so they commute), and only
        the 8 mm cells the crop needs (plus one each side) are upsampled, which gives the same values as
        upsampling them all."""
        size = tuple(x.shape[2:]) if size is None else tuple(size)
        offsets = (offset,) * 3 if isinstance(offset, int) else tuple(int(o) for o in offset)
        if len(offsets) != 3 or len(size) != 3 or any(o < 0 or o + n > N for o, n, N in zip(offsets, size, x.shape[2:])):
            raise ValueError(f"the context branch's crop (offset {offset}, size {size}) must lie inside its input "
                             f"{tuple(x.shape[2:])}")
        pad = [p for n in reversed(x.shape[2:]) for p in (0, -n % GRID)]
        f = F.pad(x, pad) if any(pad) else x
        f = F.leaky_relu(self.ctx_in(F.avg_pool3d(f, 2)), 0.2)
        f = self.ctx_out(self.ctx(F.avg_pool3d(f, 2)))
        q0 = [max(o // GRID - 1, 0) for o in offsets]
        cells = tuple(slice(q, min(-(-(o + n) // GRID) + 1, f.shape[2 + k]))
                      for k, (q, o, n) in enumerate(zip(q0, offsets, size)))
        f = F.interpolate(f[(..., *cells)], scale_factor=GRID, mode="trilinear", align_corners=False)
        a = [o - q * GRID for o, q in zip(offsets, q0)]
        return f[..., a[0]:a[0] + size[0], a[1]:a[1] + size[1], a[2]:a[2] + size[2]]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                offset: tuple[int, ...] | None = None) -> torch.Tensor:
        """Refine ``x`` (B, 1, X, Y, Z).

        ``context``: a larger crop around ``x`` that the context branch sees instead of ``x`` (so that it
        sees no padding), ``x`` lying ``offset`` voxels into it along each axis (default: centred). Training
        cubes come with a context cube :func:`context_pad` voxels larger on each side; :func:`refine_volume`
        gives the branch its own box.
        """
        h = x
        for i, m in enumerate(self.body):
            h = m(h)
            if i == 1 and self.context:
                if context is None:
                    h = h + self.context_features(x)
                else:
                    if offset is None:
                        offset = tuple((c - n) // 2 for c, n in zip(context.shape[2:], x.shape[2:]))
                    h = h + self.context_features(context, offset, x.shape[2:])
        return x + self.out(h)


def build_refiner(config: dict[str, Any] | None = None) -> Refiner:
    """A :class:`Refiner` from a config's ``refiner`` section (``width``, ``layers``, ``context``; other keys
    ignored)."""
    cfg = {**DEFAULT_REFINER, **(config or {})}
    return Refiner(int(cfg["width"]), int(cfg["layers"]), int(cfg.get("context") or 0))


def context_pad(net: Refiner) -> int:
    """Voxels the context branch sees beyond a voxel, rounded up to a multiple of 4 (0 without a branch):
    its two pooling cells (2 + 4), the convolution at 1/2 (2), ``context`` at 1/4 (4 each) and the
    trilinear upsampling (4)."""
    if not net.context:
        return 0
    r = 2 + 4 + 2 + 4 * net.context + 4
    return -(-r // GRID) * GRID


def receptive_radius(net: Refiner) -> int:
    """Voxels each output voxel sees on either side: one per full-resolution convolution, plus the
    context branch's reach (:func:`context_pad`) from the first."""
    return int(net.layers) + context_pad(net)


@torch.no_grad()
def refine_volume(net: Refiner, image: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Refine an (X, Y, Z) volume in [0, 1] whose background is zero.

    Only the bounding box of the nonzero voxels plus ``layers`` voxels is computed at full resolution (and a
    box :func:`context_pad` voxels wider by the context branch, at 1/4 and 1/8 of it), which gives the same
    values there as the whole volume would (no normalisation: each output sees only its receptive field). The result is clipped to [0, 1] and zero wherever ``image`` is zero.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"refine_volume expects an (X, Y, Z) volume, got shape {image.shape}")
    inside = image > 0
    out = np.zeros_like(image)
    if not inside.any():
        return out
    idx = np.argwhere(inside)
    # the full-resolution layers on the brain's box plus their reach; the context branch, when there is one,
    # on a box its reach wider, from a multiple of 4 (its pooling grid as the whole volume's)
    lo = np.maximum(idx.min(0) - net.layers, 0)
    hi = np.minimum(idx.max(0) + 1 + net.layers, image.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    ctx = offset = None
    if net.context:
        cl = np.maximum(lo - context_pad(net), 0)
        cl -= cl % GRID
        ch = np.minimum(hi + context_pad(net), image.shape)
        ctx = torch.from_numpy(np.ascontiguousarray(image[tuple(slice(int(a), int(b)) for a, b in zip(cl, ch))]))
        ctx = ctx[None, None].to(device)
        offset = tuple(int(v) for v in lo - cl)
    x = torch.from_numpy(np.ascontiguousarray(image[box]))[None, None].to(device)
    if x.device.type == "cpu":  # oneDNN's 3D convolutions run faster channels-last, as for the decoder (same
        # values to float rounding); the refiner's cost per brain: benchmarks/bench_generate.py
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        ctx = None if ctx is None else ctx.contiguous(memory_format=torch.channels_last_3d)
    y = net(x, ctx, offset).float().clamp_(0, 1).contiguous()[0, 0].cpu().numpy()
    out[box] = np.where(inside[box], y, 0.0)
    return out


def load_refiner(folder, section: dict[str, Any] | None, name: str) -> Refiner | None:
    """The refiner a model folder ships (``refiner.safetensors``, built from its config's ``refiner``
    ``section``), or ``None`` when the config names none.

    Raises:
        FileNotFoundError: the config names a refiner but the folder has no ``refiner.safetensors``.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    if not section:
        return None
    path = Path(folder) / "refiner.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r} in {folder} names a refiner but has no refiner.safetensors")
    net = build_refiner(section)
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net


class RefinerMixin:
    """What a generator of either backend does with the refiner it may ship: ``self.refiner`` (a
    :class:`Refiner` or ``None``), described by ``self.config.refiner``, run on ``self.device``."""

    refiner: Refiner | None = None

    def _attach_refiner(self, refiner: Refiner | None) -> None:
        if self.config.refiner and refiner is None:
            raise ValueError(f"model {self.config.name!r} names a refiner in its config but none was given")
        self.refiner = refiner.to(self.device).eval().requires_grad_(False) if refiner is not None else None

    def refines_by_default_for(self, fast: bool) -> bool:
        """Whether ``generate`` applies the refiner unless told not to: the config's ``default`` for the
        standard sampling, its ``fast_default`` (off unless set) for a fast preset, whose point is speed
        (the refiner adds about 1 s a brain on 2 CPU cores without native bf16)."""
        if self.refiner is None:
            return False
        cfg = self.config.refiner or {}
        return bool(cfg.get("fast_default", False) if fast else cfg.get("default", True))

    def _resolve_refine(self, refine: bool | None, fast: bool = False) -> bool:
        if refine and self.refiner is None:
            raise ValueError(f"model {self.config.name!r} has no refiner; generate without refine=True")
        return self.refines_by_default_for(fast) if refine is None else bool(refine)

    def refine(self, image: np.ndarray) -> np.ndarray:
        """The model's refiner applied to a decoded (X, Y, Z) volume (background zero), in float32.

        Raises:
            ValueError: the model has no refiner.
        """
        if self.refiner is None:
            raise ValueError(f"model {self.config.name!r} has no refiner")
        return refine_volume(self.refiner, image, device=self.device)

    def refine_brain(self, brain):
        """``brain``, made by this model without its refiner, refined: the brain ``generate`` gives for the
        same condition and seed with ``refine=True``, and the provenance it gives. For showing a brain at
        once and its refined texture a moment later (the viewer's fast preview).

        Raises:
            ValueError: the model has no refiner; the brain is another model's, already refined, or edited
                since it was generated (refining after an edit is not what ``generate`` would give).
        """
        import dataclasses

        prov = brain.provenance
        made_by = (prov.get("model"), prov.get("model_version"))
        if made_by != (self.config.name, self.config.version):
            raise ValueError(f"this brain was made by {made_by[0]} {made_by[1]}, not by {self.config.name} "
                             f"{self.config.version}: refine it with its own model")
        if self.refiner is None:
            raise ValueError(f"model {self.config.name!r} has no refiner")
        if isinstance(prov.get("refiner"), dict) and prov["refiner"].get("applied"):
            raise ValueError("this brain is refined already")
        edits = [h.get("command") for h in prov.get("history", []) if isinstance(h, dict)][1:]
        if "volume_matching" in prov and "match_volumes" not in edits:
            edits.append("match_volumes")
        if edits:
            raise ValueError(f"this brain was edited after sampling ({', '.join(map(str, edits))}): refine it "
                             "before editing, or generate it again with the refiner")
        return dataclasses.replace(brain, image=self.refine(brain.image),
                                   provenance={**prov, "refiner": self.refiner_provenance(True)})

    def refiner_provenance(self, applied: bool) -> dict | str:
        """What the provenance says of the refiner: ``none`` (the model has none), or whether it was
        applied and how it was trained."""
        if self.refiner is None:
            return "none"
        cfg = self.config.refiner or {}
        network = f"{cfg.get('layers')} conv3d layers, width {cfg.get('width')}"
        if cfg.get("context"):
            n = int(cfg["context"])
            network += f", context branch of {n} conv3d layer{'s' if n != 1 else ''} at 8 mm"
        return {"applied": bool(applied), "network": network,
                "steps": cfg.get("steps"), "trained": cfg.get("trained", "")}
