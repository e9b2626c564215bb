"""Real colour photographs that ship inside mbldm's dependencies: the demo's data when no folder is given.

Only files inside the installed wheels are used (nothing is downloaded; scikit-image's pooch fetchers are never
called, the files are opened directly):

* scikit-image (``skimage/data``): astronaut, chelsea, coffee, rocket, motorcycle_left, motorcycle_right;
* scikit-learn (``sklearn/datasets/images``, what ``load_sample_images`` reads): china, flower;
* matplotlib (``mpl-data/sample_data``, ``matplotlib.cbook.get_sample_data``): grace_hopper.

Synthetic, grey-scale, microscopy and medical images also bundled there (camera, coins, ihc, retina, hubble, ...)
are left out on purpose: the demo trains on natural colour photographs, as the paper does (§4.1: McMaster).
Each photo has a role: the scikit-image photos fit the codec, the others are held out for the Table 1 benchmark.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

__all__ = ["BundledPhoto", "CANDIDATES", "find_bundled_photos", "write_bundled_photos"]


@dataclasses.dataclass(frozen=True)
class BundledPhoto:
    """A photo file found inside an installed package.

    Attributes:
        name: short name ("astronaut"), also the PNG file stem the demo writes.
        package: the distribution that ships it ("scikit-image", "scikit-learn", "matplotlib").
        path: absolute path of the file inside the installed package.
        role: "fit" (codec training) or "heldout" (benchmark only).
    """

    name: str
    package: str
    path: Path
    role: str


# (name, package, file name, role); the order is the order of the demo's data folder.
CANDIDATES: tuple[tuple[str, str, str, str], ...] = (
    ("astronaut", "scikit-image", "astronaut.png", "fit"),
    ("chelsea", "scikit-image", "chelsea.png", "fit"),
    ("coffee", "scikit-image", "coffee.png", "fit"),
    ("rocket", "scikit-image", "rocket.jpg", "fit"),
    ("motorcycle_left", "scikit-image", "motorcycle_left.png", "fit"),
    ("motorcycle_right", "scikit-image", "motorcycle_right.png", "fit"),
    ("china", "scikit-learn", "china.jpg", "heldout"),
    ("flower", "scikit-learn", "flower.jpg", "heldout"),
    ("grace_hopper", "matplotlib", "grace_hopper.jpg", "heldout"),
)


def _package_dirs() -> dict[str, Path | None]:
    """Folder holding each package's bundled photos (None when the package is not importable)."""
    dirs: dict[str, Path | None] = {}
    try:
        import skimage.data

        dirs["scikit-image"] = Path(os.path.dirname(skimage.data.__file__))
    except ImportError:
        dirs["scikit-image"] = None
    try:
        import sklearn.datasets

        dirs["scikit-learn"] = Path(os.path.dirname(sklearn.datasets.__file__)) / "images"
    except ImportError:
        dirs["scikit-learn"] = None
    try:
        import matplotlib.cbook

        dirs["matplotlib"] = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).parent
    except (ImportError, OSError, ValueError):
        dirs["matplotlib"] = None
    return dirs


def find_bundled_photos() -> list[BundledPhoto]:
    """The candidate photos present in the installed packages, in ``CANDIDATES`` order.

    Returns:
        list of BundledPhoto (files that exist; missing ones are skipped silently).

    Raises:
        FileNotFoundError: none of the candidates is installed (the message lists where it looked).
    """
    dirs = _package_dirs()
    found = []
    for name, package, file, role in CANDIDATES:
        root = dirs.get(package)
        if root is not None and (root / file).is_file():
            found.append(BundledPhoto(name, package, (root / file).resolve(), role))
    if not found:
        where = ", ".join(f"{k}: {v}" for k, v in dirs.items())
        raise FileNotFoundError(f"no bundled sample photos found (looked in {where}); pass --data DIR")
    return found


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """Scale uint8 (H, W, 3) down (Pillow bicubic) so that its long side is at most ``max_side``."""
    from PIL import Image

    H, W = img.shape[:2]
    if max(H, W) <= max_side:
        return img
    scale = max_side / max(H, W)
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    return np.asarray(Image.fromarray(img).resize(size, resample=Image.Resampling.BICUBIC))


def write_bundled_photos(out_dir: str | os.PathLike, max_side: int | None = None,
                         overwrite: bool = False) -> list[tuple[BundledPhoto, Path]]:
    """Write every bundled photo as ``out_dir/<role>/<name>.png`` (role "fit" or "heldout").

    The demo then uses these folders like any other image folder (``codec fit --images out_dir/fit``,
    ``codec bench --images out_dir/heldout``).

    Args:
        out_dir: destination folder (created).
        max_side: optional cap on the long side (tests use small photos); None keeps the original pixels.
        overwrite: replace existing PNGs.

    Returns:
        list of (photo, written path).

    Raises:
        FileNotFoundError: no photo found.  FileExistsError: a PNG exists and ``overwrite`` is False.
    """
    from mbldm.io.images import load_image, save_png

    out = Path(out_dir)
    written = []
    for photo in find_bundled_photos():
        img = load_image(photo.path)  # (H, W, 3) uint8
        if max_side is not None:
            img = _shrink(img, int(max_side))
        target = out / photo.role / f"{photo.name}.png"
        save_png(target, img, overwrite=overwrite)
        written.append((photo, target))
    return written
