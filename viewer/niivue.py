"""What the NiiVue slice viewer is given, without Streamlit: compact NIfTI bytes, a coloured label
overlay, the legend and the readout of a clicked voxel.

NiiVue (https://niivue.github.io, the WebGL2 viewer behind many radiology web tools) draws in the
browser through the ``niivue-streamlit`` component (module ``niivue_component``; its frontend is
bundled, nothing comes from a CDN). The component takes NIfTI bytes and named colour maps only,
so the label overlay is sent as an RGBA NIfTI painted with SynthBrain's own label colours (the
FreeSurfer colours of ``synth.anatomy.STRUCTURES``): the overlay, the legend, the 3D surfaces and
the exported colour tables then all show the same colour for a structure.
"""

from __future__ import annotations

import gzip
from typing import Mapping, Sequence

import numpy as np

__all__ = ["label_overlay_bytes", "legend_rows", "readout", "readout_text", "t1_bytes", "voxel_from_event"]

RGBA = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, *, slope: float = 1.0, intent: int = 0, descrip: str = "") -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, float))
    img.header.set_sform(np.asarray(affine, float), code=1)
    img.header.set_qform(np.asarray(affine, float), code=1)
    img.header.set_xyzt_units("mm")
    if slope != 1.0:
        img.header.set_slope_inter(slope, 0.0)
    if intent:
        img.header.set_intent(intent)
    img.header["descrip"] = descrip[:79].encode("ascii", "replace")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0)  # level 1: 5x smaller than raw, ~10 ms


def t1_bytes(image: np.ndarray, affine: np.ndarray) -> bytes:
    """``image`` (X, Y, Z), intensities 0-1, as a gzipped 8-bit NIfTI for the browser.

    Eight bits with ``scl_slope`` 1/255 keep the 0-1 scale in NiiVue's readout (to 0.004) at a
    quarter of float32's size: a 2 mm brain is ~0.2 MB on the wire instead of ~2.4 MB.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"`image` must be a 3D (X, Y, Z) array, got shape {image.shape}")
    q = np.clip(np.round(np.nan_to_num(image) * 255.0), 0, 255).astype(np.uint8)
    return _nifti_bytes(q, affine, slope=1.0 / 255.0, descrip="SYNTHETIC - not for clinical use")


def label_overlay_bytes(labels: np.ndarray, affine: np.ndarray, lut: np.ndarray) -> bytes:
    """``labels`` (X, Y, Z) painted with ``lut`` ((256, 3) uint8) as a gzipped RGBA NIfTI.

    Background (label 0) is fully transparent; every structure opaque (the viewer's opacity
    slider scales it).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"`labels` must be a 3D (X, Y, Z) array, got shape {labels.shape}")
    lab = np.clip(labels.astype(np.intp), 0, len(lut) - 1)
    rgba = np.zeros(labels.shape, RGBA)
    col = np.asarray(lut, np.uint8)[lab]
    rgba["R"], rgba["G"], rgba["B"] = col[..., 0], col[..., 1], col[..., 2]
    rgba["A"] = np.where(lab > 0, 255, 0).astype(np.uint8)
    return _nifti_bytes(rgba, affine, intent=1002, descrip="SYNTHETIC labels - not for clinical use")


def legend_rows(structures: Sequence, labels: np.ndarray | None = None) -> list[dict]:
    """One row per structure (present in ``labels`` when given): label, name, colour as ``#rrggbb``."""
    present = None if labels is None else set(int(v) for v in np.unique(labels))
    rows = []
    for s in structures:
        if present is not None and int(s.label) not in present:
            continue
        r, g, b = (int(round(float(c) * (255 if max(s.rgb) <= 1 else 1))) for c in s.rgb[:3])
        rows.append({"label": int(s.label), "name": str(s.name), "color": f"#{r:02x}{g:02x}{b:02x}"})
    return rows


def voxel_from_event(event, shape: Sequence[int]) -> list[int] | None:
    """The voxel of a NiiVue ``voxel_click`` event inside ``shape``, or ``None`` for anything else."""
    if not isinstance(event, Mapping) or event.get("type") != "voxel_click":
        return None
    try:
        vox = [int(round(float(v))) for v in event.get("voxel", ())]
    except (TypeError, ValueError):
        return None
    if len(vox) != 3 or any(not 0 <= v < n for v, n in zip(vox, shape)):
        return None
    return vox


def readout(
    image: np.ndarray,
    affine: np.ndarray,
    voxel: Sequence[int],
    labels: np.ndarray | None = None,
    names: Mapping[int, str] | None = None,
) -> dict:
    """What lies at ``voxel``: MNI mm, T1 intensity and (with ``labels``) the structure's name."""
    x, y, z = (int(v) for v in voxel)
    mm = np.asarray(affine, float) @ np.array([x, y, z, 1.0])
    out = {"voxel": [x, y, z], "mm": [float(m) for m in mm[:3]], "intensity": float(image[x, y, z])}
    if labels is not None:
        lab = int(labels[x, y, z])
        out["label"] = lab
        out["structure"] = "background" if lab == 0 else (names or {}).get(lab, f"label {lab}")
    return out


def readout_text(r: Mapping) -> str:
    """``readout`` as one line for the page."""
    v, mm = r["voxel"], r["mm"]
    text = f"voxel ({v[0]}, {v[1]}, {v[2]}) · MNI ({mm[0]:.0f}, {mm[1]:.0f}, {mm[2]:.0f}) mm · T1 intensity {r['intensity']:.3f}"
    if "structure" in r:
        text += f" · structure: **{r['structure']}**"
    return text

