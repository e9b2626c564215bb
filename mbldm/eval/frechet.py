"""Fréchet distance between Gaussians (paper Eq. 1) and the feature statistics it needs; pure numpy, no I/O.

    FID(G, R) = ||mu_G - mu_R||_2^2 + Tr(Sigma_G + Sigma_R - 2 (Sigma_R^1/2 Sigma_G Sigma_R^1/2)^1/2)      (Eq. 1)

``feature_statistics`` gives the mean and covariance of a feature set; ``frechet_distance`` evaluates Eq. 1 on two
such pairs. The features and files are in :mod:`mbldm.eval.inception` and :mod:`mbldm.eval.fid`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "check_gaussian"]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set.

    Args:
        features: (N, D) real array (any float dtype), N >= 2, all finite.

    Returns:
        ``(mu, sigma)``: (D,) float64 mean and (D, D) float64 unbiased covariance (ddof = 1, ``np.cov``
        with ``rowvar=False``, as in pytorch-fid and the TF FID code).

    Raises:
        ValueError: ``features`` is not 2-D, has fewer than 2 rows, or holds NaN / inf.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"feature_statistics expects (N, D) features, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("feature_statistics: features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one Gaussian (mean, covariance) pair.

    Args:
        mu: (D,) mean, any real dtype. sigma: (D, D) covariance, symmetric to 1e-6 of its largest entry.
        name: what the pair is (e.g. a file name), used in error messages.

    Returns:
        ``(mu, sigma)`` as float64 copies, ``sigma`` made exactly symmetric.

    Raises:
        ValueError: mismatched shapes, NaN / inf, or a non-symmetric ``sigma``.
    """
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"frechet_distance: {name} needs mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"frechet_distance: {name} mean or covariance contains NaN or inf")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=0.0, atol=1e-6 * scale):
        raise ValueError(f"frechet_distance: {name} covariance is not symmetric")
    return mu, (sigma + sigma.T) / 2


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a symmetric PSD (D, D) matrix by eigendecomposition.

    Eigenvalues below the numerical-rank tolerance ``D * eps * max|eigenvalue|`` (``np.linalg.matrix_rank``'s)
    are set to 0: for a singular covariance they are round-off around 0, whose square roots (~1e-8) would
    otherwise add up to a visible bias over thousands of dimensions.

    Raises:
        ValueError: an eigenvalue below ``-1e-6 * max|eigenvalue|`` (not a covariance matrix).
    """
    eigvals, eigvecs = np.linalg.eigh(sigma)
    largest = float(np.abs(eigvals).max())
    if eigvals[0] < -1e-6 * largest:
        raise ValueError(f"frechet_distance: {name} covariance is not positive semi-definite "
                         f"(smallest eigenvalue {eigvals[0]:.3g})")
    tol = sigma.shape[0] * np.finfo(np.float64).eps * largest
    roots = np.sqrt(np.where(eigvals > tol, eigvals, 0.0))
    return (eigvecs * roots) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (paper Eq. 1; Dowson & Landau 1982).

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    The trace term equals pytorch-fid's ``Tr(sqrtm(sigma1 @ sigma2))`` (same eigenvalues) but is computed without
    a non-symmetric matrix square root: ``sigma1^1/2 sigma2 sigma1^1/2 = A A^T`` with ``A = sigma1^1/2 sigma2^1/2``
    (symmetric square roots by ``eigh``), so the trace of its root is the sum of the singular values of ``A``.
    This is real by construction (no imaginary round-off to discard) and handles singular covariances
    (N <= D, e.g. fewer than 2048 images) directly: zero directions give zero singular values, with no need
    for pytorch-fid's ``eps * I`` offset and retry.

    Args:
        mu1, mu2: (D,) means. sigma1, sigma2: (D, D) symmetric positive semi-definite covariances.
            Any real dtype; computed in float64.

    Returns:
        The squared Fréchet distance as a Python float (>= 0 up to round-off; FID reports this value unrooted).

    Raises:
        ValueError: mismatched shapes, NaN / inf, a non-symmetric covariance, or a covariance with clearly
            negative eigenvalues (not a covariance).
    """
    mu1, sigma1 = check_gaussian(mu1, sigma1, "first")
    mu2, sigma2 = check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    a = _psd_sqrt(sigma1, "first") @ _psd_sqrt(sigma2, "second")  # A = sigma1^1/2 sigma2^1/2, (D, D)
    trace_covmean = float(np.linalg.svd(a, compute_uv=False).sum())  # Tr (A A^T)^1/2 = sum of singular values
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


