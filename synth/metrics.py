"""Image-quality and fidelity measures used by the evaluation and the benchmarks.

All take (X, Y, Z) arrays and an optional boolean brain mask of the same shape.
"""

from __future__ import annotations

import numpy as np

__all__ = ["psnr", "ssim", "sharpness", "intensity_distance", "masked_correlation", "pearson_r", "median_relative_error"]


def _check(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if a.shape != b.shape:
        raise ValueError(f"arrays must have the same shape, got {a.shape} and {b.shape}")
    if mask is None:
        return np.ones(a.shape, bool)
    if mask.shape != a.shape:
        raise ValueError(f"mask must have shape {a.shape}, got {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty")
    return mask.astype(bool)


def psnr(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) over the voxels of ``mask``."""
    m = _check(reference, test, mask)
    mse = float(np.mean((reference[m].astype(np.float64) - test[m]) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004, 7^3 windows) averaged over the voxels of ``mask``."""
    from skimage.metrics import structural_similarity

    m = _check(reference, test, mask)
    _, smap = structural_similarity(reference.astype(np.float64), test.astype(np.float64), data_range=data_range, full=True)
    return float(smap[m].mean())


def sharpness(image: np.ndarray, mask: np.ndarray | None = None, spacing: float = 2.0) -> float:
    """Mean gradient magnitude (per mm) inside ``mask``, intensities scaled by their 99.5th percentile."""
    m = _check(image, image, mask)
    scale = np.percentile(image[m], 99.5)
    img = image.astype(np.float64) / max(scale, 1e-6)
    g = np.gradient(img, spacing)
    mag = np.sqrt(sum(gi**2 for gi in g))
    return float(mag[m].mean())


def intensity_distance(a: np.ndarray, mask_a: np.ndarray, b: np.ndarray, mask_b: np.ndarray) -> float:
    """Wasserstein-1 distance between the intensities of ``a`` inside ``mask_a`` and of ``b`` inside
    ``mask_b``, each scaled by its 99.5th percentile (as :func:`sharpness`).

    It compares tissue contrast (the grey/white/CSF histogram), which gradient sharpness cannot:
    a blurred image and one with a blotchy texture can both lose the two tissue peaks. The images
    need not be aligned or of the same shape.
    """
    from scipy.stats import wasserstein_distance

    va, vb = (_check(img, img, m) for img, m in ((a, mask_a), (b, mask_b)))
    xa, xb = a[va].astype(np.float64), b[vb].astype(np.float64)
    return float(wasserstein_distance(xa / max(np.percentile(xa, 99.5), 1e-6), xb / max(np.percentile(xb, 99.5), 1e-6)))


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images over the voxels of ``mask``."""
    m = _check(a, b, mask)
    return pearson_r(a[m], b[m])


def pearson_r(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def median_relative_error(measured, requested) -> float:
    """Median of |measured - requested| / requested."""
    m, r = np.asarray(measured, float), np.asarray(requested, float)
    return float(np.median(np.abs(m - r) / r))
