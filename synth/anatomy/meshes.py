"""Surface meshes of labelled structures in world millimetres (VTK through PyVista).

Each structure: binary mask cropped to its bounding box -> VTK flying edges isosurface at 0.5
(Schroeder et al. 2015, a faster marching cubes) -> windowed-sinc smoothing (Taubin et al. 1996,
``vtkWindowedSincPolyDataFilter``) -> decimation -> the voxel -> world affine -> point normals.
Meshes carry ``label``, ``name`` and ``rgb`` in their field data.

Decimation is the costliest step. The default, ``"pro"`` (``vtkDecimatePro``, Schroeder et al.
1992, topology preserved), halves a 109k-triangle cortex in about 0.18 s; ``"quadric"``
(``vtkQuadricDecimation``, Garland & Heckbert 1997) spaces triangles more evenly but takes about
0.4 s for the same mesh. ``benchmarks/bench_anatomy.py`` compares the two.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .labels import STRUCTURES, Structure, structure_by_name

if TYPE_CHECKING:
    import pyvista

__all__ = ["structure_meshes", "outer_surface", "mask_surface", "DECIMATION_METHODS"]

DECIMATION_METHODS = ("pro", "quadric")


def _pyvista():
    try:
        import pyvista
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("meshes need PyVista and VTK: pip install pyvista") from None
    return pyvista


def _parse_affine(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValueError(f"`affine` must be a finite, invertible 4x4 voxel -> world matrix, got shape {a.shape}")
    return a


def _parse_structures(structures) -> list[Structure]:
    if structures is None:
        return list(STRUCTURES)
    if isinstance(structures, (str, int, Structure)):
        structures = [structures]
    out = []
    for s in structures:
        if isinstance(s, Structure):
            out.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not 1 <= int(s) <= len(STRUCTURES):
                raise ValueError(f"`structures` labels must be within 1-{len(STRUCTURES)}, got {s}")
            out.append(STRUCTURES[int(s) - 1])
        elif isinstance(s, str):
            out.append(structure_by_name(s))
        else:
            raise TypeError(f"`structures` items must be names, label ids or Structure, got {s!r}")
    return out


def _check_decimation(decimate: float, method: str) -> None:
    if not 0.0 <= float(decimate) < 1.0:
        raise ValueError(f"`decimate` is the fraction of triangles removed and must be within [0, 1), got {decimate}")
    if method not in DECIMATION_METHODS:
        raise ValueError(f"`decimation` must be one of {', '.join(DECIMATION_METHODS)}, got {method!r}")


def mask_surface(
    mask: np.ndarray,
    affine: np.ndarray,
    smooth_iterations: int = 20,
    decimate: float = 0.5,
    pass_band: float = 0.1,
    decimation: str = "pro",
) -> "pyvista.PolyData":
    """Smoothed, decimated isosurface of a binary (X, Y, Z) mask in world coordinates.

    Returns an empty ``PolyData`` for an empty mask. Normals point outwards, whatever the affine's
    handedness. ``decimation`` is ``"pro"`` (fast, topology preserved) or ``"quadric"``.
    """
    pv = _pyvista()
    affine = _parse_affine(affine)
    _check_decimation(decimate, decimation)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return pv.PolyData()
    # Crop to the bounding box plus one voxel of background so the surface closes.
    nz = np.nonzero(mask)
    lo = [max(int(i.min()) - 1, 0) for i in nz]
    hi = [min(int(i.max()) + 2, s) for i, s in zip(nz, mask.shape)]
    crop = np.zeros([h - l + 2 for l, h in zip(lo, hi)], dtype=np.float32)  # +2: pad at the grid edge too
    crop[1:-1, 1:-1, 1:-1] = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    grid = pv.ImageData(dimensions=crop.shape, origin=[l - 1 for l in lo], spacing=(1, 1, 1))
    grid.point_data["mask"] = crop.ravel(order="F")
    surf = grid.contour([0.5], scalars="mask", method="flying_edges", compute_scalars=False)
    surf = surf.triangulate()
    if smooth_iterations > 0:
        surf = surf.smooth_taubin(n_iter=int(smooth_iterations), pass_band=pass_band, normalize_coordinates=True)
    if decimate > 0 and surf.n_cells > 100:
        if decimation == "pro":
            surf = surf.decimate_pro(float(decimate), preserve_topology=True)
        else:
            surf = surf.decimate(float(decimate))
    surf = surf.transform(affine, inplace=False)
    if np.linalg.det(affine[:3, :3]) < 0:  # a mirroring affine reverses the triangles' winding
        surf = surf.flip_faces()
    # Flying edges orients every triangle outwards and decimation keeps it: no re-orientation pass.
    surf = surf.compute_normals(point_normals=True, cell_normals=False, consistent_normals=False, split_vertices=False)
    surf.clear_cell_data()
    return surf


def structure_meshes(
    labels: np.ndarray,
    affine: np.ndarray,
    structures: Iterable[str | int | Structure] | None = None,
    smooth_iterations: int = 20,
    decimate: float = 0.5,
    decimation: str = "pro",
    workers: int | None = None,
) -> dict[str, "pyvista.PolyData"]:
    """One surface mesh per structure of a compact label map, in world millimetres.

    Args:
        labels: (X, Y, Z) compact labels (see :data:`synth.anatomy.STRUCTURES`).
        affine: 4x4 voxel -> world (RAS mm) matrix of ``labels``.
        structures: Names, label ids or :class:`Structure` to mesh; default all.
        smooth_iterations: Windowed-sinc smoothing iterations (0 = none).
        decimate: Fraction of triangles to remove, in [0, 1).
        decimation: ``"pro"`` (``vtkDecimatePro``, the fast default) or ``"quadric"``.
        workers: Threads meshing structures side by side (VTK releases the GIL); default one per
            available CPU core. The meshes do not depend on it.

    Returns:
        ``{name: PolyData}`` in the order of ``structures``; field data ``label``, ``name``,
        ``rgb``. A structure absent from ``labels`` warns and is skipped.

    Example:
        >>> meshes = structure_meshes(labels, MNI_2MM.affine, ["Left-Hippocampus"])  # doctest: +SKIP
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"`labels` must be a 3D (X, Y, Z) label map, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"`labels` must hold integers, got dtype {labels.dtype}")
    affine = _parse_affine(affine)
    _check_decimation(decimate, decimation)
    if int(smooth_iterations) < 0:
        raise ValueError(f"`smooth_iterations` must be >= 0, got {smooth_iterations}")
    if workers is None:
        from ..runtime import usable_cpus

        workers = usable_cpus()
    elif isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"`workers` must be a positive integer, got {workers!r}")
    jobs = []
    for s in _parse_structures(structures):
        mask = labels == s.label
        if not mask.any():
            warnings.warn(f"structure {s.name} (label {s.label}) is empty: no mesh", stacklevel=2)
            continue
        jobs.append((s, mask))

    def make(job):
        return mask_surface(job[1], affine, smooth_iterations, decimate, decimation=decimation)

    # Largest structures first, so that two threads finish together.
    order = sorted(range(len(jobs)), key=lambda i: -int(jobs[i][1].sum()))
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(min(int(workers), len(jobs))) as pool:
            made = dict(zip(order, pool.map(make, [jobs[i] for i in order])))
    else:
        made = {i: make(jobs[i]) for i in order}
    out = {}
    for i, (s, _) in enumerate(jobs):
        mesh = made[i]
        mesh.field_data["label"] = np.array([s.label])
        mesh.field_data["name"] = np.array([s.name])
        mesh.field_data["rgb"] = np.array(s.rgb, dtype=np.uint8)
        out[s.name] = mesh
    return out


def outer_surface(
    image_or_mask: np.ndarray,
    affine: np.ndarray,
    threshold: float = 0.1,
    smooth_iterations: int = 30,
    decimate: float = 0.5,
    decimation: str = "pro",
) -> "pyvista.PolyData":
    """The brain's outer surface: largest connected component of the brain, holes filled.

    Args:
        image_or_mask: (X, Y, Z) boolean/integer mask (non-zero = brain) or a skull-stripped
            image (voxels above ``threshold`` times its maximum = brain).
        affine: 4x4 voxel -> world (RAS mm) matrix.
        threshold: Fraction of the image maximum that separates brain from background.
        smooth_iterations: Windowed-sinc smoothing iterations.
        decimate: Fraction of triangles to remove, in [0, 1).
        decimation: ``"pro"`` (fast, the default) or ``"quadric"``.
    """
    from scipy import ndimage

    arr = np.asarray(image_or_mask)
    if arr.ndim != 3:
        raise ValueError(f"`image_or_mask` must be a 3D (X, Y, Z) array, got shape {arr.shape}")
    _check_decimation(decimate, decimation)
    if arr.dtype == bool or arr.dtype.kind in "iu":
        mask = arr > 0
    else:
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        mask = arr > threshold * peak if peak > 0 else np.zeros(arr.shape, bool)
    if not mask.any():
        warnings.warn("outer_surface: the image has no brain voxels; returning an empty mesh", stacklevel=2)
        return _pyvista().PolyData()
    comp, n = ndimage.label(mask)
    if n > 1:
        mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=1, border_value=0) | mask)
    return mask_surface(mask, affine, smooth_iterations, decimate, decimation=decimation)
