"""Lossy-compression metrics of §4.1: PSNR (Eq. 22), SSIM, bits per pixel and compression ratio (Eq. 23).

Pure functions on arrays; no I/O.

PSNR convention. Eq. 22 writes MSE(x1, x2) = 1/(hw) sum_ij ||x1(i, j) - x2(i, j)||_2^2, i.e. the squared error
summed over the 3 colour channels of a pixel and averaged over pixels only. That is 3x the per-value MSE and
would lower PSNR by 10 log10(3) = 4.77 dB. ``psnr`` follows the standard convention (scikit-image, JPEG
literature): the mean over all H*W*3 values, computed in float64.

The paper's Table 1 numbers are reproduced (within about 0.05 dB, measured earlier on this project) neither by
Eq. 22 nor by the standard PSNR, but by an MSE computed on uint8 arrays without widening, where differences and
squares wrap modulo 256. ``psnr_paper_uint8`` reproduces that bug so the table can be compared; it is NOT a
metric (a larger error can give a smaller "MSE").
"""
from __future__ import annotations

import math

import numpy as np

from mbldm.codec.spec import CodecSpec, parse_spec

PEAK = 255.0  # 8-bit images


def _check_pair(x1: np.ndarray, x2: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x1, x2 = np.asarray(x1), np.asarray(x2)
    if x1.shape != x2.shape:
        raise ValueError(f"{what}: images differ in shape, {x1.shape} vs {x2.shape}")
    if x1.size == 0:
        raise ValueError(f"{what}: empty images, shape {x1.shape}")
    return x1, x2


def _psnr_from_mse(mse: float) -> float:
    """Eq. 22: 20 log10(255 / sqrt(MSE)) dB; inf when MSE == 0."""
    if mse == 0:
        return math.inf
    return 20.0 * math.log10(PEAK / math.sqrt(mse))


def psnr(x1: np.ndarray, x2: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (Eq. 22, standard per-value MSE).

    Args:
        x1, x2: arrays of the same shape, typically uint8 RGB (H, W, 3), values in [0, 255] (any real dtype is
            accepted and converted to float64 before subtracting).
    Returns:
        10 log10(255^2 / MSE) with MSE the mean over all H*W*3 values (not Eq. 22's sum over the 3 channels,
        which would be 4.77 dB lower; see the module docstring); ``inf`` for identical images.
    Raises:
        ValueError: different shapes or empty arrays.
    """
    x1, x2 = _check_pair(x1, x2, "psnr")
    diff = x1.astype(np.float64) - x2.astype(np.float64)
    return _psnr_from_mse(float(np.mean(diff * diff)))


def psnr_paper_uint8(x1: np.ndarray, x2: np.ndarray) -> float:
    """The paper-compatible PSNR figure: a BUG REPRODUCTION, not a metric.

    Computes ``np.mean((x1 - x2) ** 2)`` on uint8 arrays with numpy's default promotion: ``x1 - x2`` stays
    uint8 and wraps modulo 256 (0 - 20 -> 236), ``** 2`` stays uint8 and wraps again (236^2 = 55696 -> 144), and
    only the mean accumulates in float64. The PSNR of that "MSE" (Eq. 22 form) matches the paper's Table 1
    within about 0.05 dB, which suggests the paper's numbers were computed this way. Use ``psnr`` for real
    comparisons.

    Args:
        x1, x2: uint8 arrays of the same shape (e.g. (H, W, 3)).
    Returns:
        dB; ``inf`` when the wrapped MSE is 0 (identical images, or every difference a multiple of 16).
    Raises:
        ValueError: not uint8 (the bug only exists for uint8), different shapes, or empty arrays.
    """
    x1, x2 = _check_pair(x1, x2, "psnr_paper_uint8")
    if x1.dtype != np.uint8 or x2.dtype != np.uint8:
        raise ValueError(f"psnr_paper_uint8: needs two uint8 arrays, got {x1.dtype} and {x2.dtype}")
    wrapped = (x1 - x2) ** 2  # uint8, modulo 256 twice: the reproduced bug
    return _psnr_from_mse(float(np.mean(wrapped, dtype=np.float64)))


def ssim(x1: np.ndarray, x2: np.ndarray) -> float:
    """Mean structural similarity of two RGB images (Wang et al. 2004; the SSIM formula of §4.1).

    Uses ``skimage.metrics.structural_similarity(x1, x2, data_range=255, channel_axis=-1)`` with its other
    defaults: a 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance; SSIM is computed per channel
    and averaged over the 3 channels and all window positions.

    Args:
        x1, x2: (H, W, 3) arrays with values in [0, 255] (uint8 or float), H and W at least 7.
    Returns:
        SSIM in [-1, 1] (1 for identical images).
    Raises:
        ValueError: different shapes, not (H, W, 3), or smaller than the 7 x 7 window.
    """
    from skimage.metrics import structural_similarity

    x1, x2 = _check_pair(x1, x2, "ssim")
    if x1.ndim != 3 or x1.shape[-1] != 3:
        raise ValueError(f"ssim: expects (H, W, 3) RGB images, got shape {x1.shape}")
    if min(x1.shape[:2]) < 7:
        raise ValueError(f"ssim: images must be at least 7 x 7 (the SSIM window), got {x1.shape[:2]}")
    return float(structural_similarity(x1, x2, data_range=PEAK, channel_axis=-1))


def _as_spec(spec: str | CodecSpec, patch_size: int) -> CodecSpec:
    return spec if isinstance(spec, CodecSpec) else parse_spec(spec, patch_size)


def bits_per_pixel(spec: str | CodecSpec, patch_size: int = 8) -> float:
    """Bits per pixel of a fixed-rate codec: (Y_b + Cb_b + Cr_b) / s^2.

    Args:
        spec: a CodecSpec or a spec string such as "OPQ-32-8-8" (parsed with ``patch_size``).
        patch_size: s, used only when ``spec`` is a string.
    Returns:
        e.g. 48 / 64 = 0.75 for OPQ-32-8-8 with s = 8. (Images whose size is not divisible by s are padded,
        so their actual rate is total bits / (H*W), slightly higher; see ``mbldm.codec.bench``.)
    Raises:
        ValueError: an invalid spec string.
    """
    parsed = _as_spec(spec, patch_size)
    return parsed.bits_per_patch / parsed.patch_size**2


def compression_ratio(spec: str | CodecSpec, patch_size: int = 8) -> float:
    """Compression ratio R(q) = 3 * 8 * s^2 / (Y_b + Cr_b + Cb_b) (Eq. 23): 24-bit RGB over the codec's bits.

    Args:
        spec: a CodecSpec or a spec string; patch_size: s, used only when ``spec`` is a string.
    Returns:
        e.g. 32.0 for OPQ-32-8-8 and 64.0 for VQ-8-8-8 (s = 8), as in Table 1.
    Raises:
        ValueError: an invalid spec string.
    """
    parsed = _as_spec(spec, patch_size)
    return 3 * 8 * parsed.patch_size**2 / parsed.bits_per_patch


def jpeg_bpp(nbytes: int, height: int, width: int) -> float:
    """Bits per pixel of an encoded file: 8 * nbytes / (H * W).

    Raises:
        ValueError: negative byte count or non-positive image size.
    """
    if nbytes < 0 or height <= 0 or width <= 0:
        raise ValueError(f"jpeg_bpp: need nbytes >= 0 and a positive size, got {nbytes} bytes for {height}x{width}")
    return 8.0 * nbytes / (height * width)
