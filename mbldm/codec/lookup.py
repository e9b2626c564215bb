"""Table look-up decode kernel: index latents -> uint8 RGB in one compiled pass (numba).

Per patch: for each YCbCr plane, sum the pixel-space codewords selected by that plane's sub-quantizer indices,
then apply the BT.601 inverse (``color.YCBCR_TO_RGB``), round half to even, clip to [0, 255] and store. This
is the same arithmetic as ``Codec.decode_float`` (table sums, then the colour matrix), fused so that every
pixel is touched once; it is what makes decoding faster than JPEG decoding (see benchmarks/codec_speed.py).
"""
from __future__ import annotations

import numba
import numpy as np

# numba's default OpenMP layer shares libgomp with torch: its spinning worker threads made every later torch CPU op
# in the same process 40-70x slower (seen when sampling decodes batch after batch). The workqueue layer does not.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"


@numba.njit(parallel=True, cache=True, fastmath=False)
def _decode_kernel(z, tables, plane_of, offset, m_rgb, out):  # pragma: no cover - compiled
    # z: (B, h, w, c) int; tables: (c, K, d) float32; plane_of: (c,) int; offset: (3,) f32; m_rgb: (3, 3) f32
    # out: (B, H, W, 3) uint8
    b_count, h, w, c = z.shape
    d = tables.shape[2]
    s = out.shape[1] // h
    m00, m01, m02 = m_rgb[0, 0], m_rgb[0, 1], m_rgb[0, 2]
    m10, m11, m12 = m_rgb[1, 0], m_rgb[1, 1], m_rgb[1, 2]
    m20, m21, m22 = m_rgb[2, 0], m_rgb[2, 1], m_rgb[2, 2]
    lo, hi_v = np.float32(0.0), np.float32(255.0)
    for row in numba.prange(b_count * h):
        b = row // h
        hi = row % h
        y = np.empty(d, np.float32)
        cb = np.empty(d, np.float32)
        cr = np.empty(d, np.float32)
        for wi in range(w):
            y[:] = -offset[0]
            cb[:] = -offset[1]
            cr[:] = -offset[2]
            for j in range(c):  # sum the selected pixel-space codewords of each YCbCr plane
                t = tables[j, z[b, hi, wi, j]]
                p = plane_of[j]
                acc = y if p == 0 else (cb if p == 1 else cr)
                for e in range(d):
                    acc[e] += t[e]
            for i in range(s):  # colour conversion, round half to even, clip, store row by row
                orow = out[b, hi * s + i]
                for jj in range(s):
                    e = i * s + jj
                    yv, cbv, crv = y[e], cb[e], cr[e]
                    col = wi * s + jj
                    orow[col, 0] = np.uint8(min(max(np.rint(m00 * yv + m01 * cbv + m02 * crv), lo), hi_v))
                    orow[col, 1] = np.uint8(min(max(np.rint(m10 * yv + m11 * cbv + m12 * crv), lo), hi_v))
                    orow[col, 2] = np.uint8(min(max(np.rint(m20 * yv + m21 * cbv + m22 * crv), lo), hi_v))


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
