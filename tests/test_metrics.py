import numpy as np
import pytest

from synth.metrics import masked_correlation, median_relative_error, pearson_r, psnr, sharpness, ssim


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


def test_correlation_and_errors():
    img, mask, _ = _phantom()
    assert masked_correlation(img, 2 * img + 1, mask) == pytest.approx(1.0)
    assert np.isnan(pearson_r([1, 1, 1], [1, 2, 3]))
    assert median_relative_error([1.1, 0.9, 1.0], [1, 1, 1]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same shape"):
        psnr(img, img[:-1], None)
    with pytest.raises(ValueError, match="mask is empty"):
        psnr(img, img, np.zeros_like(mask))
