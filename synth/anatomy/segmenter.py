"""A small MONAI UNet that labels a T1 brain with the compact anatomy of :mod:`synth.anatomy.labels`.

The network is MONAI's residual ``UNet`` (Ronneberger et al. 2015; Kerfoot et al. 2018) on the
whole 80 x 96 x 80 model grid :data:`synth.grid.MNI_2MM`, trained on IXI T1 scans with DLMUSE label
maps mapped to the compact table. A model folder holds ``config.json``, ``model.safetensors``
(float16) and ``MODEL_CARD.md``.

Example:
    >>> seg = load_segmenter()                               # doctest: +SKIP
    >>> labels = seg.segment(brain.image)                    # (80, 96, 80) uint8  # doctest: +SKIP
    >>> labels, affine = seg.segment_nifti("t1.nii.gz")      # back on the input's grid  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..grid import MNI_2MM, Grid
from ..io import load_nifti, read_json, verify_weights
from .labels import STRUCTURES, label_table

__all__ = [
    "DEFAULT_SEGMENTER",
    "SegmenterConfig",
    "Segmenter",
    "build_network",
    "load_segmenter",
    "lr_swap_table",
    "resample_to_grid",
    "resample_from_grid",
]

DEFAULT_SEGMENTER = "synthbrain-seg-2mm"
NUM_CLASSES = len(STRUCTURES) + 1  # + background
# A whole adult brain is ~120-200 mm along each axis; a field of view outside this range is not a
# head (a slab, a single slice stack, or a voxel size in the wrong unit).
_FOV_MM = (100.0, 450.0)
_MIN_OVERLAP = 0.6  # fraction of the model grid the input must cover


@dataclass
class SegmenterConfig:
    """What ``config.json`` of a segmenter folder holds.

    Attributes:
        name, version: Model identity.
        network: Keyword arguments of ``monai.networks.nets.UNet``.
        grid: The model grid (shape, spacing, origin; RAS mm).
        labels: The compact label table (``label``, ``name``, ``rgb``, ``muse``).
        training: Data, steps, time and test Dice (for provenance).
    """

    name: str = DEFAULT_SEGMENTER
    version: str = "0.1.0"
    network: dict[str, Any] = field(default_factory=lambda: default_network())
    grid: dict[str, Any] = field(
        default_factory=lambda: {"shape": list(MNI_2MM.shape), "spacing": MNI_2MM.spacing, "origin": list(MNI_2MM.origin)}
    )
    labels: list[dict] = field(default_factory=label_table)
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "segmentation",
            "name": self.name,
            "version": self.version,
            "architecture": "monai.networks.nets.UNet",
            "network": self.network,
            "grid": self.grid,
            "input": "(1, 1, X, Y, Z) float32 T1 on the grid, RAS voxel order, skull-stripped, scaled to [0, 1]",
            "output": f"(1, {NUM_CLASSES}, X, Y, Z) logits; argmax = compact label (0 background)",
            "labels": self.labels,
            "training": self.training,
            "notice": "trained on the IXI dataset (CC BY-SA 3.0); research use only, NOT FOR CLINICAL USE",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmenterConfig":
        if d.get("task") != "segmentation":
            raise ValueError(f"config is not a SynthBrain segmenter (task {d.get('task')!r})")
        return cls(d["name"], d["version"], d["network"], d["grid"], d["labels"], d.get("training", {}))

    @property
    def grid_obj(self) -> Grid:
        g = self.grid
        return Grid(tuple(int(s) for s in g["shape"]), float(g["spacing"]), tuple(float(o) for o in g["origin"]))


def default_network() -> dict[str, Any]:
    """The shipped architecture: a 5-level residual UNet, 1.8 M parameters (3.6 MB in float16)."""
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": NUM_CLASSES,
        "channels": [16, 32, 64, 128, 128],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
        "norm": "instance",
    }


def build_network(kwargs: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``UNet`` from config keywords."""
    from monai.networks.nets import UNet

    kw = dict(kwargs)
    for key in ("channels", "strides"):
        kw[key] = tuple(kw[key])
    return UNet(**kw)


def lr_swap_table(n_classes: int = NUM_CLASSES) -> np.ndarray:
    """Lookup table that swaps every ``Left-*`` label with its ``Right-*`` twin (for L-R flips)."""
    table = np.arange(n_classes)
    by_name = {s.name: s.label for s in STRUCTURES}
    for name, label in by_name.items():
        if name.startswith("Left-"):
            twin = by_name["Right-" + name[5:]]
            table[label], table[twin] = twin, label
    return table


def _parse_device(device: str | torch.device) -> torch.device:
    from ..pipeline import pick_device

    return pick_device(device)


class Segmenter:
    """A trained segmenter on a fixed grid.

    Args:
        config: The model's configuration.
        network: The MONAI UNet with its weights.
        device: ``auto`` (CUDA, MPS, then CPU), ``cpu``, ``cuda`` ...
        flip_tta: Average the prediction with that of the left-right mirrored image (labels swapped);
            about twice the time, a little more accurate and symmetric.
        precision: ``auto`` (bf16 where it is faster, :func:`synth.runtime.bf16_faster`: a GPU with bf16
            or a CPU with AMX; else float32), ``fp32`` or ``bf16``; default ``$SYNTHBRAIN_PRECISION`` or
            ``auto`` (:mod:`synth.runtime`). On a 2-core Xeon with AVX512-BF16 but no AMX, bf16 segmented
            a brain in 1.81 s against 2.00 s in float32 (2026-11-30, a loaded machine): ``auto`` takes
            float32 there for the generator's sake (1.5x faster in float32). On 8 IXI test subjects the
            shipped model's mean Dice moved by 0.0002 in bf16 (at most 0.0012 for one subject).
        bf16: Older spelling of ``precision`` (``True`` = ``"bf16"``, ``False`` = ``"fp32"``).
    """

    def __init__(self, config: SegmenterConfig, network: torch.nn.Module, *, device="auto", flip_tta: bool = True,
                 precision: str | None = None, bf16: bool | None = None):
        self.config = config
        self.grid = config.grid_obj
        self.device = _parse_device(device)
        self.network = network.to(self.device).eval()  # no_grad at inference; weights stay trainable
        self.flip_tta = bool(flip_tta)
        from ..runtime import keep_freed_memory, resolve_precision

        keep_freed_memory()  # activations reused, not refaulted
        if bf16 is not None and precision is None:
            precision = "bf16" if bf16 else "fp32"
        self.precision = resolve_precision(precision, self.device)
        self.bf16 = self.precision == "bf16" and self.device.type in ("cpu", "cuda")
        self._swap = torch.as_tensor(lr_swap_table(config.network["out_channels"]), device=self.device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str = "auto", **kwargs) -> "Segmenter":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"no segmenter in {folder}: expected config.json and model.safetensors")
        raw = read_json(folder / "config.json")
        config = SegmenterConfig.from_dict(raw)
        verify_weights(folder, raw.get("weights_sha256"))  # before any weights are read
        net = build_network(config.network)
        net.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
        return cls(config, net, device=device, **kwargs)

    @property
    def name(self) -> str:
        return self.config.name

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Softmax probabilities ``(C, X, Y, Z)`` of an image on the model grid."""
        self._check_image(image)
        x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=self.device)[None, None]
        prob = torch.softmax(self._forward(x), dim=1)[0]
        if self.flip_tta:
            flipped = torch.softmax(self._forward(torch.flip(x, dims=[2])), dim=1)[0]
            # Mirror back and give each channel its twin's probability (Left <-> Right).
            flipped = torch.flip(flipped, dims=[1])[self._swap]
            prob = 0.5 * (prob + flipped)
        return prob

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.network(x).float()

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Label an image on the model grid.

        Args:
            image: (X, Y, Z) = (80, 96, 80) T1 on :data:`synth.grid.MNI_2MM`, RAS voxel order,
                skull-stripped, intensities in [0, 1].

        Returns:
            (X, Y, Z) ``uint8`` compact labels (0 background; see :data:`synth.anatomy.STRUCTURES`).
        """
        return self.probabilities(image).argmax(0).to(torch.uint8).cpu().numpy()

    def segment_nifti(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """Label a T1 NIfTI in MNI-like space and return ``(labels, affine)`` on the input's grid.

        The image is resampled (linear, through both affines) onto the model grid, scaled so that
        its 99.5th percentile of non-zero voxels is 1, labelled, and the labels are resampled
        (nearest neighbour) back onto the input's voxel grid. The input should be skull-stripped
        and roughly aligned to MNI152 (e.g. affinely registered); a whole head is labelled poorly.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a readable NIfTI, not 3D, or a field of view that is not a brain's.
        """
        data, affine = load_nifti(path, canonical=False)
        return self.segment_volume(data, affine, source=str(path), _stacklevel=3)

    def segment_volume(
        self, data: np.ndarray, affine: np.ndarray, source: str = "image", *, _stacklevel: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`segment_nifti` for an in-memory (X, Y, Z) volume with its voxel -> RAS ``affine``.

        An image already on the model grid with intensities in [0, 1] (a generated brain) is
        labelled as it is; anything else is resampled and rescaled as :meth:`segment_nifti` says.
        """
        data = np.asarray(data, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f"{source}: expected a 3D (X, Y, Z) volume, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise ValueError(f"{source} has NaN or infinite voxels")
        affine = np.asarray(affine, float)
        on_grid = data.shape == self.grid.shape and np.allclose(affine, self.grid.affine, atol=1e-4)
        if on_grid and data.min() >= 0.0 and data.max() <= 1.0:
            return self.segment(data), affine  # already a model-grid image (e.g. a generated brain)
        check_field_of_view(data.shape, affine, self.grid, source=source)
        image = resample_to_grid(data, affine, self.grid, order=1)
        inside = image > 0
        if not inside.any():
            raise ValueError(f"{source} is empty (all zero) inside the model's field of view")
        image = np.clip(image / max(float(np.percentile(image[inside], 99.5)), 1e-6), 0.0, 1.0)
        if inside.sum() * self.grid.voxel_volume > 2.6e6:  # mm^3; a stripped adult brain is < ~2 L
            warnings.warn(f"{source} looks like a whole head, not a skull-stripped brain: labels will be poor", stacklevel=_stacklevel)
        labels = self.segment(image.astype(np.float32))
        if on_grid:
            return labels, affine
        return resample_from_grid(labels, self.grid, data.shape, affine), affine

    def _check_image(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.shape != self.grid.shape:
            raise ValueError(
                f"`image` must be on the model grid {self.grid.shape}, got shape {image.shape}; "
                "use segment_nifti for other grids"
            )
        if not np.isfinite(image).all():
            raise ValueError("`image` has NaN or infinite voxels")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"`image` intensities must be within [0, 1], got {lo:.3g}..{hi:.3g}")


def check_field_of_view(shape, affine: np.ndarray, grid: Grid, source: str = "image") -> None:
    """Raise ``ValueError`` unless the volume is brain-sized and covers most of ``grid``."""
    affine = np.asarray(affine, float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    extent = spacing * np.asarray(shape)
    lo, hi = _FOV_MM
    if np.any(extent < lo) or np.any(extent > hi):
        dims = " x ".join(f"{e:.0f}" for e in extent)
        raise ValueError(f"{source}: field of view {dims} mm is not brain-sized (each side must be {lo:g}-{hi:g} mm)")
    # Fraction of the model grid's voxel centres that fall inside the input volume.
    idx = np.stack(np.meshgrid(*[np.arange(0, s, 4) for s in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx * grid.spacing + np.asarray(grid.origin)
    vox = np.linalg.solve(affine, np.c_[world, np.ones(len(world))].T)[:3].T
    inside = np.all((vox > -0.5) & (vox < np.asarray(shape) - 0.5), axis=1).mean()
    if inside < _MIN_OVERLAP:
        raise ValueError(
            f"{source}: only {inside:.0%} of the MNI brain box lies inside the image; register it to MNI152 first"
        )


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1) -> np.ndarray:
    """Resample a volume with voxel->world ``affine`` onto ``grid`` (zeros outside)."""
    from scipy.ndimage import affine_transform

    m = np.linalg.solve(np.asarray(affine, float), grid.affine)  # grid voxel -> input voxel
    return affine_transform(data, m[:3, :3], m[:3, 3], output_shape=grid.shape, order=order, mode="constant", cval=0.0)


def resample_from_grid(labels: np.ndarray, grid: Grid, shape, affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of grid labels onto a volume of ``shape`` with ``affine``."""
    from scipy.ndimage import affine_transform

    m = np.linalg.solve(grid.affine, np.asarray(affine, float))  # input voxel -> grid voxel
    return affine_transform(labels, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=0, mode="constant", cval=0)


def load_segmenter(name_or_path: str | os.PathLike = DEFAULT_SEGMENTER, device: str = "auto", **kwargs) -> Segmenter:
    """Load a segmenter by name (a folder of ``assets/models`` or ``$SYNTHBRAIN_MODELS``) or path.

    Args:
        name_or_path: Model name or folder.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        **kwargs: Passed to :class:`Segmenter` (e.g. ``flip_tta=False``).

    Raises:
        FileNotFoundError: no such model; the message lists the shipped segmenters.
    """
    from ..pipeline import models_dir

    p = Path(name_or_path)
    for candidate in (p, models_dir() / str(name_or_path)):
        if (candidate / "config.json").is_file():
            return Segmenter.from_folder(candidate, device, **kwargs)
    root = models_dir()
    shipped = (
        sorted(d.name for d in root.iterdir() if (d / "model.safetensors").is_file()) if root.is_dir() else []
    )
    raise FileNotFoundError(f"no segmenter named or found at {str(name_or_path)!r}; shipped: {', '.join(shipped) or 'none'}")
