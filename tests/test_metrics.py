import numpy as np
import pytest

from synth.metrics import intensity_distance, masked_correlation, median_relative_error, pearson_r, psnr, sharpness, ssim


def _phantom(seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij"))
    img = (np.sqrt((g**2).sum(0)) < 0.8).astype(float) * (0.6 + 0.3 * np.sin(6 * g[0]))
    return img, img > 0, rng


def test_psnr_and_ssim_known_values():
    img, mask, rng = _phantom()
    assert psnr(img, img, mask) == float("inf")
    noisy = img + rng.normal(0, 0.01, img.shape)
    assert psnr(img, noisy, mask) == pytest.approx(40.0, abs=0.3)  # sigma 0.01 -> 40 dB
    assert ssim(img, img, mask) == pytest.approx(1.0)
    assert ssim(img, noisy, mask) < ssim(img, img + rng.normal(0, 0.001, img.shape), mask)


def test_sharpness_drops_with_blur():
    from scipy.ndimage import gaussian_filter

    img, mask, _ = _phantom()
    assert sharpness(gaussian_filter(img, 1.5), mask) < 0.8 * sharpness(img, mask)
    assert sharpness(img * 3, mask) == pytest.approx(sharpness(img, mask))  # scale-free


def test_intensity_distance_sees_lost_tissue_contrast():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    two_tissues = np.where(rng.random((24, 24, 24)) < 0.5, 0.45, 0.9) + rng.normal(0, 0.02, (24, 24, 24))
    mask = np.ones(two_tissues.shape, bool)
    other = np.where(rng.random((20, 22, 24)) < 0.5, 0.45, 0.9) + rng.normal(0, 0.02, (20, 22, 24))
    assert intensity_distance(two_tissues, mask, 2 * two_tissues, mask) == pytest.approx(0.0, abs=1e-9)  # scale-free
    same_kind = intensity_distance(two_tissues, mask, other, np.ones(other.shape, bool))  # needs no alignment
    blurred = intensity_distance(two_tissues, mask, gaussian_filter(two_tissues, 1.0), mask)  # the two peaks merge
    assert same_kind < 0.02 < 0.1 < blurred
    with pytest.raises(ValueError, match="mask is empty"):
        intensity_distance(two_tissues, np.zeros_like(mask), other, np.ones(other.shape, bool))


def test_correlation_and_errors():
    img, mask, _ = _phantom()
    assert masked_correlation(img, 2 * img + 1, mask) == pytest.approx(1.0)
    assert np.isnan(pearson_r([1, 1, 1], [1, 2, 3]))
    assert median_relative_error([1.1, 0.9, 1.0], [1, 1, 1]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same shape"):
        psnr(img, img[:-1], None)
    with pytest.raises(ValueError, match="mask is empty"):
        psnr(img, img, np.zeros_like(mask))
