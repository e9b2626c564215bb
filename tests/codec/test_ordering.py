"""Tests of mbldm/codec/ordering.py: §3.2.1 PCA ordering of codewords and the ordinality measure."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from mbldm.codec import ordering


def _line_codebook(rng: np.random.Generator, k: int = 32, d: int = 16):
    """Codewords offset + t_k * u on a line, u with positive sum, in random order; returns (codebook, t)."""
    u = rng.uniform(0.1, 1.0, d)
    u /= np.linalg.norm(u)
    t = rng.permutation(np.linspace(-50, 50, k))
    offset = rng.uniform(0, 255, d)
    return offset + t[:, None] * u[None, :], t, u


def test_points_on_a_line_are_sorted_along_it_descending():
    rng = np.random.default_rng(0)
    cb, t, u = _line_codebook(rng)
    perm = ordering.pca_order(cb)
    assert perm.dtype == np.int64
    np.testing.assert_array_equal(perm, np.argsort(-t))  # c_i^0 > c_{i+1}^0
    v0 = ordering.first_principal_component(cb)
    np.testing.assert_allclose(v0, u, atol=1e-8)  # the line direction, sign with sum >= 0


def test_first_principal_component_matches_sklearn():
    rng = np.random.default_rng(1)
    cb = rng.normal(size=(64, 10)) * np.linspace(5, 1, 10)  # distinct variances per axis
    cb = cb @ np.linalg.qr(rng.normal(size=(10, 10)))[0]
    v0 = ordering.first_principal_component(cb)
    ref = PCA(n_components=1).fit(cb).components_[0]
    assert abs(abs(v0 @ ref) - 1) < 1e-8
    assert v0.sum() >= 0
    assert np.linalg.norm(v0) == pytest.approx(1.0)


def test_sign_convention_is_deterministic():
    rng = np.random.default_rng(2)
    cb = rng.normal(size=(50, 8)) * np.array([6, 1, 1, 1, 1, 1, 1, 1.0])
    v0 = ordering.first_principal_component(cb)
    assert v0.sum() >= 0
    # negating the codebook leaves the covariance and hence v0 unchanged, so the order reverses exactly
    np.testing.assert_allclose(ordering.first_principal_component(-cb), v0, atol=1e-12)
    np.testing.assert_array_equal(ordering.pca_order(-cb), ordering.pca_order(cb)[::-1])
    # the order does not depend on the input order of the codewords
    shuffle = rng.permutation(50)
    np.testing.assert_array_equal(shuffle[ordering.pca_order(cb[shuffle])], ordering.pca_order(cb))
    # and repeated calls agree
    np.testing.assert_array_equal(ordering.pca_order(cb), ordering.pca_order(cb.copy()))


@pytest.mark.parametrize("seed", range(12))
def test_sign_convention_holds_whatever_sign_eigh_returns(seed):
    # random anisotropic codebooks: LAPACK returns either sign of v0, the convention must fix it
    rng = np.random.default_rng(100 + seed)
    cb = rng.normal(size=(40, 6)) * np.array([5, 2, 1, 1, 1, 1.0]) @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    v0 = ordering.first_principal_component(cb)
    assert v0.sum() >= 0
    eig = np.linalg.eigh(np.cov(cb.T))[1][:, -1]
    np.testing.assert_allclose(v0, eig if eig.sum() >= 0 else -eig, atol=1e-8)
    projection = cb @ v0
    np.testing.assert_array_equal(ordering.pca_order(cb), np.argsort(-projection))


def test_brightest_patch_comes_first_for_grey_level_codebooks():
    # flat patches of different grey levels: v0 is (1,...,1)/sqrt(d) with positive sum -> index 0 = brightest
    levels = np.array([30.0, 200.0, 90.0, 255.0, 0.0])
    cb = levels[:, None] * np.ones((1, 4))
    np.testing.assert_array_equal(ordering.pca_order(cb), [3, 1, 2, 0, 4])


def test_ordinality_by_hand():
    c = np.array([[0.0], [1.0], [2.0]])
    # consecutive distances 1, 1 -> 1; all ordered pairs i != j: 1, 2, 1, 1, 2, 1 -> 8/6
    assert ordering.ordinality(c) == pytest.approx(1 / (8 / 6))
    # order 0, 2, 1: consecutive 2, 1 -> 1.5
    assert ordering.ordinality(c[[0, 2, 1]]) == pytest.approx(1.5 / (8 / 6))


def test_ordered_codebook_has_lower_ordinality_than_shuffled():
    rng = np.random.default_rng(3)
    # a 256 x 16 cloud with one dominant direction (like the mean brightness of patch codewords)
    u = rng.uniform(0.1, 1.0, 16)
    u /= np.linalg.norm(u)
    cb = 128 + rng.normal(0, 40, (256, 1)) * u + rng.normal(0, 4, (256, 16))
    shuffled = cb[rng.permutation(256)]
    ordered = cb[ordering.pca_order(cb)]
    o_shuffled, o_ordered = ordering.ordinality(shuffled), ordering.ordinality(ordered)
    assert 0.85 < o_shuffled < 1.15  # random order: about 1
    assert o_ordered < 0.6 * o_shuffled


def test_ordinality_needs_three_codewords():
    with pytest.raises(ValueError, match="at least 3"):
        ordering.ordinality(np.zeros((2, 4)))
