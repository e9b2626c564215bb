"""Non-overlapping s x s patches of single-channel images, and stride-1 patches for codebook training.

A patch is flattened row-major: pixel (i, j) of the patch is element i*s + j (d = s*s elements).
"""
from __future__ import annotations

import numpy as np


def padded_size(height: int, width: int, s: int) -> tuple[int, int]:
    """Smallest (H', W') >= (height, width) divisible by s."""
    return -(-height // s) * s, -(-width // s) * s


def pad_to_multiple(images: np.ndarray, s: int) -> np.ndarray:
    """Pad (B, H, W, C) images at the bottom/right by edge replication so H and W are divisible by s."""
    if images.ndim != 4:
        raise ValueError(f"pad_to_multiple expects (B, H, W, C), got shape {images.shape}")
    _, height, width, _ = images.shape
    ph, pw = padded_size(height, width, s)
    if (ph, pw) == (height, width):
        return images
    return np.pad(images, ((0, 0), (0, ph - height), (0, pw - width), (0, 0)), mode="edge")


def to_patches(channel: np.ndarray, s: int) -> np.ndarray:
    """(B, H, W) with H, W divisible by s -> (B, h, w, s*s) non-overlapping patches (h = H/s, w = W/s)."""
    if channel.ndim != 3:
        raise ValueError(f"to_patches expects (B, H, W), got shape {channel.shape}")
    b, height, width = channel.shape
    if height % s or width % s:
        raise ValueError(f"to_patches: size {height}x{width} is not divisible by patch size {s}")
    h, w = height // s, width // s
    x = channel.reshape(b, h, s, w, s).transpose(0, 1, 3, 2, 4)  # (B, h, w, s, s)
    return x.reshape(b, h, w, s * s)


def from_patches(patches: np.ndarray, s: int) -> np.ndarray:
    """Inverse of ``to_patches``: (B, h, w, s*s) -> (B, h*s, w*s)."""
    if patches.ndim != 4 or patches.shape[-1] != s * s:
        raise ValueError(f"from_patches expects (B, h, w, {s * s}), got shape {patches.shape}")
    b, h, w, _ = patches.shape
    x = patches.reshape(b, h, w, s, s).transpose(0, 1, 3, 2, 4)  # (B, h, s, w, s)
    return x.reshape(b, h * s, w * s)


def stride1_patches(channel: np.ndarray, s: int) -> np.ndarray:
    """All stride-1 s x s patches of one (H, W) channel -> (N, s*s) float32 with N = (H-s+1)(W-s+1).

    This is the paper's codebook training set construction (§4.1: "all the possible patches").
    """
    if channel.ndim != 2:
        raise ValueError(f"stride1_patches expects (H, W), got shape {channel.shape}")
    if channel.shape[0] < s or channel.shape[1] < s:
        return np.empty((0, s * s), dtype=np.float32)
    win = np.lib.stride_tricks.sliding_window_view(channel, (s, s))  # (H-s+1, W-s+1, s, s)
    return np.ascontiguousarray(win.reshape(-1, s * s), dtype=np.float32)
