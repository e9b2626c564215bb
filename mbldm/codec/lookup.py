"""Table look-up decode kernel: index latents -> uint8 RGB in one compiled pass (numba).

Per patch: for each YCbCr plane, sum the pixel-space codewords selected by that plane's sub-quantizer indices,
then apply the BT.601 inverse (``color.YCBCR_TO_RGB``), round half to even, clip to [0, 255] and store. This
is the same arithmetic as ``Codec.decode_float`` (table sums, then the colour matrix), fused so that every
pixel is touched once; it is what makes decoding faster than JPEG decoding (see benchmarks/codec_speed.py).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, fastmath=False)
def _decode_kernel(z, tables, plane_of, offset, m_rgb, out):  # pragma: no cover - compiled
    # z: (B, h, w, c) int; tables: (c, K, d) float32; plane_of: (c,) int; offset: (3,) f32; m_rgb: (3, 3) f32
    # out: (B, H, W, 3) uint8
    b_count, h, w, c = z.shape
    d = tables.shape[2]
    s = out.shape[1] // h
    for row in numba.prange(b_count * h):
        b = row // h
        hi = row % h
        ycc = np.empty((3, d), np.float32)
        for wi in range(w):
            for p in range(3):
                ycc[p, :] = -offset[p]
            for j in range(c):
                t = tables[j, z[b, hi, wi, j]]
                acc = ycc[plane_of[j]]
                for e in range(d):
                    acc[e] += t[e]
            for e in range(d):
                y = ycc[0, e]
                cb = ycc[1, e]
                cr = ycc[2, e]
                r = hi * s + e // s
                col = wi * s + e % s
                for ch in range(3):
                    v = np.rint(m_rgb[ch, 0] * y + m_rgb[ch, 1] * cb + m_rgb[ch, 2] * cr)
                    out[b, r, col, ch] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


def decode_lookup(z: np.ndarray, tables: np.ndarray, plane_of: np.ndarray, offset: np.ndarray,
                  m_rgb: np.ndarray) -> np.ndarray:
    """(B, h, w, c) indices -> uint8 (B, h*s, w*s, 3).

    Args:
        z: integer indices, already validated to lie in [0, K-1].
        tables: float32 (c, K, s, s), pixel-space codeword of each latent channel in its YCbCr plane.
        plane_of: int64 (c,), the YCbCr plane (0, 1, 2) of each latent channel.
        offset: float32 (3,) YCbCr offsets; m_rgb: float32 (3, 3) YCbCr -> RGB matrix.
    """
    b, h, w, _ = z.shape
    c, k, s, _ = tables.shape
    out = np.empty((b, h * s, w * s, 3), np.uint8)
    _decode_kernel(np.ascontiguousarray(z), tables.reshape(c, k, s * s), plane_of, offset, m_rgb, out)
    return out
