"""Tests for mbldm/eval/memorisation.py: nearest-neighbour distances, leave-one-out, quantile, near-copy fraction."""
from __future__ import annotations

import numpy as np
import pytest

from mbldm.eval import memorisation as M


def test_nearest_neighbours_by_hand_on_a_line():
    # 1-d features: training at 0, 1, 3, 7; leave-one-out NN distances 1 (0->1), 1 (1->0), 2 (3->1), 4 (7->3).
    train = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.9], [5.0], [7.0], [20.0]])  # NN distances 0.1 (->1), 2 (->3 or 7: tie, lower row 3), 0, 13
    result = M.nearest_neighbours(train, fake, k=2, quantile=0.5)
    np.testing.assert_allclose(result.train_distances, [1, 1, 2, 4])
    np.testing.assert_allclose(result.distances, [[0.1, 0.9], [2, 2], [0, 4], [13, 17]], atol=1e-12)
    np.testing.assert_array_equal(result.indices, [[1, 0], [2, 3], [3, 2], [3, 2]])
    # median of [1, 1, 2, 4] (numpy linear interpolation): 1.5; samples below it: 0.1 and 0 -> 2 of 4
    assert result.threshold == pytest.approx(1.5)
    assert result.near_copy_fraction == pytest.approx(0.5)
    assert result.median_fake == pytest.approx(np.median([0.1, 2, 0, 13]))  # 1.05
    assert result.median_train == pytest.approx(1.5)
    np.testing.assert_allclose(result.nearest, [0.1, 2, 0, 13], atol=1e-12)
    # 25% quantile of [1, 1, 2, 4] = 1 (position 0.75 between 1 and 1): strictly below -> 0.1 and 0 still
    assert M.nearest_neighbours(train, fake, quantile=0.25).threshold == pytest.approx(1.0)


def test_knn_matches_brute_force_in_chunks():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 6)), rng.normal(size=(23, 6))
    full = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))  # (37, 23) explicit differences
    distances, indices = M.knn(q, r, k=4, chunk_size=5)  # several blocks, the last one partial
    np.testing.assert_array_equal(indices, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :4], rtol=1e-10, atol=1e-10)
    assert distances.dtype == np.float64 and indices.dtype == np.int64


def test_knn_leave_one_out_excludes_only_the_row_itself():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])  # rows 0 and 1 identical
    distances, indices = M.knn(x, x, k=2, leave_one_out=True, chunk_size=2)
    np.testing.assert_allclose(distances, [[0, 5], [0, 5], [5, 5]], atol=1e-12)
    np.testing.assert_array_equal(indices, [[1, 2], [0, 2], [0, 1]])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\]"):
        M.knn(x, x, k=3, leave_one_out=True)


def test_fresh_draws_give_about_the_quantile_and_copies_give_all():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2000, 8))
    train, fresh = data[:1500], data[1500:]
    result = M.nearest_neighbours(train, fresh, quantile=0.1)
    # 500 fresh draws: the fraction below the 10% quantile is ~Binomial(500, 0.1) / 500, std 0.013
    assert abs(result.near_copy_fraction - 0.1) < 0.05
    assert result.median_fake == pytest.approx(result.median_train, rel=0.1)
    copies = train[:50] + 1e-3 * rng.normal(size=(50, 8))
    assert M.nearest_neighbours(train, copies, quantile=0.1).near_copy_fraction == 1.0


def test_neighbour_rows_are_the_closest_samples():
    result = M.nearest_neighbours(np.array([[0.0], [10.0]]), np.array([[4.0], [9.5], [0.2], [5.0]]), k=1)
    np.testing.assert_array_equal(M.neighbour_rows(result, 2), [2, 1])  # distances 4, 0.5, 0.2, 5: ascending
    np.testing.assert_array_equal(M.neighbour_rows(result, 8), [2, 1, 0, 3])
    with pytest.raises(ValueError, match="rows"):
        M.neighbour_rows(result, 0)


def test_nearest_neighbours_rejects_bad_input():
    train = np.zeros((4, 3))
    with pytest.raises(ValueError, match="quantile"):
        M.nearest_neighbours(train, train, quantile=1.0)
    with pytest.raises(ValueError, match="dimensions differ"):
        M.nearest_neighbours(train, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        M.nearest_neighbours(train, np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="training features must be"):
        M.nearest_neighbours(np.zeros((1, 3)), train)
