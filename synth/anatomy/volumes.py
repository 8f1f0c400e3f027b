"""Volumes and morphometry of a compact label map, against requested and normative values."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..condition import VOLUME_KEYS, Condition
from ..normative import NormativeModel
from .labels import STRUCTURES, TOTALS

__all__ = ["dice_scores", "measure_volumes", "morphometry"]


def _parse_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"`labels` must be a 3D (X, Y, Z) label map, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"`labels` must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > len(STRUCTURES)):
        raise ValueError(f"`labels` must be compact labels 0-{len(STRUCTURES)}, got {arr.min()}..{arr.max()}")
    return arr


def dice_scores(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice coefficient 2|A n B| / (|A| + |B|) per label.

    Args:
        pred, truth: Integer label maps of the same shape.
        labels: Labels to score; default every non-zero label present in ``truth`` or ``pred``.
            A label absent from both scores 1.0.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"`pred` and `truth` must have the same shape, got {pred.shape} and {truth.shape}")
    n = int(max(pred.max(initial=0), truth.max(initial=0))) + 1
    # Joint histogram: inter[l] = |pred == l and truth == l|.
    inter = np.bincount(pred.ravel()[pred.ravel() == truth.ravel()].astype(np.int64), minlength=n)
    size_p = np.bincount(pred.ravel().astype(np.int64), minlength=n)
    size_t = np.bincount(truth.ravel().astype(np.int64), minlength=n)
    if labels is None:
        labels = [l for l in range(1, n) if size_p[l] or size_t[l]]
    out = {}
    for l in labels:
        l = int(l)
        if l >= n or size_p[l] + size_t[l] == 0:
            out[l] = 1.0
        else:
            out[l] = float(2 * inter[l] / (size_p[l] + size_t[l]))
    return out


def measure_volumes(labels: np.ndarray, voxel_volume_mm3: float = 8.0) -> dict[str, float]:
    """Volume in mm^3 of every structure (by name) and of the totals of :data:`TOTALS`.

    Args:
        labels: (X, Y, Z) compact label map.
        voxel_volume_mm3: Volume of one voxel (8.0 for the 2 mm model grid).

    Returns:
        ``{"Left-Cerebral-Cortex": ..., ..., "icv": ..., "brain": ..., "gm": ..., "wm": ...,
        "lateral_ventricles": ..., "hippocampus": ...}``.
    """
    arr = _parse_labels(labels)
    if not voxel_volume_mm3 > 0:
        raise ValueError(f"`voxel_volume_mm3` must be positive, got {voxel_volume_mm3}")
    counts = np.bincount(arr.ravel().astype(np.int64), minlength=len(STRUCTURES) + 1) * float(voxel_volume_mm3)
    out = {s.name: float(counts[s.label]) for s in STRUCTURES}
    out.update({name: float(counts[list(ids)].sum()) for name, ids in TOTALS.items()})
    return out


def morphometry(
    labels: np.ndarray,
    condition: Condition | None = None,
    targets: Mapping[str, float] | None = None,
    normative: NormativeModel | None = None,
    voxel_volume_mm3: float = 8.0,
) -> list[dict]:
    """A morphometry table: measured volume, fraction of ICV, requested and normative range.

    Args:
        labels: (X, Y, Z) compact label map.
        condition: Age and sex for the normative range (needs ``normative``).
        targets: Volumes (fractions of ICV, keys of :data:`synth.VOLUME_KEYS`) the brain was
            generated for, e.g. ``SyntheticBrain.targets``.
        normative: Normative model giving the healthy 95 % range for ``condition``.
        voxel_volume_mm3: Volume of one voxel.

    Returns:
        One dict per row (totals first, then structures) with ``name``, ``mm3``, ``pct_icv``,
        ``requested`` (fraction of ICV or ``None``), ``normative_low``/``normative_high``
        (fractions of ICV or ``None``).
    """
    vols = measure_volumes(labels, voxel_volume_mm3)
    interval: dict[str, tuple[float, float]] = {}
    if normative is not None:
        if condition is None:
            raise ValueError("`normative` needs a `condition` (age and sex) to give a range")
        interval = normative.interval(condition.age, condition.sex)
    targets = dict(targets or {})
    unknown = set(targets) - set(VOLUME_KEYS)
    if unknown:
        raise ValueError(f"`targets` keys must be among {', '.join(VOLUME_KEYS)}, got {sorted(unknown)}")
    icv = vols["icv"]
    names = [*TOTALS, *(s.name for s in STRUCTURES)]
    rows = []
    for name in names:
        low, high = interval.get(name, (None, None))
        rows.append(
            {
                "name": name,
                "mm3": vols[name],
                "pct_icv": 100.0 * vols[name] / icv if icv > 0 else float("nan"),
                "requested": targets.get(name),
                "normative_low": low,
                "normative_high": high,
            }
        )
    return rows
