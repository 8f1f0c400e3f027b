"""One call from a brain (generated or a user's image) to labels, volumes, meshes and 3D files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .. import provenance
from ..brain import SyntheticBrain, sidecar_path
from ..grid import MNI_2MM
from ..io import SYNTHETIC_NOTICE
from .export import MESH_FORMATS, USD_FORMATS, export_meshes, export_usd, save_labels
from .meshes import structure_meshes
from .volumes import measure_volumes

if TYPE_CHECKING:  # the segmenter needs torch: imported only when a brain is segmented
    from .segmenter import Segmenter

__all__ = ["EXPORT_FORMATS", "export_brain", "export_paths", "parse_name"]

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


def parse_name(name: str) -> str:
    """Check a file stem for the outputs: non-empty, no folder separators, not hidden.

    Spaces and non-ASCII letters are fine (``"sujet 1 é"``); ``"../x"`` or ``""`` are not.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a non-empty file stem, got {name!r}")
    if any(c in name for c in "/\\\0") or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ValueError(f"`name` must be a plain file stem (no /, \\, control characters or leading dot), got {name!r}")
    return name


def export_paths(out_dir: str | os.PathLike, name: str, formats: Iterable[str] = EXPORT_FORMATS,
                 generated: bool = False) -> dict[str, Path]:
    """Where :func:`export_brain` writes each format (``{format: path}``), so callers can check them first.

    ``generated`` adds the generated T1 and its sidecar (``t1``, ``t1_json``) written by
    ``synthbrain export --age ...``.
    """
    out, name = Path(out_dir), parse_name(name)
    paths: dict[str, Path] = {}
    if generated:
        paths["t1"] = out / f"{name}_t1.nii.gz"
        paths["t1_json"] = sidecar_path(paths["t1"])
    for f in _parse_formats(formats):
        if f == "nii.gz":
            paths["nii.gz"] = out / f"{name}_labels.nii.gz"
            paths["json"] = out / f"{name}_labels.json"
        else:
            paths[f] = out / f"{name}.{f}"
    return paths


def export_brain(
    out_dir: str | os.PathLike,
    brain: SyntheticBrain | None = None,
    image: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    formats: Iterable[str] = EXPORT_FORMATS,
    segmenter: "Segmenter | None" = None,
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
        metadata: Provenance to carry, e.g. :func:`synth.provenance.read_sidecar` of the input
            NIfTI (it overrides ``model: "user image"``); an ``export`` step is appended to its
            ``history``.
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
    name = parse_name(name)
    carried: dict[str, Any] = {}
    if brain is not None:
        image, affine = brain.image, brain.affine
        record = brain.metadata()
        carried = {k: record[k] for k in (*provenance.CARRIED_FIELDS, "history") if k in record}
        carried.setdefault("generator", "SynthBrain")
    else:
        carried["model"] = provenance.USER_IMAGE if image is not None else "user labels"
    carried.update(metadata or {})
    meta: dict[str, Any] = provenance.extend(carried, "export", formats=list(fmts))
    meta["synthetic_notice"] = SYNTHETIC_NOTICE
    affine = np.asarray(MNI_2MM.affine if affine is None else affine, dtype=float)
    if labels is None:
        if segmenter is None:
            from .segmenter import load_segmenter

            segmenter = load_segmenter()
        seg = segmenter
        labels, affine = seg.segment_volume(image, affine)
        meta["segmenter"] = seg.name
    labels = np.asarray(labels)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    volumes = measure_volumes(labels, voxel_volume_mm3=voxel_mm3)
    meta["volumes_mm3"] = volumes

    paths = export_paths(out_dir, name, fmts)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if "nii.gz" in fmts:
        files["nii.gz"] = save_labels(paths["nii.gz"], labels, affine, meta)
        files["json"] = paths["json"]
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
            target = paths[f]
            files[f] = export_usd(target, meshes, meta) if "." + f in USD_FORMATS else export_meshes(target, meshes, meta)
    return files
