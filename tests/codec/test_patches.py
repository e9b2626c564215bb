"""Tests of mbldm/codec/patches.py: padding, (B,H,W) <-> (B,h,w,s*s) patches, stride-1 patches."""
from __future__ import annotations

import numpy as np
import pytest

from mbldm.codec import patches


def test_padded_size():
    assert patches.padded_size(37, 53, 8) == (40, 56)
    assert patches.padded_size(64, 64, 8) == (64, 64)
    assert patches.padded_size(1, 9, 8) == (8, 16)


@pytest.mark.parametrize(("shape", "s"), [((2, 16, 24), 8), ((1, 12, 4), 4), ((3, 5, 10), 5), ((1, 6, 6), 1)])
def test_to_patches_and_from_patches_are_inverse(shape, s):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, shape).astype(np.float32)
    p = patches.to_patches(x, s)
    assert p.shape == (shape[0], shape[1] // s, shape[2] // s, s * s)
    np.testing.assert_array_equal(patches.from_patches(p, s), x)
    q = rng.uniform(0, 255, p.shape)
    np.testing.assert_array_equal(patches.to_patches(patches.from_patches(q, s), s), q)


def test_patch_layout_by_hand():
    # a 1 x 4 x 6 image with value 10*row + col, s = 2 -> h = 2, w = 3 patches
    x = (10 * np.arange(4)[:, None] + np.arange(6)[None, :])[None]
    p = patches.to_patches(x, 2)
    assert p.shape == (1, 2, 3, 4)
    # patch (1, 2) covers rows 2..3, cols 4..5; element i*s + j is pixel (2+i, 4+j)
    np.testing.assert_array_equal(p[0, 1, 2], [24, 25, 34, 35])
    np.testing.assert_array_equal(p[0, 0, 0], [0, 1, 10, 11])
    for hi in range(2):
        for wi in range(3):
            for i in range(2):
                for j in range(2):
                    assert p[0, hi, wi, i * 2 + j] == x[0, hi * 2 + i, wi * 2 + j]


def test_pad_to_multiple_replicates_edges_by_hand():
    x = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)[None, :, :, None]  # (1, 2, 3, 1)
    out = patches.pad_to_multiple(x, 4)
    assert out.shape == (1, 4, 4, 1)
    expected = np.array([[1, 2, 3, 3], [4, 5, 6, 6], [4, 5, 6, 6], [4, 5, 6, 6]], np.uint8)
    np.testing.assert_array_equal(out[0, :, :, 0], expected)
    assert out.dtype == np.uint8


def test_pad_to_multiple_keeps_divisible_input_and_channels():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    assert patches.pad_to_multiple(x, 8) is x
    y = patches.pad_to_multiple(x[:, :7, :5], 4)
    assert y.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(y[:, 7, :5], x[:, 6, :5])  # bottom row copies row 6
    np.testing.assert_array_equal(y[:, :7, 7], x[:, :7, 4])  # right column copies column 4


def test_stride1_patches_count_and_content():
    x = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)  # value = 7*row + col
    s = 3
    p = patches.stride1_patches(x, s)
    assert p.shape == ((5 - s + 1) * (7 - s + 1), 9)
    assert p.dtype == np.float32
    # patch number k = r * (W - s + 1) + c starts at pixel (r, c); take (r, c) = (1, 2)
    k = 1 * (7 - s + 1) + 2
    expected = [9, 10, 11, 16, 17, 18, 23, 24, 25]
    np.testing.assert_array_equal(p[k], expected)
    # consistent with to_patches on the non-overlapping grid: patch (0, 0) and (0, 3)
    np.testing.assert_array_equal(p[0], patches.to_patches(x[None, :3, :6], 3)[0, 0, 0])
    np.testing.assert_array_equal(p[3], patches.to_patches(x[None, :3, :6], 3)[0, 0, 1])


def test_stride1_patches_smaller_than_patch():
    assert patches.stride1_patches(np.zeros((2, 9)), 3).shape == (0, 9)


@pytest.mark.parametrize(
    ("fn", "arg"),
    [
        (patches.pad_to_multiple, np.zeros((4, 4, 3))),
        (patches.to_patches, np.zeros((4, 4))),
        (patches.from_patches, np.zeros((1, 2, 2, 5))),
        (patches.stride1_patches, np.zeros((1, 4, 4))),
    ],
)
def test_wrong_shapes_raise(fn, arg):
    with pytest.raises(ValueError, match="shape"):
        fn(arg, 2)


def test_to_patches_rejects_non_divisible_size():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        patches.to_patches(np.zeros((1, 6, 8)), 4)
