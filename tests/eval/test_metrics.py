"""Tests of mbldm/eval/metrics.py against hand computation and scikit-image."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from mbldm.codec.spec import parse_spec
from mbldm.eval import metrics


def test_psnr_hand_computed_zero_vs_ten():
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.full((4, 5, 3), 10, np.uint8)
    # MSE = 100 -> 10 log10(255^2 / 100) = 28.1308 dB
    assert metrics.psnr(a, b) == pytest.approx(28.130803608679, abs=1e-9)
    assert metrics.psnr(b, a) == pytest.approx(28.130803608679, abs=1e-9)


def test_psnr_is_per_value_mean_not_channel_sum():
    a = np.zeros((1, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 6  # one of 6 values off by 6: per-value MSE = 36 / 6 = 6
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 6.0), abs=1e-9)
    # Eq. 22 taken literally (sum over channels, mean over the 2 pixels) would give MSE 18, 4.77 dB lower
    assert metrics.psnr(a, b) - 10 * math.log10(255**2 / 18.0) == pytest.approx(10 * math.log10(3), abs=1e-9)


def test_psnr_does_not_wrap_uint8_and_identical_is_inf():
    a = np.zeros((3, 3, 3), np.uint8)
    b = np.full((3, 3, 3), 20, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 400.0), abs=1e-9)
    assert metrics.psnr(a, a) == math.inf


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(np.zeros((2, 2, 3)), np.zeros((2, 3, 3)))


def test_psnr_paper_uint8_wraps_twice_by_hand():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 20, np.uint8)
    # 0 - 20 -> 236 (mod 256); 236^2 = 55696 = 217 * 256 + 144 -> 144; MSE 144 instead of 400
    expected = 10 * math.log10(255**2 / 144.0)
    assert expected == pytest.approx(26.547, abs=1e-3)
    assert metrics.psnr_paper_uint8(a, b) == pytest.approx(expected, abs=1e-9)
    # the other order: 20 - 0 = 20, 400 -> 144 as well
    assert metrics.psnr_paper_uint8(b, a) == pytest.approx(expected, abs=1e-9)


def test_psnr_paper_uint8_mixed_values_and_multiple_of_16():
    a = np.array([[[3, 0, 0]]], np.uint8)
    b = np.array([[[2, 20, 16]]], np.uint8)
    # squared wrapped differences: 1, 144, (0 - 16 = 240, 240^2 = 57600 = 225 * 256 -> 0) -> mean 145 / 3
    assert metrics.psnr_paper_uint8(a, b) == pytest.approx(10 * math.log10(255**2 / (145 / 3)), abs=1e-9)
    # a difference of 16 everywhere "vanishes": the bug gives inf
    assert metrics.psnr_paper_uint8(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 16, np.uint8)) == math.inf
    # small differences (|d| < 16) do not wrap: equals the true PSNR
    x = np.array([[[10, 10, 10]]], np.uint8)
    y = np.array([[[13, 9, 10]]], np.uint8)
    assert metrics.psnr_paper_uint8(x, y) == pytest.approx(metrics.psnr(x, y), abs=1e-9)


def test_psnr_paper_uint8_requires_uint8():
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr_paper_uint8(np.zeros((2, 2, 3), np.float32), np.zeros((2, 2, 3), np.float32))


def test_ssim_constant_images_closed_form():
    # constant images: all variances/covariances are 0, so SSIM = (2ab + c1) / (a^2 + b^2 + c1), c1 = (0.01*255)^2
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-12)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_noisy_pair_matches_skimage_per_channel_mean():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    per_channel = [structural_similarity(a[..., k], b[..., k], data_range=255, win_size=7) for k in range(3)]
    value = metrics.ssim(a, b)
    assert value == pytest.approx(float(np.mean(per_channel)), abs=1e-12)
    assert 0.3 < value < 0.99


def test_ssim_rejects_tiny_or_gray_images():
    with pytest.raises(ValueError, match="7 x 7"):
        metrics.ssim(np.zeros((5, 9, 3)), np.zeros((5, 9, 3)))
    with pytest.raises(ValueError, match="RGB"):
        metrics.ssim(np.zeros((9, 9)), np.zeros((9, 9)))


@pytest.mark.parametrize(
    "spec, ratio, bpp",
    [("OPQ-32-8-8", 32.0, 0.75), ("VQ-8-8-8", 64.0, 0.375), ("PQ-32-8-8", 32.0, 0.75), ("VQ-4-4-4", 128.0, 0.1875)],
)
def test_eq23_compression_ratio_and_bpp(spec, ratio, bpp):
    assert metrics.compression_ratio(spec) == ratio  # 3 * 8 * 64 / bits
    assert metrics.compression_ratio(parse_spec(spec)) == ratio
    assert metrics.bits_per_pixel(spec) == bpp
    assert metrics.bits_per_pixel(spec) * metrics.compression_ratio(spec) == 24.0


def test_eq23_other_patch_size():
    # s = 4: 3 * 8 * 16 / 48 = 8
    assert metrics.compression_ratio("OPQ-32-8-8", patch_size=4) == 8.0
    assert metrics.bits_per_pixel("OPQ-32-8-8", patch_size=4) == 3.0


def test_jpeg_bpp():
    assert metrics.jpeg_bpp(1000, 100, 80) == 1.0
    assert metrics.jpeg_bpp(24576, 512, 512) == 0.75
    with pytest.raises(ValueError):
        metrics.jpeg_bpp(10, 0, 5)
