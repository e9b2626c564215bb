"""Full-range BT.601 colour conversion (JPEG / JFIF convention), numpy and torch.

    Y  =       0.299    R + 0.587    G + 0.114    B
    Cb = 128 - 0.168736 R - 0.331264 G + 0.5      B
    Cr = 128 + 0.5      R - 0.418688 G - 0.081312 B

All values in [0, 255] (float). The inverse uses the exact matrix inverse, so a float round trip is exact to
float32 precision, and uint8 RGB -> YCbCr -> RGB (rounded) returns the input exactly (within 1 code value
when YCbCr is itself rounded). Source: ITU-T T.871 (JFIF), §7.
"""
from __future__ import annotations

import numpy as np
import torch

RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)
YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR)
YCBCR_OFFSET = np.array([0.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) in [0, 255] (any real dtype, uint8 included) -> YCbCr (..., 3) float32 in [0, 255]."""
    return np.moveaxis(rgb_to_ycbcr_planes(rgb), 0, -1)


def rgb_to_ycbcr_planes(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) in [0, 255] -> YCbCr planes (3, ...) float32: plane-first layout for per-channel patching.

    Same values as ``np.moveaxis(rgb_to_ycbcr(rgb), -1, 0)``, computed as one (3, 3) @ (3, N) product.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_ycbcr_planes expects a last axis of 3 channels, got shape {rgb.shape}")
    planes = np.moveaxis(rgb, -1, 0).astype(np.float32)  # (3, ...)
    out = (RGB_TO_YCBCR.astype(np.float32) @ planes.reshape(3, -1)).reshape(planes.shape)
    out += YCBCR_OFFSET.astype(np.float32).reshape((3,) + (1,) * (out.ndim - 1))
    return out


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """YCbCr (..., 3) float -> RGB (..., 3) float32, not clipped (exact inverse of ``rgb_to_ycbcr``)."""
    ycbcr = np.asarray(ycbcr, dtype=np.float32)
    if ycbcr.shape[-1] != 3:
        raise ValueError(f"ycbcr_to_rgb expects a last axis of 3 channels, got shape {ycbcr.shape}")
    return (ycbcr - YCBCR_OFFSET.astype(np.float32)) @ YCBCR_TO_RGB.T.astype(np.float32)


def ycbcr_to_rgb_torch(ycbcr: torch.Tensor) -> torch.Tensor:
    """Differentiable inverse for channel-first tensors: (B, 3, H, W) YCbCr -> (B, 3, H, W) RGB, not clipped."""
    if ycbcr.ndim != 4 or ycbcr.shape[1] != 3:
        raise ValueError(f"ycbcr_to_rgb_torch expects (B, 3, H, W), got {tuple(ycbcr.shape)}")
    m = torch.as_tensor(YCBCR_TO_RGB, dtype=ycbcr.dtype, device=ycbcr.device)
    off = torch.as_tensor(YCBCR_OFFSET, dtype=ycbcr.dtype, device=ycbcr.device).view(1, 3, 1, 1)
    return torch.einsum("oc,bchw->bohw", m, ycbcr - off)


def rgb_to_ycbcr_torch(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> (B, 3, H, W) YCbCr (float, same dtype)."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_ycbcr_torch expects (B, 3, H, W), got {tuple(rgb.shape)}")
    m = torch.as_tensor(RGB_TO_YCBCR, dtype=rgb.dtype, device=rgb.device)
    off = torch.as_tensor(YCBCR_OFFSET, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return torch.einsum("oc,bchw->bohw", m, rgb) + off
