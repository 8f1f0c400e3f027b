"""Preparing one's own scan without a label map: affine to MNI152 and a brain mask (synth.data.register)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

nib = pytest.importorskip("nibabel")
pytest.importorskip("SimpleITK")
pytest.importorskip("nilearn")

from synth.data.register import register_scan, template_images  # noqa: E402
from synth.grid import MNI_2MM  # noqa: E402


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def phantom():
    """The template brain inside a bright skull shell, placed by a known rotation, scale and shift."""
    from scipy import ndimage

    tpl, mask = template_images()
    outer = ndimage.binary_dilation(mask, iterations=5)
    skull = outer & ~ndimage.binary_dilation(mask, iterations=3)
    head = tpl.copy()
    head[skull] = 0.9
    moved = MNI_2MM.affine.copy()
    moved[:3, :3] = _rotation(7.0) @ moved[:3, :3] * 1.05
    moved[:3, 3] = moved[:3, 3] + (6.0, -4.0, 3.0)
    return nib.Nifti1Image((head * 200).astype(np.int16), moved), tpl, mask


def test_a_shifted_rotated_phantom_with_a_skull_lands_on_the_template(phantom):
    img, tpl, mask = phantom
    r = register_scan(img, threads=2, starts_mm=(0.0,))
    assert r.image.shape == MNI_2MM.shape and r.image.dtype == np.float32
    np.testing.assert_allclose(r.affine, MNI_2MM.affine)
    assert r.ncc > 0.9, r.ncc  # the template itself, brought back
    assert not r.image[~r.mask].any() and 0.99 <= r.image.max() <= 1.0
    skull_in_brain = (r.head > 0.8) & mask & (tpl < 0.5)  # the bright shell must stay outside the brain
    assert skull_in_brain.sum() < 0.01 * mask.sum()


def test_a_2d_image_is_refused():
    with pytest.raises(ValueError, match="3D volume"):
        register_scan(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)))


def test_a_constant_image_is_refused():
    with pytest.raises(ValueError, match="empty or constant"):
        register_scan(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)))


def test_nan_is_refused():
    data = np.ones((16, 16, 16), np.float32)
    data[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        register_scan(nib.Nifti1Image(data, np.eye(4)))


@pytest.mark.slow
def test_an_ixi_head_gets_a_brain_mask_close_to_its_muse_labels():
    """A full-head IXI scan: the mask agrees with its own MUSE label map (never used to make it)."""
    import SimpleITK as sitk

    from synth.data.ixi import find_subjects
    from synth.data.prepare import _reference_image, _to_ras_array
    from synth.data.register import _sitk_from_nib

    try:
        subjects = find_subjects()
    except (FileNotFoundError, OSError):
        subjects = []
    if not subjects:
        pytest.skip("IXI data not found (../shared/data/ixi or $SYNTHBRAIN_IXI)")
    s = subjects[0]
    r = register_scan(nib.load(str(s.t1_path)), threads=2)
    muse = _to_ras_array(sitk.Resample(_sitk_from_nib(nib.load(str(s.label_path))), _reference_image(MNI_2MM),
                                       r.transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)) > 0
    dice = 2 * (muse & r.mask).sum() / (muse.sum() + r.mask.sum())
    assert dice > 0.9, dice
    assert r.ncc > 0.35, r.ncc
