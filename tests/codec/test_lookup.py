"""Tests of mbldm/codec/lookup.py: the numba table look-up decode kernel.

The reference is written here from the T.871 equations (float64): sum each YCbCr plane's selected codewords,
subtract the offsets, apply the inverse matrix, round, clip.
"""
from __future__ import annotations

import numpy as np
import pytest

from mbldm.codec import color
from mbldm.codec.lookup import decode_lookup

OFFSET = color.YCBCR_OFFSET.astype(np.float32)
M_RGB = color.YCBCR_TO_RGB.astype(np.float32)
T871 = np.array([[1, 0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]])


def _reference(z, tables, plane_of):
    """float64 (B, H, W, 3) RGB before rounding, from T.871."""
    b, h, w, c = z.shape
    s = tables.shape[2]
    ycc = np.zeros((b, h, w, 3, s, s))
    for j in range(c):
        ycc[:, :, :, plane_of[j]] += tables[j][z[..., j]]
    ycc = ycc.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * s, w * s, 3)  # (B, H, W, 3)
    return (ycc - [0, 128, 128]) @ T871.T


def _constant_tables(values: list[float], s: int = 2) -> np.ndarray:
    """(3, 1, s, s) tables: one codeword per plane, constant value."""
    return np.stack([np.full((1, s, s), v, np.float32) for v in values])


def _decode_pixel(y: float, cb: float, cr: float) -> np.ndarray:
    z = np.zeros((1, 1, 1, 3), np.int64)
    out = decode_lookup(z, _constant_tables([y, cb, cr]), np.array([0, 1, 2]), OFFSET, M_RGB)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert (out == out[0, 0, 0]).all()
    return out[0, 0, 0]


def test_grey_and_hand_computed_colours():
    np.testing.assert_array_equal(_decode_pixel(100, 128, 128), [100, 100, 100])
    # Cr + 10: R = Y + 14.02, G = Y - 7.14136, B = Y
    np.testing.assert_array_equal(_decode_pixel(128, 128, 138), [142, 121, 128])
    # Cb - 20: R = Y, G = Y + 6.88272, B = Y - 35.44
    np.testing.assert_array_equal(_decode_pixel(128, 108, 128), [128, 135, 93])


def test_clipping():
    np.testing.assert_array_equal(_decode_pixel(300, 128, 128), [255, 255, 255])
    np.testing.assert_array_equal(_decode_pixel(-40, 128, 128), [0, 0, 0])
    np.testing.assert_array_equal(_decode_pixel(128, 128, 255.5), [255, 37, 128])  # R > 255 clipped; G = 37.3


def test_rounds_half_to_even():
    np.testing.assert_array_equal(_decode_pixel(2.5, 128, 128), [2, 2, 2])
    np.testing.assert_array_equal(_decode_pixel(3.5, 128, 128), [4, 4, 4])


def test_patch_layout():
    # grey codewords whose pixel (i, j) = 40*k + 10*i + j; latent (hi, wi) picks codeword k = hi*3 + wi
    s, k_count = 3, 6
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    y = np.stack([40 * k + 10 * i + j for k in range(k_count)]).astype(np.float32) / 2  # keep < 255
    tables = np.stack([y, np.full_like(y, 128), np.full_like(y, 128)])  # (3, K, s, s)
    z = np.zeros((1, 2, 3, 3), np.int64)
    z[0, :, :, 0] = np.arange(6).reshape(2, 3)
    out = decode_lookup(z, tables, np.array([0, 1, 2]), OFFSET, M_RGB)
    assert out.shape == (1, 6, 9, 3)
    for hi in range(2):
        for wi in range(3):
            patch = out[0, hi * s:(hi + 1) * s, wi * s:(wi + 1) * s, 1]
            np.testing.assert_array_equal(patch, np.rint(y[hi * 3 + wi]))


@pytest.mark.parametrize("plane_of", [[0, 1, 2], [0, 0, 0, 0, 1, 2], [0, 0, 1, 1, 2]])
def test_random_tables_match_reference(plane_of):
    rng = np.random.default_rng(len(plane_of))
    c, k, s = len(plane_of), 16, 4
    tables = np.empty((c, k, s, s), np.float32)
    per_plane = np.bincount(plane_of, minlength=3)
    for jj, p in enumerate(plane_of):  # values such that each plane's sum stays roughly within [0, 255]
        centre = 128.0 / per_plane[p]
        tables[jj] = rng.normal(centre, 60 / per_plane[p], (k, s, s))
    z = rng.integers(0, k, (2, 5, 7, c))
    out = decode_lookup(z, tables, np.array(plane_of), OFFSET, M_RGB)
    assert out.shape == (2, 20, 28, 3) and out.dtype == np.uint8
    ref = _reference(z, tables, plane_of)
    expected = np.clip(np.rint(ref), 0, 255)
    diff = np.abs(out.astype(np.float64) - expected)
    assert 0 < (ref < 0).mean() + (ref > 255).mean()  # clipping is exercised
    # float32 accumulation vs float64: only values within ~1e-3 of a .5 boundary may round the other way
    assert diff.max() <= 1
    near_half = np.abs(np.abs(ref - np.floor(ref)) - 0.5) < 1e-3
    assert (diff[~near_half] == 0).all()
