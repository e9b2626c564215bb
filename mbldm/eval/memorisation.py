"""Memorisation check: how close generated samples are to their nearest training image; pure numpy, no I/O.

For each generated sample, the Euclidean distance from its Inception feature to the nearest training feature is
compared with the leave-one-out nearest-neighbour distances of the training set itself (each training image to its
nearest *other* training image). A sample drawn afresh from the data distribution is as close to the training set
as a held-out training image is to the rest, so the fraction of samples below the ``q``-quantile of the
training distances is about ``q`` for a model that does not copy; a much larger fraction means "near-copies".
(The training distances are to ``N - 1`` other images, the samples' to ``N``: a negligible difference for
N in the thousands.)

Distances are in units of the 2048-d pool3 feature space of :mod:`mbldm.eval.inception` (features are averages of
ReLU outputs, typically 0..a few per dimension). The pairwise squared distances
``|q|^2 + |r|^2 - 2 q . r`` are computed in float64 over blocks of ``chunk_size`` query rows, so memory is
``chunk_size x N_reference`` floats (1,000 samples x 3,000 training images x 2048: 12 GFLOP, ~2 MB per block).
The file level (feature extraction, figure, JSON) is :mod:`mbldm.eval.memorisation_report`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NearestNeighbours", "knn", "nearest_neighbours", "neighbour_rows", "DEFAULT_QUANTILE", "DEFAULT_K"]

DEFAULT_QUANTILE = 0.05  # "near-copy": closer than the 5th percentile of training-vs-training distances
DEFAULT_K = 3  # neighbours listed (and shown in the figure) per sample
_CHUNK = 256


@dataclass(frozen=True)
class NearestNeighbours:
    """Nearest training images of generated samples, against the training set's own leave-one-out distances.

    Attributes:
        distances: (N_fake, k) float64, distance of each sample to its k nearest training features, ascending.
        indices: (N_fake, k) int64, the rows of those training features.
        train_distances: (N_train,) float64, each training feature's distance to its nearest other one.
        quantile: q in (0, 1). threshold: the q-quantile of ``train_distances`` (numpy's linear interpolation).
        near_copy_fraction: fraction of samples with ``distances[:, 0] < threshold`` (about q when not copying).
        median_fake: median of ``distances[:, 0]``. median_train: median of ``train_distances``.
    """

    distances: np.ndarray
    indices: np.ndarray
    train_distances: np.ndarray
    quantile: float
    threshold: float
    near_copy_fraction: float
    median_fake: float
    median_train: float

    @property
    def nearest(self) -> np.ndarray:
        """(N_fake,) float64 distance of each sample to its nearest training feature."""
        return self.distances[:, 0]


def _check_features(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < min_rows or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"memorisation: {name} features must be a real (N, D) array with N >= {min_rows}, "
                         f"got {x.dtype} {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"memorisation: {name} features contain NaN or inf")
    return x


def knn(queries: np.ndarray, reference: np.ndarray, k: int = 1, *, leave_one_out: bool = False,
        chunk_size: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of every query row (Euclidean), computed in blocks of query rows.

    Args:
        queries: (Q, D) real array. reference: (R, D) real array (float64 math).
        k: neighbours per query, 1 <= k <= R (R - 1 with ``leave_one_out``).
        leave_one_out: ``queries`` is ``reference`` (same rows, same order): row i never counts as its own
            neighbour (other rows with identical values still do).
        chunk_size: query rows per block (memory ``chunk_size x R`` float64).

    Returns:
        ``(distances, indices)``: (Q, k) float64 distances, ascending along axis 1, and (Q, k) int64 reference
        rows. Ties are broken by the lower reference row.

    Raises:
        ValueError: not 2-D, different D, NaN / inf, k out of range, ``chunk_size < 1``, or ``leave_one_out``
            with Q != R.
    """
    q = _check_features(queries, "query", 1)
    r = _check_features(reference, "reference", 1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"memorisation: feature dimensions differ ({q.shape[1]} vs {r.shape[1]})")
    if leave_one_out and q.shape[0] != r.shape[0]:
        raise ValueError(f"memorisation: leave_one_out needs queries == reference, got {q.shape[0]} and "
                         f"{r.shape[0]} rows")
    available = r.shape[0] - (1 if leave_one_out else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(f"memorisation: k must be an integer in [1, {available}], got {k!r}")
    if chunk_size < 1:
        raise ValueError(f"memorisation: chunk_size must be >= 1, got {chunk_size}")
    r_sq = np.einsum("ij,ij->i", r, r)  # (R,) squared norms
    distances = np.empty((q.shape[0], k), dtype=np.float64)
    indices = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], chunk_size):
        block = q[start:start + chunk_size]  # (b, D)
        d2 = np.einsum("ij,ij->i", block, block)[:, None] + r_sq[None, :] - 2.0 * (block @ r.T)  # (b, R)
        np.maximum(d2, 0.0, out=d2)  # round-off can make an exact duplicate's distance slightly negative
        if leave_one_out:
            rows = np.arange(block.shape[0])
            d2[rows, start + rows] = np.inf
        nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]  # (b, k): ascending, ties by reference row
        indices[start:start + block.shape[0]] = nearest
        distances[start:start + block.shape[0]] = np.sqrt(np.take_along_axis(d2, nearest, axis=1))
    return distances, indices


def nearest_neighbours(train_features: np.ndarray, fake_features: np.ndarray, k: int = DEFAULT_K,
                       quantile: float = DEFAULT_QUANTILE, *, chunk_size: int = _CHUNK) -> NearestNeighbours:
    """Nearest training features of each generated sample and the near-copy statistics.

    Args:
        train_features: (N_train, D) real features of the training images, N_train >= 2.
        fake_features: (N_fake, D) real features of the generated samples, N_fake >= 1.
        k: training neighbours listed per sample, 1 <= k <= N_train.
        quantile: q in (0, 1): a sample is a near-copy when its nearest-neighbour distance is below the q-quantile
            of the training set's leave-one-out nearest-neighbour distances.
        chunk_size: query rows per distance block (:func:`knn`).

    Returns:
        :class:`NearestNeighbours`.

    Raises:
        ValueError: bad shapes, different D, NaN / inf, k out of range, or q not in (0, 1).
    """
    train = _check_features(train_features, "training", 2)
    fake = _check_features(fake_features, "generated", 1)
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"memorisation: quantile must be in (0, 1), got {quantile!r}")
    distances, indices = knn(fake, train, k, chunk_size=chunk_size)  # (N_fake, k)
    train_distances = knn(train, train, 1, leave_one_out=True, chunk_size=chunk_size)[0][:, 0]  # (N_train,)
    threshold = float(np.quantile(train_distances, float(quantile)))
    return NearestNeighbours(
        distances=distances, indices=indices, train_distances=train_distances, quantile=float(quantile),
        threshold=threshold, near_copy_fraction=float(np.mean(distances[:, 0] < threshold)),
        median_fake=float(np.median(distances[:, 0])), median_train=float(np.median(train_distances)))


def neighbour_rows(result: NearestNeighbours, rows: int = 8) -> np.ndarray:
    """The samples to show in the figure: the ``rows`` closest to the training set (the likeliest copies).

    Args:
        result: a :class:`NearestNeighbours`. rows: how many (at most N_fake are returned), >= 1.

    Returns:
        (min(rows, N_fake),) int64 sample rows, by ascending nearest-neighbour distance (ties: lower row first).

    Raises:
        ValueError: ``rows < 1``.
    """
    if rows < 1:
        raise ValueError(f"memorisation: rows must be >= 1, got {rows}")
    return np.argsort(result.nearest, kind="stable")[:rows].astype(np.int64)
