"""Pseudo-ordinality of codewords (§3.2.1): order each codebook by its first principal component.

The paper sorts codewords so that c_i^0 > c_{i+1}^0, where c^0 = c v_0 and v_0 is the eigenvector of the
codebook's covariance with the largest eigenvalue. The sign of an eigenvector is arbitrary; we fix it so that
v_0 has a non-negative sum (for patch codebooks: index 0 is the brightest codeword along v_0), which makes the
ordering deterministic.
"""
from __future__ import annotations

import numpy as np


def first_principal_component(codebook: np.ndarray) -> np.ndarray:
    """(K, D) codebook -> (D,) unit eigenvector of its covariance with the largest eigenvalue, sum >= 0."""
    c = np.asarray(codebook, dtype=np.float64)
    centred = c - c.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / max(len(c) - 1, 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    v0 = eigvecs[:, np.argmax(eigvals)]
    return -v0 if v0.sum() < 0 else v0


def pca_order(codebook: np.ndarray) -> np.ndarray:
    """Permutation (K,) int64 such that ``codebook[perm]`` has decreasing projection on the first PC.

    Ties are broken by the original index (stable sort).
    """
    projection = np.asarray(codebook, dtype=np.float64) @ first_principal_component(codebook)
    return np.argsort(-projection, kind="stable").astype(np.int64)


def ordinality(codebook: np.ndarray) -> float:
    """Mean distance between consecutive codewords i, i+1 divided by the mean distance over all pairs i != j.

    1.0 for a random order (in expectation); small values mean neighbouring indices are neighbouring codewords.
    """
    c = np.asarray(codebook, dtype=np.float64)
    k = len(c)
    if k < 3:
        raise ValueError(f"ordinality needs at least 3 codewords, got {k}")
    consecutive = np.linalg.norm(c[1:] - c[:-1], axis=1).mean()
    sq = (c**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0.0)
    all_pairs = np.sqrt(d2)[~np.eye(k, dtype=bool)].mean()
    return float(consecutive / all_pairs)
