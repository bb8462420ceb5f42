"""PSNR and SSIM: identities, a hand-computed PSNR, SSIM falling with noise and below 1 for a shifted image."""

import numpy as np

from jaxdiff.metrics.image_quality import psnr, ssim


def test_psnr_of_a_known_error_and_of_identical_images():
    a = np.zeros((2, 8, 8, 3), np.float32)
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    out = psnr(a, b)
    np.testing.assert_allclose(out[0], 20.0, rtol=1e-6)
    assert np.isinf(out[1])


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (1, 32, 32, 3))
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    small = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)
    large = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    s_small, s_large = ssim(x, small)[0], ssim(x, large)[0]
    assert 1.0 > s_small > s_large > 0.0
    assert ssim(x, np.roll(x, 3, axis=2))[0] < 0.5  # structure, not just the histogram
    # uint8 and float inputs agree
    u = (x * 255).round().astype(np.uint8)
    np.testing.assert_allclose(ssim(u, u.astype(np.float32) / 255.0), 1.0, atol=1e-9)
