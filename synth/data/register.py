"""Prepare one's own T1 scan for SynthBrain without a label map: RAS, affine to MNI152, brain mask.

:mod:`synth.data.prepare` strips IXI scans with their MUSE label maps; a user's scan has none. Here:

1. the scan (full head or already stripped) is read into RAS with nibabel and scaled to 0-1 by
   its 99.5th percentile over the head (Otsu foreground);
2. affine registration to the MNI152 2009 template nilearn ships (similarity, then a 12-parameter
   affine; Mattes mutual information over the template's dilated brain mask, three resolutions;
   SimpleITK, as ``prepare`` does). The skull stays in the moving image: the metric only looks
   inside the template's brain region, so the skull has nothing to match and is pushed outside it.
   The scan's head centroid is a poor start (necks differ), so the similarity stage starts from a
   few heights and keeps the best metric;
3. resampling onto the model grid (:data:`synth.grid.MNI_2MM`, linear);
4. brain mask: the template's brain mask on that grid (the scan is now in template space),
   optionally refined by a segmenter (voxels it labels, within the template mask dilated by 2
   voxels), then intensities rescaled so that the brain's 99.5th percentile is 1, background 0.

Affine registration cannot follow every individual fold: the mask is approximate at the cortex.
Everything here is for research and education, not for clinical use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..grid import MNI_2MM, Grid

__all__ = ["RegisteredScan", "register_scan", "template_images"]


@dataclass
class RegisteredScan:
    """A user scan on the model grid.

    Attributes:
        image: (X, Y, Z) float32 in [0, 1], brain only (background 0), RAS+ on ``grid``.
        head: (X, Y, Z) float32 in [0, 1], the registered scan before masking.
        mask: (X, Y, Z) bool brain mask.
        affine: (4, 4) voxel -> MNI mm of ``grid``.
        ncc: Normalised cross-correlation with the template inside its brain mask (registration quality;
            affinely registered IXI scans score about 0.45-0.55; below 0.2 is refused as a failed registration).
        transform: The SimpleITK transform (template physical space -> scan physical space, LPS).
        notes: What was done, for provenance.
    """

    image: np.ndarray
    head: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    ncc: float
    transform: object = None
    notes: list[str] = field(default_factory=list)


def template_images(grid: Grid = MNI_2MM) -> tuple[np.ndarray, np.ndarray]:
    """The nilearn MNI152 2009 template (brain, 0-1) and its brain mask on ``grid`` (RAS arrays)."""
    import SimpleITK as sitk
    from nilearn import datasets

    from .prepare import _reference_image, _to_ras_array

    tpl = datasets.load_mni152_template(resolution=2)
    mask = datasets.load_mni152_brain_mask(resolution=2)
    ref = _reference_image(grid)
    t = _to_ras_array(sitk.Resample(_sitk_from_nib(tpl), ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    m = _to_ras_array(sitk.Resample(_sitk_from_nib(mask), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32))
    t = t / max(float(t.max()), 1e-6)
    return t.astype(np.float32), m > 0.5


def _sitk_from_nib(img):
    """A nibabel image as a SimpleITK image with the same world geometry (RAS affine -> LPS)."""
    import nibabel as nib
    import SimpleITK as sitk

    img = nib.as_closest_canonical(img)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    aff = img.affine
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    direction = aff[:3, :3] / zooms
    lps = np.diag([-1.0, -1.0, 1.0])
    out.SetSpacing([float(z) for z in zooms])
    out.SetOrigin([float(v) for v in lps @ aff[:3, 3]])
    out.SetDirection([float(v) for v in (lps @ direction).ravel()])
    return out


def _otsu_head(moving) -> object:
    import SimpleITK as sitk

    head = sitk.OtsuThreshold(moving, 0, 1, 128)
    return sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(head, [2, 2, 2]))


def _register_head(fixed, moving, fixed_mask, heights_mm=(0.0, 20.0, 40.0)):
    """Similarity (from several starting heights) then affine, Mattes MI inside ``fixed_mask``."""
    import SimpleITK as sitk

    def method(initial, iterations=120):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, seed=1234)
        reg.SetMetricFixedMask(fixed_mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        return reg

    head = sitk.Cast(_otsu_head(moving), sitk.sitkFloat32)
    fixed_mask_f = sitk.Cast(fixed_mask, sitk.sitkFloat32)
    base = sitk.CenteredTransformInitializer(fixed_mask_f, head, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    best, best_value = None, np.inf
    for dz in heights_mm:  # the brain sits above the head's centroid: try a few heights (LPS z is superior)
        start = sitk.Similarity3DTransform(base)
        t = np.asarray(start.GetTranslation(), float)
        start.SetTranslation(tuple(t + np.array([0.0, 0.0, dz])))
        reg = method(start, iterations=60)
        tx = reg.Execute(fixed, moving)
        value = reg.GetMetricValue()
        if value < best_value:
            best, best_value = tx, value
    s = sitk.Similarity3DTransform(sitk.CompositeTransform(best).GetNthTransform(0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(s.GetMatrix())
    affine.SetTranslation(s.GetTranslation())
    affine.SetCenter(s.GetCenter())
    return method(affine).Execute(fixed, moving)


def register_scan(
    img, *, grid: Grid = MNI_2MM, segmenter=None, threads: int | None = None, starts_mm=(0.0, 20.0, 40.0)
) -> RegisteredScan:
    """Register a T1 scan (a nibabel image, full head or stripped) to MNI152 and mask its brain.

    Args:
        img: A 3D nibabel image (e.g. from :func:`synth.io.load_nifti` or ``nib.load``).
        grid: The model grid to resample onto.
        segmenter: Optional ``synth.anatomy`` segmenter; its labels refine the template mask.
        threads: SimpleITK threads (default: its own choice).
        starts_mm: Heights (mm above the head's centroid) the similarity stage starts from; the best
            metric wins. One start is enough for a scan already near MNI position.

    Raises:
        ValueError: the image is not 3D, is empty or constant, or registration fails badly.
    """
    import SimpleITK as sitk

    from .prepare import _reference_image, _to_ras_array

    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"a T1 scan must be a 3D volume of at least 8 voxels a side, got shape {tuple(img.shape)}")
    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    moving = _sitk_from_nib(img)
    arr = sitk.GetArrayViewFromImage(moving)
    if not np.isfinite(arr).all():
        raise ValueError("the scan holds NaN or infinite values")
    lo, hi = float(np.percentile(arr, 0.5)), float(np.percentile(arr, 99.5))
    if not hi > lo:
        raise ValueError("the scan is empty or constant: nothing to register")
    moving = sitk.Cast(sitk.Clamp((moving - lo) / (hi - lo), sitk.sitkFloat32, 0.0, 1.0), sitk.sitkFloat32)

    tpl_grid, tpl_mask = template_images(grid)
    ref = _reference_image(grid)
    fixed = sitk.GetImageFromArray(np.ascontiguousarray(tpl_grid.transpose(2, 1, 0)))
    fixed.CopyInformation(ref)
    fmask = sitk.GetImageFromArray(np.ascontiguousarray(tpl_mask.transpose(2, 1, 0)).astype(np.uint8))
    fmask.CopyInformation(ref)
    fixed_mask = sitk.Cast(sitk.BinaryDilate(fmask, [3, 3, 3]), sitk.sitkUInt8)
    tx = _register_head(fixed, moving, fixed_mask, tuple(starts_mm))

    head = _to_ras_array(sitk.Resample(moving, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)).astype(np.float32)
    mask = tpl_mask.copy()
    notes = ["affine to MNI152 2009 (nilearn), Mattes MI, SimpleITK", "brain mask: template mask"]
    if segmenter is not None:
        from scipy import ndimage

        labels = np.asarray(segmenter.segment(_scaled(head, mask)))
        near = ndimage.binary_dilation(tpl_mask, iterations=2)
        refined = (labels > 0) & near
        if refined.sum() > 0.5 * tpl_mask.sum():  # keep the template mask if the segmenter found little
            mask = ndimage.binary_fill_holes(refined)
            notes[-1] = "brain mask: segmenter labels within the template mask dilated by 2 voxels"
    image = _scaled(head, mask)
    a, b = image[tpl_mask], tpl_grid[tpl_mask]
    a, b = a - a.mean(), b - b.mean()
    ncc = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
    if ncc < 0.2:
        raise ValueError(f"registration to MNI152 failed (correlation with the template {ncc:.2f}): is this a T1-weighted brain scan?")
    return RegisteredScan(image, head, mask, grid.affine.copy(), ncc, tx, notes)


def _scaled(head: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside = head[mask]
    scale = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    out = np.clip(head / max(scale, 1e-6), 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out
