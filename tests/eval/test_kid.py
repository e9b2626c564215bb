"""Tests for mbldm/eval/kid.py: unbiased MMD^2 with the cubic kernel (Bińkowski et al. 2018), over subsets."""
from __future__ import annotations

import numpy as np
import pytest

from mbldm.eval import kid as K


def _mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    """MMD_u^2 written term by term from its definition (Gretton et al. 2012, Eq. 3), kernel (x.y/d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _mmd2_masked_matrices(x: np.ndarray, y: np.ndarray) -> float:
    """The same with full kernel matrices and the diagonals removed by a mask (torch-fidelity's layout)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda a: a[~np.eye(len(a), dtype=bool)]  # noqa: E731
    return float(off(kxx).mean() + off(kyy).mean() - 2 * kxy.mean())


def test_mmd2_matches_double_loop_and_masked_matrices():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(0.5, 1.2, size=(7, 5))  # m != n
    expected = _mmd2_double_loop(x, y)
    assert K.mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert _mmd2_masked_matrices(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert K.mmd2_unbiased(y, x) == pytest.approx(expected, rel=1e-12, abs=1e-12)  # symmetric


def test_mmd2_hand_computed_tiny_cases():
    # d = 1, k(a, b) = (ab + 1)^3. X = {0, 1}, Y = {0, 2}: XX off-diagonal 2 k(0,1) / 2 = 1, YY 2 k(0,2) / 2 = 1,
    # XY (k(0,0) + k(0,2) + k(1,0) + k(1,2)) = 1 + 1 + 1 + 27 = 30 -> 2 * 30 / 4 = 15. MMD_u^2 = 1 + 1 - 15 = -13.
    assert K.mmd2_unbiased([[0.0], [1.0]], [[0.0], [2.0]]) == pytest.approx(-13.0, abs=1e-12)
    # d = 2 (gamma = 1/2): X = {(2,0), (0,2)}: x1.x2 = 0 -> XX 1; Y = {(2,2), (0,0)}: YY 1; XY dot products 4, 0, 4, 0
    # -> (4/2 + 1)^3 = 27, 1, 27, 1: sum 56 -> 2 * 56 / 4 = 28. MMD_u^2 = 1 + 1 - 28 = -26.
    x, y = np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([[2.0, 2.0], [0.0, 0.0]])
    assert K.mmd2_unbiased(x, y) == pytest.approx(-26.0, abs=1e-12)
    # kid() with subset_size = both set sizes uses all rows each time: mean = the value, std = 0
    result = K.kid(x, y, subsets=3, subset_size=2)
    assert (result.mean, result.std, result.subsets, result.subset_size) == (pytest.approx(-26.0), 0.0, 3, 2)


def test_polynomial_kernel_by_hand():
    got = K.polynomial_kernel(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(got, [[(11 / 2 + 1) ** 3, 1.0]])  # 1*3 + 2*4 = 11, d = 2
    assert got.dtype == np.float64


def test_kid_follows_documented_subset_draws():
    """Each subset: rng.choice of the real rows, then of the fake rows (default_rng(seed)); mean and std (ddof 0)
    of the per-subset double-loop values."""
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(9, 4)), rng.normal(0.3, 1.0, size=(7, 4))
    draws = np.random.default_rng(5)
    values = []
    for _ in range(4):
        r = draws.choice(9, 5, replace=False)
        f = draws.choice(7, 5, replace=False)
        values.append(_mmd2_double_loop(real[r], fake[f]))
    result = K.kid(real, fake, subsets=4, subset_size=5, seed=5)
    np.testing.assert_allclose(result.values, values, rtol=1e-12, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert result.std == pytest.approx(np.sqrt(np.mean((np.array(values) - np.mean(values)) ** 2)), rel=1e-12)
    assert (result.subsets, result.subset_size) == (4, 5)
    again = K.kid(real, fake, subsets=4, subset_size=5, seed=5)
    assert again.mean == result.mean  # seeded
    assert K.kid(real, fake, subsets=4, subset_size=5, seed=6).mean != result.mean


def test_kid_caps_subset_size_at_smaller_set_and_uses_defaults():
    rng = np.random.default_rng(2)
    result = K.kid(rng.normal(size=(30, 3)), rng.normal(size=(12, 3)))
    assert (result.subsets, result.subset_size) == (100, 12)  # torch-fidelity / clean-fid: 100 subsets of 1000
    assert (K.KID_SUBSETS, K.KID_SUBSET_SIZE) == (100, 1000)


def test_kid_of_halves_is_about_zero_and_of_shifted_set_positive():
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(800, 16)))  # non-negative, like pool3 features
    halves = K.kid(x[:400], x[400:], subsets=20, subset_size=200)
    shifted = K.kid(x[:400], x[400:] + 0.5, subsets=20, subset_size=200)
    # halves: unbiased, so |mean| is a few std / sqrt(subsets) at most (subsets overlap: allow 4 std, not 4 std/sqrt)
    assert abs(halves.mean) < 4 * halves.std + 1e-12
    assert shifted.mean > 10 * shifted.std > 0
    assert shifted.mean > 100 * abs(halves.mean)


def test_kid_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        K.kid(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        K.kid(np.full((5, 3), np.nan), x)
    with pytest.raises(ValueError, match="N >= 2"):
        K.kid(np.zeros((1, 3)), x)
    with pytest.raises(ValueError, match="subsets must be an integer >= 1"):
        K.kid(x, x, subsets=0)
    with pytest.raises(ValueError, match="subset_size must be an integer >= 2"):
        K.kid(x, x, subset_size=1)
    with pytest.raises(ValueError, match="polynomial_kernel"):
        K.polynomial_kernel(np.zeros((2, 3)), np.zeros((2, 2)))
