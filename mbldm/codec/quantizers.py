"""FAISS quantizers (§3.1.1-3.1.3): the only module of mbldm that imports faiss.

Everything crossing this boundary is numpy: training patches go in as float32 (N, d), codebooks come out as
float32 ``(M, K, dsub)`` arrays (PQ/OPQ/VQ: dsub = d / M, RQ: dsub = d) plus, for OPQ, the (d, d) rotation R
(rotated = x @ R.T, as faiss's OPQMatrix ``A``), and codes come out as int64 ``(N, M)`` — never faiss's
bit-packed bytes (with nbits != 8 faiss packs codes; ``unpack_codes`` reads them).

VQ is k-means (§3.1.1), trained as a 1-sub-quantizer faiss ProductQuantizer (identical to faiss.Kmeans with
the same defaults). PQ (Jégou et al. 2011), OPQ (Ge et al. 2013, Eq. 14) and RQ (Chen et al. 2010) use faiss's
``ProductQuantizer``, ``OPQMatrix`` and ``ResidualQuantizer``. faiss's own sub-sampling rules apply to training
(k-means uses at most 256 points per centroid, OPQ at most 65,536 points to learn R; see ``train``).
"""
from __future__ import annotations

import faiss
import numpy as np

from mbldm.codec.codebooks import TrainedQuantizer

FAISS_VERSION = faiss.__version__
CENTRE = np.float32(128.0)  # patch values lie in [0, 255]; distances are computed on centred values
ENCODE_CHUNK = 16384


def _as_faiss_input(x: np.ndarray, d: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what}: expected float32 (N, {d}) vectors, got shape {x.shape}")
    return x


def _vector(v) -> np.ndarray:
    return faiss.vector_to_array(v)


def unpack_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """faiss bit-packed codes (N, code_size) uint8 -> int64 (N, M).

    faiss writes code j of a vector into bits [j*nbits, (j+1)*nbits) of its byte string, least significant bit
    first (faiss ``BitstringWriter``); for nbits == 8 this is one byte per code.
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    if nbits == 8:
        return packed[:, :m].astype(np.int64)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits].reshape(n, m, nbits)
    weights = (1 << np.arange(nbits, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of ``unpack_codes``: int (N, M) -> faiss bit-packed uint8 (N, ceil(M*nbits/8))."""
    codes = np.asarray(codes, dtype=np.int64)
    n, m = codes.shape
    bits = ((codes[:, :, None] >> np.arange(nbits)) & 1).astype(np.uint8).reshape(n, m * nbits)
    return np.packbits(bits, axis=1, bitorder="little")


def _train_pq(x: np.ndarray, m: int, nbits: int, seed: int, verbose: bool) -> np.ndarray:
    d = x.shape[1]
    pq = faiss.ProductQuantizer(d, m, nbits)
    pq.cp.seed = seed
    pq.cp.verbose = verbose
    pq.verbose = verbose
    pq.train(x)
    return _vector(pq.centroids).reshape(m, 1 << nbits, d // m).astype(np.float32)


def train(method: str, x: np.ndarray, m: int, nbits: int, seed: int = 0, verbose: bool = False) -> TrainedQuantizer:
    """Train one channel's quantizer on patch vectors.

    Args:
        method: "VQ" (requires m == 1), "PQ", "OPQ" or "RQ".
        x: float32 (N, d) training vectors (raw YCbCr values in [0, 255]).
        m, nbits: M sub-quantizers of K = 2**nbits codewords.
        seed: seed of faiss's k-means (and of OPQ's initial random rotation via faiss's fixed seeds).
    Raises:
        ValueError: fewer than K training vectors, or an unknown method.
    """
    x = _as_faiss_input(x, x.shape[1] if np.ndim(x) == 2 else -1, f"{method} training")
    k = 1 << nbits
    if x.shape[0] < k:
        raise ValueError(f"needs at least K={k} training patches, got {x.shape[0]}")
    if method in ("VQ", "PQ"):
        return TrainedQuantizer(method, _train_pq(x, m, nbits, seed, verbose))
    if method == "OPQ" and m == 1:
        # One codebook: k-means distortion is invariant to any orthogonal R (||Rx - Rc|| = ||x - c||), so
        # Eq. 14 has nothing to optimise; R = I gives the same quantizer without OPQ's 50 alternations.
        identity = np.eye(x.shape[1], dtype=np.float32)
        return TrainedQuantizer(method, _train_pq(x, m, nbits, seed, verbose), identity)
    if method == "OPQ":
        opq = faiss.OPQMatrix(x.shape[1], m)
        opq.verbose = verbose
        pq = faiss.ProductQuantizer(x.shape[1], m, nbits)  # learn R for the spec's codebook size, not 8 bits
        opq.pq = pq
        opq.train(x)
        rotation = _vector(opq.A).reshape(x.shape[1], x.shape[1]).astype(np.float32)
        return TrainedQuantizer(method, _train_pq(x @ rotation.T, m, nbits, seed, verbose), rotation)
    if method == "RQ":
        rq = faiss.ResidualQuantizer(x.shape[1], m, nbits)
        rq.cp.seed = seed
        rq.verbose = verbose
        rq.train(x)
        return TrainedQuantizer(method, _vector(rq.codebooks).reshape(m, k, x.shape[1]).astype(np.float32))
    raise ValueError(f"unknown quantizer method {method!r}; expected VQ, PQ, OPQ or RQ")


class Encoder:
    """A faiss encoder rebuilt from numpy codebooks (so a loaded or re-ordered codec encodes consistently)."""

    def __init__(self, q: TrainedQuantizer, rq_beam_size: int = 5):
        self.q = q
        d, m, nbits = q.d, q.m, q.nbits
        if q.method == "RQ":
            self._faiss = faiss.ResidualQuantizer(d, m, nbits)
            faiss.copy_array_to_vector(np.ascontiguousarray(q.codebooks, np.float32).ravel(), self._faiss.codebooks)
            self._faiss.max_beam_size = rq_beam_size
            self._faiss.is_trained = True
        else:
            self._faiss = faiss.ProductQuantizer(d, m, nbits)
            faiss.copy_array_to_vector(np.ascontiguousarray(q.codebooks, np.float32).ravel(), self._faiss.centroids)
            # Nearest codeword per sub-quantizer (Eq. 9) as one BLAS product per chunk on centred values:
            # argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k); centring at 128 keeps float32 precise.
            self._centred = [np.ascontiguousarray(cb - CENTRE, np.float32) for cb in q.codebooks]  # (K, dsub)
            self._sq_norms = [(cb.astype(np.float64) ** 2).sum(1).astype(np.float32) for cb in self._centred]
        self._rotation_t = None if q.rotation is None else np.ascontiguousarray(q.rotation.T, np.float32)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float (N, d) patch vectors -> int64 (N, M) codes (nearest codeword per sub-quantizer, Eq. 9/13;
        RQ: faiss beam search)."""
        x = _as_faiss_input(x, self.q.d, f"{self.q.method} encode")
        if self._rotation_t is not None:
            x = np.ascontiguousarray(x @ self._rotation_t)
        if x.shape[0] == 0:
            return np.zeros((0, self.q.m), np.int64)
        if self.q.method == "RQ":
            return unpack_codes(self._faiss.compute_codes(x), self.q.m, self.q.nbits)
        dsub = x.shape[1] // self.q.m
        codes = np.empty((x.shape[0], self.q.m), np.int64)
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            chunk = x[start:start + ENCODE_CHUNK] - CENTRE
            for j, (cb, sq) in enumerate(zip(self._centred, self._sq_norms)):
                scores = chunk[:, j * dsub:(j + 1) * dsub] @ (-2.0 * cb.T)  # (n, K)
                scores += sq
                codes[start:start + ENCODE_CHUNK, j] = scores.argmin(axis=1)
        return codes

    def faiss_decode(self, codes: np.ndarray) -> np.ndarray:
        """faiss's own decode of int (N, M) codes -> float32 (N, d) (reference for tests; rotation inverted)."""
        y = self._faiss.decode(pack_codes(codes, self.q.nbits))
        return y if self._rotation_t is None else y @ self.q.rotation
