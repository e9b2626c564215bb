"""Tests of mbldm/codec/color.py: full-range BT.601 (JFIF) RGB <-> YCbCr, numpy and torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mbldm.codec import color

CORNERS = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)


@pytest.fixture(scope="module")
def colours() -> np.ndarray:
    """1e6 random uint8 RGB colours + the 8 corners of the RGB cube, (N, 3)."""
    rng = np.random.default_rng(20230701)
    return np.concatenate([rng.integers(0, 256, (1_000_000, 3), dtype=np.uint8), CORNERS])


def test_hand_computed_values():
    rgb = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    expected = np.array(
        [
            [0.0, 128.0, 128.0],
            [255.0, 128.0, 128.0],  # coefficients of Cb and Cr sum to 0, of Y to 1
            [0.299 * 255, 128 - 0.168736 * 255, 128 + 0.5 * 255],
            [0.114 * 255, 128 + 0.5 * 255, 128 - 0.081312 * 255],
            [0.299 * 10 + 0.587 * 20 + 0.114 * 30,
             128 - 0.168736 * 10 - 0.331264 * 20 + 0.5 * 30,
             128 + 0.5 * 10 - 0.418688 * 20 - 0.081312 * 30],
        ]
    )
    out = color.rgb_to_ycbcr(rgb)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_inverse_matches_t871_nominal_coefficients():
    # ITU-T T.871 §7: R = Y + 1.402 (Cr-128); G = Y - 0.344136 (Cb-128) - 0.714136 (Cr-128); B = Y + 1.772 (Cb-128)
    t871 = np.array([[1, 0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]])
    np.testing.assert_allclose(color.YCBCR_TO_RGB, t871, atol=2e-5)
    ycc = np.array([[100.0, 128.0, 138.0], [50.0, 118.0, 128.0]], np.float32)
    expected = np.stack([ycc[:, 0] + 1.402 * (ycc[:, 2] - 128),
                         ycc[:, 0] - 0.344136 * (ycc[:, 1] - 128) - 0.714136 * (ycc[:, 2] - 128),
                         ycc[:, 0] + 1.772 * (ycc[:, 1] - 128)], axis=1)
    np.testing.assert_allclose(color.ycbcr_to_rgb(ycc), expected, atol=1e-3)


def test_uint8_round_trip_is_exact_after_rounding(colours):
    ycc = color.rgb_to_ycbcr(colours)
    back = color.ycbcr_to_rgb(ycc)
    assert back.dtype == np.float32
    assert np.abs(back - colours).max() < 1e-3  # float round trip
    np.testing.assert_array_equal(np.clip(np.rint(back), 0, 255).astype(np.uint8), colours)


def test_round_trip_through_uint8_ycbcr_is_within_one(colours):
    """With YCbCr itself rounded to uint8 (as JPEG stores it), RGB comes back within 1, but not exactly."""
    ycc8 = np.clip(np.rint(color.rgb_to_ycbcr(colours)), 0, 255).astype(np.uint8)
    back = np.clip(np.rint(color.ycbcr_to_rgb(ycc8)), 0, 255).astype(np.int64)
    diff = np.abs(back - colours.astype(np.int64))
    assert diff.max() == 1
    assert 0.05 < (diff > 0).mean() < 0.6  # about a third of all colours move by one code value


def test_ycbcr_range(colours):
    ycc = color.rgb_to_ycbcr(colours)
    # Y in [0, 255]; Cb, Cr reach 128 +- 127.5 at the cube corners (pure blue / pure red)
    assert ycc[:, 0].min() >= -1e-3 and ycc[:, 0].max() <= 255 + 1e-3
    corners = color.rgb_to_ycbcr(CORNERS)
    assert corners[:, 1:].min() == pytest.approx(0.5, abs=1e-3)
    assert corners[:, 1:].max() == pytest.approx(255.5, abs=1e-3)


def test_matches_pillow_jfif_conversion(colours):
    rgb = colours[:1_000_000].reshape(1000, 1000, 3)
    pillow = np.asarray(Image.fromarray(rgb).convert("YCbCr")).astype(np.float64)
    ours = color.rgb_to_ycbcr(rgb).astype(np.float64)
    ours8 = np.clip(np.rint(ours), 0, 255)
    # Pillow uses 8-bit fixed-point arithmetic; it lands within one code value of our rounded result
    assert np.abs(pillow - ours8).max() <= 1
    assert np.abs(pillow - ours).mean() < 0.5
    # and Pillow's inverse of its own YCbCr agrees with ours within one code value
    pillow_rgb = np.asarray(Image.fromarray(pillow.astype(np.uint8), "YCbCr").convert("RGB")).astype(np.int64)
    ours_rgb = np.clip(np.rint(color.ycbcr_to_rgb(pillow)), 0, 255).astype(np.int64)
    assert np.abs(pillow_rgb - ours_rgb).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_versions_equal_numpy(dtype):
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 255, (2, 5, 7, 3))  # numpy layout (B, H, W, 3)
    rgb_t = torch.from_numpy(rgb).permute(0, 3, 1, 2).to(dtype)  # (B, 3, H, W)
    ycc_t = color.rgb_to_ycbcr_torch(rgb_t)
    assert ycc_t.dtype == dtype and ycc_t.shape == (2, 3, 5, 7)
    ycc_np = color.rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(ycc_t.permute(0, 2, 3, 1).double().numpy(), ycc_np, atol=1e-3)
    back_t = color.ycbcr_to_rgb_torch(ycc_t)
    np.testing.assert_allclose(back_t.permute(0, 2, 3, 1).double().numpy(), color.ycbcr_to_rgb(ycc_np), atol=1e-3)
    np.testing.assert_allclose(back_t.permute(0, 2, 3, 1).double().numpy(), rgb, atol=1e-3)


def test_torch_inverse_is_differentiable():
    ycc = torch.full((1, 3, 2, 2), 128.0, requires_grad=True)
    color.ycbcr_to_rgb_torch(ycc)[:, 0].sum().backward()  # dR/dY = 1, dR/dCb = 0, dR/dCr = 1.402
    g = ycc.grad[0, :, 0, 0]
    np.testing.assert_allclose(g.numpy(), [1.0, 0.0, 1.402], atol=1e-5)


@pytest.mark.parametrize(
    ("fn", "arg"),
    [
        (color.rgb_to_ycbcr, np.zeros((4, 4))),
        (color.ycbcr_to_rgb, np.zeros((4, 4, 4))),
        (color.rgb_to_ycbcr_torch, torch.zeros(1, 4, 2, 2)),
        (color.ycbcr_to_rgb_torch, torch.zeros(3, 2, 2)),
    ],
)
def test_wrong_shapes_raise(fn, arg):
    with pytest.raises(ValueError, match="3"):
        fn(arg)
