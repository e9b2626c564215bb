"""Tests for mbldm/eval/frechet.py (paper Eq. 1): the Fréchet distance and feature statistics."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from mbldm.eval import frechet as F


# ---------------------------------------------------------------------------------------------------- pure math
def _reference_fid(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), real part."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    D = 16
    a, b = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    s1, s2 = a @ a.T / D + 0.1 * np.eye(D), b @ b.T / D + 0.1 * np.eye(D)  # non-commuting, full rank
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    expected = _reference_fid(mu1, s1, mu2, s2)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9, abs=1e-9)  # symmetric


def test_frechet_distance_singular_diagonal_by_hand():
    # Commuting diagonal covariances: Tr term = sum (sqrt(a_i) - sqrt(b_i))^2; zeros make both singular.
    s1, s2 = np.diag([4.0, 0.0, 1.0]), np.diag([1.0, 9.0, 0.0])
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 0.0])
    expected = (1 + 4) + (2 - 1) ** 2 + (0 - 3) ** 2 + (1 - 0) ** 2  # 16
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_rank_deficient_sample_covariance_is_finite_and_zero_for_identical():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 64))  # N < D: singular covariance, as with fewer than 2048 images
    mu, sigma = F.feature_statistics(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_two_gaussian_sets_with_unit_mean_shift_is_about_8():
    rng = np.random.default_rng(2)
    N, D = 1000, 8
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, D)) + 1.0
    value = F.frechet_distance(*F.feature_statistics(x), *F.feature_statistics(y))
    # True FID = ||1||^2 = D = 8. Sample means differ by 1 + e_i, e_i ~ N(0, 2/N): ||.||^2 ~ D + 2 sum e_i with
    # std 2 sqrt(2 D / N) ~= 0.25; the covariance term and E[sum e_i^2] add ~0.05. Allow 4 standard deviations.
    tolerance = 4 * 2 * np.sqrt(2 * D / N) + 0.1
    assert abs(value - D) < tolerance
    assert abs(value - D) > 1e-6  # it is an estimate, not an exact 8
    mu, sigma = F.feature_statistics(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_by_hand():
    mu, sigma = F.feature_statistics(np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=np.float32))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[4 / 3, 0.0], [0.0, 4 / 3]], atol=1e-15)  # ddof = 1
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


@pytest.mark.parametrize("features", [np.zeros((1, 4)), np.zeros(4), np.array([[0.0, np.nan], [1.0, 2.0]])])
def test_feature_statistics_rejects_bad_input(features):
    with pytest.raises(ValueError):
        F.feature_statistics(features)


def test_frechet_distance_rejects_bad_input():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="dimensions differ"):
        F.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        F.frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        F.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        F.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)
