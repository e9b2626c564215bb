"""Kernel Inception Distance (Bińkowski, Sutherland, Arbel, Gretton 2018, "Demystifying MMD GANs"); pure numpy.

KID is the squared maximum mean discrepancy between the Inception features of two image sets under the cubic
polynomial kernel

    k(x, y) = (x . y / d + 1)^3                                  (d = feature dimension, 2048 for pool3)

estimated without bias (Gretton et al. 2012, MMD_u^2) on a subset X of m real and a subset Y of n fake features:

    MMD_u^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i, y_j) / (mn)

It is reported as the mean and standard deviation over ``subsets`` random subsets of ``subset_size`` images of each
set (drawn without replacement within a subset, independently across subsets), as torch-fidelity does
(``torch_fidelity/metric_kid.py``: defaults ``kid_subsets=100``, ``kid_subset_size=1000``, degree 3,
gamma = 1/d, coef0 = 1, ``np.mean`` / ``np.std`` of the per-subset values, i.e. the population std, ddof = 0) and
clean-fid (``cleanfid/fid.py`` ``kernel_distance``: ``num_subsets=100``, ``max_subset_size=1000`` capped at the
smaller set, which reports the mean only). As clean-fid, the subset size here is capped at the smaller set
(torch-fidelity refuses such a call instead). Unbiased means the estimate can be slightly negative when the two
distributions are equal; it does not depend on the number of images the way FID does.

Subset draws: ``rng = numpy.random.default_rng(seed)``; for each subset, first the real indices
``rng.choice(n_real, m, replace=False)``, then the fake ones ``rng.choice(n_fake, m, replace=False)``. The same
seed and features give the same result on any machine (up to BLAS round-off); the draws are not those of
torch-fidelity's ``RandomState(2020)``, so its values are matched statistically, not digit for digit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["KID_SUBSETS", "KID_SUBSET_SIZE", "KIDResult", "polynomial_kernel", "mmd2_unbiased", "kid",
           "check_kid_settings"]

KID_SUBSETS = 100  # torch-fidelity kid_subsets, clean-fid num_subsets
KID_SUBSET_SIZE = 1000  # torch-fidelity kid_subset_size, clean-fid max_subset_size
KID_DEGREE = 3  # cubic kernel (Bińkowski et al. 2018, Eq. 7 with gamma = 1/d, coef0 = 1)


@dataclass(frozen=True)
class KIDResult:
    """KID over random subsets.

    Attributes:
        mean: mean of the per-subset unbiased MMD^2 estimates (the KID value; unitless, squared feature scale).
        std: their population standard deviation (ddof = 0, as torch-fidelity).
        subsets: number of subsets S. subset_size: images per set in each subset m (after the cap).
        values: (S,) float64 per-subset estimates.
    """

    mean: float
    std: float
    subsets: int
    subset_size: int
    values: np.ndarray = field(repr=False, compare=False)


def _check_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"KID: {name} features must be a real (N, D) array with N >= 2, got {x.dtype} {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"KID: {name} features contain NaN or inf")
    return x


def check_kid_settings(subsets: int, subset_size: int) -> None:
    """Validate the subset count and requested size before any feature extraction.

    Raises:
        ValueError: ``subsets < 1`` or ``subset_size < 2`` (or not integers).
    """
    for name, value, low in (("subsets", subsets, 1), ("subset_size", subset_size, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"KID: {name} must be an integer >= {low}, got {value!r}")


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """Polynomial kernel matrix ``K[i, j] = (gamma * x_i . y_j + coef0) ** degree``.

    Args:
        x: (m, d) real array; y: (n, d) real array (any float dtype, computed in float64).
        degree, coef0: kernel parameters; gamma: default ``1 / d`` (KID's cubic kernel with the defaults).

    Returns:
        (m, n) float64 kernel matrix.

    Raises:
        ValueError: ``x`` and ``y`` are not 2-D with the same ``d``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"polynomial_kernel expects (m, d) and (n, d) arrays, got {x.shape} and {y.shape}")
    gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (MMD_u^2 of the module docstring) between two feature sets under KID's cubic kernel.

    Args:
        x: (m, d) features, m >= 2; y: (n, d) features, n >= 2 (m and n may differ). Any real dtype; float64 math.

    Returns:
        The estimate as a Python float (may be slightly negative when both sets come from one distribution).

    Raises:
        ValueError: not 2-D, fewer than 2 rows, different d, or NaN / inf.
    """
    x, y = _check_features(x, "first"), _check_features(y, "second")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    return _mmd2(x, y)


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """MMD_u^2 of validated float64 (m, d) and (n, d) features."""
    m, n = x.shape[0], y.shape[0]
    k_xx = polynomial_kernel(x, x)  # (m, m)
    k_yy = polynomial_kernel(y, y)  # (n, n)
    k_xy = polynomial_kernel(x, y)  # (m, n)
    off_xx = k_xx.sum() - np.trace(k_xx)  # sum over i != j
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float(off_xx / (m * (m - 1)) + off_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kid(real_features: np.ndarray, fake_features: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> KIDResult:
    """Kernel Inception Distance: MMD_u^2 under the cubic kernel, mean and std over random subsets.

    Args:
        real_features: (N_r, d) features of the real images, N_r >= 2; fake_features: (N_f, d), N_f >= 2.
            Any real dtype (e.g. the float64 of :func:`mbldm.eval.inception.extract_features` or the float32 of a
            statistics file); computed in float64.
        subsets: number of random subsets S >= 1 (default 100, torch-fidelity / clean-fid).
        subset_size: images drawn from each set per subset (default 1000), capped at ``min(N_r, N_f)``; >= 2.
        seed: seed of ``numpy.random.default_rng`` for the subset draws (order in the module docstring).

    Returns:
        :class:`KIDResult` (mean, std, subsets, the subset size used, per-subset values). Cost: 3 S matrix
        products of m x d by d x m (100 subsets of 1,000 at d = 2048: about 1.2 TFLOP, ~20 s on two CPU cores).

    Raises:
        ValueError: bad shapes, different d, NaN / inf, ``subsets < 1`` or ``subset_size < 2``.
    """
    check_kid_settings(subsets, subset_size)
    real, fake = _check_features(real_features, "real"), _check_features(fake_features, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID: feature dimensions differ (real {real.shape[1]} vs fake {fake.shape[1]})")
    m = min(int(subset_size), real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets), dtype=np.float64)  # (S,)
    for s in range(int(subsets)):
        r = rng.choice(real.shape[0], m, replace=False)  # (m,) real indices
        f = rng.choice(fake.shape[0], m, replace=False)  # (m,) fake indices
        values[s] = _mmd2(real[r], fake[f])
    return KIDResult(mean=float(values.mean()), std=float(values.std()), subsets=int(subsets), subset_size=m,
                     values=values)
