"""One call from a brain (generated or a user's image) to labels, volumes, meshes and 3D files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..brain import SyntheticBrain
from ..grid import MNI_2MM
from ..io import SYNTHETIC_NOTICE
from .export import MESH_FORMATS, USD_FORMATS, export_meshes, export_usd, save_labels
from .meshes import structure_meshes
from .segmenter import Segmenter, load_segmenter
from .volumes import measure_volumes

__all__ = ["EXPORT_FORMATS", "export_brain"]

EXPORT_FORMATS = ("nii.gz", "usda", "usdc", "usdz", "stl", "ply", "obj", "glb")


def _parse_formats(formats: Iterable[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    out = []
    for f in formats:
        key = str(f).lower().lstrip(".")
        if key == "nii":
            key = "nii.gz"
        if key not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {f!r}; supported: {', '.join(EXPORT_FORMATS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"`formats` is empty; choose from {', '.join(EXPORT_FORMATS)}")
    return out


def export_brain(
    out_dir: str | os.PathLike,
    brain: SyntheticBrain | None = None,
    image: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    formats: Iterable[str] = EXPORT_FORMATS,
    segmenter: Segmenter | None = None,
    *,
    name: str = "anatomy",
    metadata: dict[str, Any] | None = None,
    smooth_iterations: int = 20,
    decimate: float = 0.5,
) -> dict[str, Path]:
    """Label a brain, measure it, mesh every structure and write the chosen files.

    Give a generated ``brain``, or an ``image`` with its ``affine`` (any grid in MNI-like space),
    or ready ``labels`` with their ``affine``.

    Args:
        out_dir: Output folder (created).
        brain: A :class:`synth.SyntheticBrain`; its image, affine and provenance are used.
        image: (X, Y, Z) skull-stripped T1 (instead of ``brain``).
        affine: 4x4 voxel -> RAS mm matrix of ``image``/``labels`` (default: the model grid).
        labels: (X, Y, Z) compact labels on the grid of ``brain`` or ``affine``; skips segmentation.
        formats: Any of ``nii.gz, usda, usdc, usdz, stl, ply, obj, glb``.
        segmenter: A loaded :class:`Segmenter` (default: :func:`load_segmenter`).
        name: File stem of the outputs.
        metadata: Extra provenance to record.
        smooth_iterations, decimate: Passed to :func:`structure_meshes`.

    Returns:
        ``{format: path}``, plus ``"json"`` for the label table sidecar when NIfTI is written.

    Example:
        >>> files = export_brain("out", brain, formats=("nii.gz", "usdz", "glb"))  # doctest: +SKIP
    """
    fmts = _parse_formats(formats)
    if brain is not None and (image is not None or affine is not None):
        raise ValueError("give either `brain` or `image` + `affine`, not both (a brain carries its own)")
    if image is not None and labels is not None:
        raise ValueError("give either `image` (to segment) or `labels`, not both")
    if brain is None and image is None and labels is None:
        raise ValueError("nothing to export: give `brain`, `image` (+ `affine`) or `labels` (+ `affine`)")
    meta: dict[str, Any] = {"notice": "synthetic, not for clinical use", "synthetic_notice": SYNTHETIC_NOTICE}
    if brain is not None:
        image, affine = brain.image, brain.affine
        meta.update(
            model=brain.provenance.get("model"),
            seed=brain.seed,
            condition=brain.condition.to_dict(),
            target_volumes_fraction_of_icv=dict(brain.targets),
            generator=brain.provenance.get("generator", "SynthBrain"),
        )
    else:
        meta.update(model="user image" if image is not None else "user labels")
    affine = np.asarray(MNI_2MM.affine if affine is None else affine, dtype=float)
    if labels is None:
        seg = segmenter or load_segmenter()
        labels, affine = seg.segment_volume(image, affine)
        meta["segmenter"] = seg.name
    labels = np.asarray(labels)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    volumes = measure_volumes(labels, voxel_volume_mm3=voxel_mm3)
    meta["volumes_mm3"] = volumes
    meta.update(metadata or {})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if "nii.gz" in fmts:
        files["nii.gz"] = save_labels(out / f"{name}_labels.nii.gz", labels, affine, meta)
        files["json"] = out / f"{name}_labels.json"
    mesh_fmts = [f for f in fmts if f".{f}" in USD_FORMATS + MESH_FORMATS]
    if mesh_fmts:
        import warnings

        with warnings.catch_warnings():  # absent structures are expected in a partial label map
            warnings.simplefilter("ignore")
            present = [int(v) for v in np.unique(labels) if v > 0]
            meshes = structure_meshes(labels, affine, present, smooth_iterations=smooth_iterations, decimate=decimate)
        if not meshes:
            raise ValueError("the label map is empty: no structure to mesh")
        for f in mesh_fmts:
            target = out / f"{name}.{f}"
            files[f] = export_usd(target, meshes, meta) if "." + f in USD_FORMATS else export_meshes(target, meshes, meta)
    return files
