"""Bring a generated brain's structure volumes to their requested values with a small, smooth warp.

The generator is conditioned on volumes (fractions of ICV) but renders them only approximately: on
the held-out evaluation the hippocampus of generated brains correlates with its requested volume at
r 0.18-0.35. For teaching (the hippocampus of an AD brain *should* look smaller than a healthy one's)
:func:`match_volumes` moves each structure's boundary along its normal until the segmenter measures
the requested volume:

1. segment the brain; for each structure (left and right separately) take its mask, smooth it with a
   Gaussian (``sigma`` voxels) and use the gradient of that as a displacement field ``v`` (largest
   on the boundary, pointing inwards, fading within a few voxels);
2. the warped image samples the original at ``x + eps * v(x)``: ``eps > 0`` grows the structure,
   ``eps < 0`` shrinks it. ``eps`` is found by the secant method on the warped mask's volume,
   bounded so that the Jacobian determinant of the map stays above ``min_jacobian`` (the map is
   invertible: nothing folds, tears or is created). From the second round ``eps`` comes from how
   much the segmenter's own count moved per unit ``eps`` in the round before;
3. the image is resampled once with all structures' fields (linear interpolation), segmented again,
   and the loop repeats (``iterations``) on what the segmenter now measures.

It is an edit of the sampled image, not something the model learned: it is off by default, and
every brain it touched says so in its provenance (``volume_matching``: structures, volumes before and
after, largest displacement, smallest Jacobian of each round). The volumes it reaches are measured by the same
segmenter it steers by, so "requested vs measured" figures for matched brains show the warp's
precision, not the model's; report them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .labels import TOTALS

__all__ = ["MATCHED_KEYS", "VolumeMatch", "match_brain_volumes", "match_volumes"]

# Volumes the warp matches: compact structures with a clear boundary. "brain", "gm" and "wm" are
# totals spread over the whole head; moving them would mean rescaling the brain.
MATCHED_KEYS = ("lateral_ventricles", "hippocampus")


@dataclass
class VolumeMatch:
    """What :func:`match_volumes` did: the warped image, its labels and a record for the provenance."""

    image: np.ndarray
    labels: np.ndarray
    record: dict = field(default_factory=dict)


def _fractions(labels: np.ndarray, keys) -> dict[str, float]:
    """Fractions of ICV of ``keys`` in a compact label map (:func:`synth.anatomy.measure_volumes`)."""
    from .volumes import measure_volumes

    vols = measure_volumes(labels)
    return {k: vols[k] / vols["icv"] if vols["icv"] else float("nan") for k in keys}


def _field(mask: np.ndarray, sigma: float) -> np.ndarray:
    """(3, X, Y, Z) inward displacement field of one structure, largest component 1 voxel."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    grad = np.stack(np.gradient(smooth))
    peak = float(np.sqrt((grad ** 2).sum(0)).max())
    return grad / peak if peak > 0 else grad


def _support(v: np.ndarray, pad: int = 2) -> tuple[slice, ...]:
    """The box around where the field ``v`` (3, X, Y, Z) is not negligible."""
    idx = np.nonzero(np.abs(v).sum(0) > 1e-3)
    if not idx[0].size:
        return tuple(slice(0, 0) for _ in range(3))
    return tuple(slice(max(int(i.min()) - pad, 0), int(i.max()) + pad + 1) for i in idx)


def _jacobian(v: np.ndarray) -> Callable[[float], float]:
    """``eps -> `` smallest Jacobian determinant of ``x -> x + eps * v(x)`` (gradients computed once)."""
    box = _support(v)
    g = [np.gradient(v[(i, *box)]) for i in range(3)]  # g[i][j] = d v_i / d x_j

    def smallest(eps: float) -> float:
        if not g[0][0].size:
            return 1.0
        j = [[(1.0 if i == k else 0.0) + eps * g[i][k] for k in range(3)] for i in range(3)]
        det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
               - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
               + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
        return float(np.min(det))

    return smallest


def _largest_eps(jac: Callable[[float], float], floor: float, hi: float = 4.0) -> float:
    """The largest ``e`` (to 1 %) with ``jac(e)`` and ``jac(-e)`` both at least ``floor``."""
    lo = 0.0
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if min(jac(mid), jac(-mid)) >= floor else (lo, mid)
    return lo


def _warp(volume: np.ndarray, disp: np.ndarray, order: int) -> np.ndarray:
    from scipy import ndimage

    grid = np.indices(volume.shape, dtype=np.float32)
    return ndimage.map_coordinates(volume, grid + disp, order=order, mode="nearest")


def _solve_eps(mask: np.ndarray, v: np.ndarray, want: float, eps_max: float, tol: float = 0.5) -> float:
    """``eps`` whose warped ``mask`` holds ``want`` voxels (secant on the volume), within ``±eps_max``."""
    from scipy import ndimage

    box = _support(v, pad=6)
    m, vb = mask[box].astype(np.float32), v[(slice(None), *box)]
    grid = np.indices(m.shape, dtype=np.float32)

    def volume(eps: float) -> float:
        return float(ndimage.map_coordinates(m, grid + eps * vb, order=1, mode="nearest").sum())

    e0, f0 = 0.0, volume(0.0) - want
    e1 = float(np.clip(0.5 if f0 < 0 else -0.5, -eps_max, eps_max))
    f1 = volume(e1) - want
    for _ in range(12):
        if abs(f1) <= tol or f1 == f0:
            break
        e0, e1, f0 = e1, float(np.clip(e1 - f1 * (e1 - e0) / (f1 - f0), -eps_max, eps_max)), f1
        f1 = volume(e1) - want
        if abs(e1) >= eps_max and np.sign(f1) == np.sign(f0):
            break  # the bound holds it back
    return e1


def match_volumes(
    image: np.ndarray,
    targets: Mapping[str, float],
    segment: Callable[[np.ndarray], np.ndarray],
    *,
    keys=MATCHED_KEYS,
    iterations: int = 3,
    sigma: float = 2.0,
    max_change: float = 0.5,
    min_jacobian: float = 0.5,
) -> VolumeMatch:
    """Warp ``image`` so that ``segment(image)`` measures ``targets`` (fractions of ICV) for ``keys``.

    Args:
        image: (X, Y, Z) T1 in [0, 1] on the segmenter's grid.
        targets: Requested fractions of ICV (e.g. ``SyntheticBrain.targets``); keys missing here are left alone.
        segment: ``image -> compact labels`` (e.g. ``Segmenter.segment``).
        keys: Which of :data:`MATCHED_KEYS` to match.
        iterations: Segment-and-warp rounds (each costs one segmentation).
        sigma: Smoothing of each structure's mask, voxels: how far from the boundary the warp reaches.
        max_change: A structure is never asked to change by more than this fraction of its volume in
            one round (a brain far off its target moves part of the way).
        min_jacobian: Lower bound on the Jacobian determinant of each structure's map.

    Returns:
        :class:`VolumeMatch` with the warped image, the labels the segmenter gives it, and ``record``
        (before, after, target, displacement and Jacobian figures).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"`image` must be a 3D (X, Y, Z) array, got shape {image.shape}")
    keys = [k for k in keys if k in targets]
    unknown = set(keys) - set(MATCHED_KEYS)
    if unknown:
        raise ValueError(f"`keys` must be among {', '.join(MATCHED_KEYS)}, got {sorted(unknown)}")
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations}")
    labels = np.asarray(segment(image))
    before = _fractions(labels, keys)
    warped, total = image, np.zeros((3, *image.shape), np.float32)
    worst_jacobian = 1.0
    gain: dict[int, float] = {}  # label -> voxels the segmenter gained per unit eps, measured in the last round
    for _ in range(iterations):
        now = _fractions(labels, keys)
        disp = np.zeros((3, *image.shape), np.float32)
        planned: dict[int, tuple[int, float]] = {}
        for key in keys:
            have = now[key]
            if not have > 0:
                continue
            ratio = float(np.clip(targets[key] / have, 1.0 - max_change, 1.0 + max_change))
            for label in TOTALS[key]:
                mask = labels == label
                n = int(mask.sum())
                if n < 8:
                    continue
                v = _field(mask, sigma)
                bound = _largest_eps(_jacobian(v), min_jacobian)
                if gain.get(label, 0.0) > 0:  # the secant on what the segmenter itself measured
                    eps = float(np.clip((n * ratio - n) / gain[label], -bound, bound))
                else:  # first round: on the warped mask (the segmenter's boundary need not follow it exactly)
                    eps = _solve_eps(mask, v, n * ratio, bound)
                disp += eps * v
                planned[label] = (n, eps)
        if not np.any(disp):
            break
        # Neighbouring structures (the two lateral ventricles share the septum) add up: scale the sum
        # back if together they would fold the image.
        jac = _jacobian(disp)
        scale = 1.0 if jac(1.0) >= min_jacobian else _largest_eps(jac, min_jacobian, hi=1.0)
        disp *= scale
        worst_jacobian = min(worst_jacobian, jac(scale))
        total = total + disp  # for the record: the rounds compose, this sum is their first-order size
        warped = _warp(warped, disp, order=1)
        labels = np.asarray(segment(warped))
        for label, (n, eps) in planned.items():
            if abs(eps * scale) > 1e-3:
                g = (int((labels == label).sum()) - n) / (eps * scale)
                if g > 0:
                    gain[label] = g
    after = _fractions(labels, keys)
    shift = np.sqrt((total ** 2).sum(0))
    record = {
        "structures": list(keys),
        "requested": {k: float(targets[k]) for k in keys},
        "before": before,
        "after": after,
        "iterations": int(iterations),
        "sigma_voxels": float(sigma),
        "max_displacement_voxels": float(shift.max()),
        "mean_displacement_in_moved_voxels": float(shift[shift > 0.01].mean()) if np.any(shift > 0.01) else 0.0,
        "min_jacobian_per_round": float(worst_jacobian),
        "method": "synth.anatomy.match_volumes: smooth normal displacement of each structure's boundary, "
                  "linear resampling, re-segmented each round",
    }
    return VolumeMatch(warped.astype(np.float32), labels, record)


def match_brain_volumes(brain, segmenter=None, **kwargs):
    """``brain`` (a :class:`synth.SyntheticBrain`) warped to its requested volumes; returns ``(brain, labels)``.

    ``segmenter``: a :class:`synth.anatomy.Segmenter` (default: :func:`synth.anatomy.load_segmenter`).
    The new brain keeps the condition, seed and targets; its provenance gains ``volume_matching``
    (see :func:`match_volumes`) and a ``match_volumes`` step in its history. Keyword arguments go
    to :func:`match_volumes`.
    """
    import copy

    from .. import provenance as _provenance
    from ..brain import SyntheticBrain

    if segmenter is None:
        from .segmenter import load_segmenter

        segmenter = load_segmenter()
    if "volume_matching" in brain.provenance:
        raise ValueError("this brain's volumes were matched already; match the generated brain, not a matched one")
    out = match_volumes(brain.image, brain.targets, segmenter.segment, **kwargs)
    prov = copy.deepcopy(brain.provenance)
    prov["volume_matching"] = {**out.record, "segmenter": getattr(segmenter, "name", type(segmenter).__name__)}
    prov.setdefault("history", []).append(_provenance.step("match_volumes", structures=out.record["structures"]))
    return SyntheticBrain(out.image, brain.affine, brain.condition, brain.seed, dict(brain.targets), prov), out.labels
