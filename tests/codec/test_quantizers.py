"""Tests of mbldm/codec/quantizers.py: faiss training, encoding, and the bit (un)packing of codes.

References are independent: faiss objects built here from the numpy codebooks (their own ``compute_codes`` /
``decode`` / ``pack_bitstrings``), brute-force nearest-neighbour search in float64, and hand-packed bytes.
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from mbldm.codec import quantizers as q
from mbldm.codec.codebooks import TrainedQuantizer


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _patches(n: int, s: int, seed: int) -> np.ndarray:
    """Image-like float32 (n, s*s) patch vectors in [0, 255]: brightness + a linear ramp + a little noise."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    base = rng.uniform(20, 235, (n, 1))
    ramp = rng.normal(0, 6, (n, 2)) @ np.stack([i.ravel(), j.ravel()]).astype(np.float64)
    x = base + ramp + rng.normal(0, 3, (n, s * s))
    return np.clip(x, 0, 255).astype(np.float32)


@pytest.fixture(scope="module")
def data16() -> np.ndarray:
    return _patches(4000, 4, seed=0)  # d = 16


def _nearest(x: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 nearest codeword: (argmin (N,), squared distances (N, K))."""
    d2 = ((x[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
    return d2.argmin(1), d2


# ------------------------------------------------------------------ pack / unpack
@pytest.mark.parametrize(
    ("codes", "nbits", "packed"),
    [
        ([[1, 2]], 4, [[0x21]]),  # code 0 in the low nibble
        ([[1, 2]], 6, [[1 + (2 << 6), 0]]),  # bits 0..5 = 1, bits 6..11 = 2
        ([[63, 63, 63, 63]], 6, [[255, 255, 255]]),
        ([[5, 0, 7]], 3, [[5 + (3 << 6), 1]]),  # code 2 = 0b111 straddles bytes: bits 6, 7 | bit 8
        ([[5, 250]], 8, [[5, 250]]),
        ([[1, 0, 1, 1, 0, 0, 0, 1, 1]], 1, [[0b10001101, 1]]),
    ],
)
def test_pack_and_unpack_by_hand(codes, nbits, packed):
    codes = np.array(codes)
    packed = np.array(packed, np.uint8)
    np.testing.assert_array_equal(q.pack_codes(codes, nbits), packed)
    out = q.unpack_codes(packed, codes.shape[1], nbits)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("nbits", range(1, 9))
@pytest.mark.parametrize("m", [1, 3, 4, 7])
def test_pack_unpack_round_trip_matches_faiss(nbits, m):
    rng = np.random.default_rng(nbits * 10 + m)
    codes = rng.integers(0, 1 << nbits, (200, m))
    packed = q.pack_codes(codes, nbits)
    assert packed.shape == (200, -(-m * nbits // 8))
    np.testing.assert_array_equal(packed, faiss.pack_bitstrings(codes.astype(np.int32), nbits))
    np.testing.assert_array_equal(q.unpack_codes(packed, m, nbits), codes)
    np.testing.assert_array_equal(faiss.unpack_bitstrings(packed, m, nbits), codes)


# ------------------------------------------------------------------ PQ with nbits != 8
def test_pq_6_bit_codes_decode_like_faiss(data16):
    tq = q.train("PQ", data16, m=4, nbits=6, seed=0)
    assert tq.codebooks.shape == (4, 64, 4) and tq.codebooks.dtype == np.float32
    assert (tq.m, tq.k, tq.nbits, tq.d) == (4, 64, 6, 16)
    codes = q.Encoder(tq).encode(data16)
    assert codes.shape == (4000, 4) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() <= 63 and len(np.unique(codes[:, 0])) > 32
    # an independent faiss PQ holding the same centroids: its packed codes and its decode
    pq = faiss.ProductQuantizer(16, 4, 6)
    faiss.copy_array_to_vector(tq.codebooks.ravel(), pq.centroids)
    packed = pq.compute_codes(data16)
    assert packed.shape == (4000, 3)  # 4 x 6 bits = 3 bytes, bit-packed
    reference = pq.decode(packed)
    ours = np.concatenate([tq.codebooks[j][codes[:, j]] for j in range(4)], axis=1)  # indexing codebooks
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(q.Encoder(tq).faiss_decode(codes), reference)


def test_pq_encode_is_the_nearest_sub_codeword(data16):
    tq = q.train("PQ", data16, m=2, nbits=5, seed=1)
    codes = q.Encoder(tq).encode(data16)
    for j in range(2):
        sub = data16[:, j * 8:(j + 1) * 8]
        best, d2 = _nearest(sub, tq.codebooks[j])
        chosen = d2[np.arange(len(sub)), codes[:, j]]
        # faiss uses ||x||^2 + ||c||^2 - 2<x, c> in float32: exact up to near-ties
        assert (codes[:, j] == best).mean() > 0.999
        np.testing.assert_allclose(chosen, d2.min(1), rtol=1e-4, atol=1e-2)


# ------------------------------------------------------------------ RQ
@pytest.mark.parametrize(("m", "nbits"), [(3, 4), (2, 6)])
def test_rq_codes_decode_like_faiss(data16, m, nbits):
    tq = q.train("RQ", data16, m=m, nbits=nbits, seed=0)
    k = 1 << nbits
    assert tq.codebooks.shape == (m, k, 16) and tq.d == 16
    codes = q.Encoder(tq).encode(data16)
    assert codes.shape == (4000, m) and codes.max() < k
    rq = faiss.ResidualQuantizer(16, m, nbits)
    faiss.copy_array_to_vector(tq.codebooks.ravel(), rq.codebooks)
    rq.max_beam_size = 5
    rq.is_trained = True
    packed = rq.compute_codes(data16)
    assert packed.shape == (4000, -(-m * nbits // 8))
    reference = rq.decode(packed)
    ours = sum(tq.codebooks[j][codes[:, j]] for j in range(m))  # RQ: sum of the selected codewords
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    np.testing.assert_allclose(q.Encoder(tq).faiss_decode(codes), reference, atol=1e-3)
    # each stage refines: the residual error falls with every added codebook
    errors = [((data16 - sum(tq.codebooks[j][codes[:, j]] for j in range(i + 1))) ** 2).mean() for i in range(m)]
    assert all(b < a for a, b in zip(errors, errors[1:]))


# ------------------------------------------------------------------ OPQ
def test_opq_encoder_with_a_known_rotation():
    rng = np.random.default_rng(5)
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0].astype(np.float32)
    codebooks = rng.normal(0, 40, (2, 16, 8)).astype(np.float32)
    tq = TrainedQuantizer("OPQ", codebooks, rotation)
    x = rng.normal(0, 40, (500, 16)).astype(np.float32)
    codes = q.Encoder(tq).encode(x)
    y = x.astype(np.float64) @ rotation.T  # rotated = x @ R^T
    for j in range(2):
        np.testing.assert_array_equal(codes[:, j], _nearest(y[:, j * 8:(j + 1) * 8], codebooks[j])[0])
    expected = np.concatenate([codebooks[0][codes[:, 0]], codebooks[1][codes[:, 1]]], 1) @ rotation  # x = R^T y
    np.testing.assert_allclose(q.Encoder(tq).faiss_decode(codes), expected, atol=1e-3)


def test_opq_training_learns_an_orthogonal_rotation():
    x = _patches(1500, 4, seed=3)
    tq = q.train("OPQ", x, m=4, nbits=4, seed=0)
    assert tq.rotation.shape == (16, 16) and tq.rotation.dtype == np.float32
    np.testing.assert_allclose(tq.rotation @ tq.rotation.T, np.eye(16), atol=1e-4)
    assert tq.codebooks.shape == (4, 16, 4)
    codes = q.Encoder(tq).encode(x)
    rec = q.Encoder(tq).faiss_decode(codes)
    assert ((rec - x) ** 2).mean() < 0.1 * x.var(axis=0).mean()  # explains > 90% of the variance


# ------------------------------------------------------------------ VQ, errors
def test_vq_is_k_means():
    rng = np.random.default_rng(7)
    centres = np.array([[40.0] * 4, [200.0] * 4])
    x = (centres[rng.integers(0, 2, 600)] + rng.normal(0, 2, (600, 4))).astype(np.float32)
    tq = q.train("VQ", x, m=1, nbits=1, seed=0)
    assert tq.codebooks.shape == (1, 2, 4)
    found = tq.codebooks[0][np.argsort(tq.codebooks[0][:, 0])]
    np.testing.assert_allclose(found, centres, atol=0.5)
    np.testing.assert_array_equal(q.Encoder(tq).encode(found)[:, 0], np.argsort(tq.codebooks[0][:, 0]))
    # Lloyd's fixed point on image-like data: every codeword is the mean of the vectors assigned to it
    y = _patches(1500, 2, seed=8)  # < 256 per centroid: faiss does not subsample
    tq = q.train("VQ", y, m=1, nbits=3, seed=0)
    codes = q.Encoder(tq).encode(y)[:, 0]
    for k in range(8):
        np.testing.assert_allclose(tq.codebooks[0, k], y[codes == k].mean(0), atol=0.5)


def test_too_few_training_vectors():
    with pytest.raises(ValueError, match="K=256"):
        q.train("PQ", _patches(100, 4, seed=0), m=1, nbits=8)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown quantizer method 'LSQ'"):
        q.train("LSQ", _patches(300, 4, seed=0), m=1, nbits=2)


def test_bad_input_shapes(data16):
    with pytest.raises(ValueError, match="N, "):
        q.train("PQ", data16.ravel(), m=1, nbits=2)
    tq = TrainedQuantizer("PQ", np.zeros((2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        q.Encoder(tq).encode(np.zeros((3, 15), np.float32))
    assert q.Encoder(tq).encode(np.zeros((0, 16), np.float32)).shape == (0, 2)


def test_trained_quantizer_dimensions():
    assert TrainedQuantizer("PQ", np.zeros((4, 256, 16))).d == 64
    assert TrainedQuantizer("RQ", np.zeros((4, 256, 64))).d == 64
    assert TrainedQuantizer("VQ", np.zeros((1, 1024, 64))).nbits == 10
