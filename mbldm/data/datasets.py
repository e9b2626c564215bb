"""Image datasets for §4.2.1: recursive image folders and LSUN LMDB exports, resized and centre-cropped.

Every item is ``(image, source)``: ``image`` a uint8 array (R, R, 3) in [0, 255] (RGB), ``source`` a string naming
where it came from (the path relative to the folder root, or the LMDB key).

Preprocessing (:func:`resize_center_crop`) follows the usual LSUN / DDPM recipe: scale the short side to R, then
crop the centre R x R square. The paper trains at 512 x 512 (§4.2.1) while the LSUN images have a short side of
256 pixels, so for LSUN this *upscales* every image by about 2x (bicubic): the images carry no detail above their
native resolution, which is the paper's setting, not an error.

LMDB files are opened lazily, read-only and without locking, once per process (each DataLoader worker opens its
own environment on its first ``__getitem__``), so the datasets work with both the ``fork`` and ``spawn``
multiprocessing start methods and pickle without the environment.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mbldm.io.images import load_image, scan_images

__all__ = [
    "RESAMPLE",
    "resize_center_crop",
    "ImageFolderDataset",
    "LMDBImageDataset",
    "is_lmdb_path",
    "open_image_dataset",
    "collate_images",
]

#: Pillow resampling filter of :func:`resize_center_crop`. Pillow's BICUBIC (a = -0.5) widens its support by the
#: scale factor when reducing, so it is properly anti-aliased for downscaling as well as smooth for upscaling.
RESAMPLE = Image.Resampling.BICUBIC


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def resize_center_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """Scale the short side of ``img`` to ``resolution`` (Pillow bicubic), then crop the centre square.

    The long side becomes ``round(long * R / short)`` (at least R). Pillow's ``reducing_gap`` is off (None): the
    whole resize is one bicubic pass, no box pre-reduction. An image whose short side already equals R is only
    cropped (no resampling). Smaller images are upscaled (LSUN's 256-pixel images at the paper's 512, §4.2.1).
    The crop offset is ``(long' - R) // 2`` (an odd excess leaves the extra pixel on the bottom/right).

    Args:
        img: uint8 (H, W, 3) RGB in [0, 255].
        resolution: R > 0, output side in pixels.

    Returns:
        uint8 (R, R, 3) RGB.

    Raises:
        ValueError: ``img`` is not uint8 (H, W, 3) with H, W > 0, or R is not a positive integer.
    """
    R = _check_resolution(resolution)
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    H, W = img.shape[:2]
    if min(H, W) != R:
        if H <= W:
            new_h, new_w = R, max(R, round(W * R / H))
        else:
            new_h, new_w = max(R, round(H * R / W)), R
        pil = Image.fromarray(img, mode="RGB")
        img = np.asarray(pil.resize((new_w, new_h), resample=RESAMPLE, reducing_gap=None))
    H, W = img.shape[:2]
    top, left = (H - R) // 2, (W - R) // 2
    return np.ascontiguousarray(img[top:top + R, left:left + R])


def _decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes (JPEG/PNG/WebP/...) to uint8 (H, W, 3) RGB by the very rules of ``load_image``.

    ``load_image`` reads paths only (its 16-bit PNG path re-opens the file), so the bytes are spooled to a
    temporary file and read with it: EXIF orientation, alpha on white, 16-bit rounding all match image folders.
    The cost (one small temporary file per image) is negligible next to decoding and resizing.

    Raises:
        ValueError: the bytes are not a readable image (the message names ``name``).
    """
    with tempfile.NamedTemporaryFile(prefix="mbldm-img-", suffix=".bin") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name)
        except ValueError as exc:
            raise ValueError(str(exc).replace(tmp.name, name)) from None


class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursive, sorted by ``scan_images``), each resized and centre-cropped.

    Item ``i`` is ``(uint8 (R, R, 3), source)`` with ``source`` the path relative to ``root`` (POSIX form).

    Raises:
        FileNotFoundError: ``root`` does not exist.  NotADirectoryError: ``root`` is not a folder.
        ValueError: no images under ``root``, or ``resolution`` is not a positive integer.
    """

    def __init__(self, root: str | os.PathLike, resolution: int):
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root}: no such image folder")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: not a folder of images")
        self.paths = scan_images(self.root)  # raises ValueError when there is no image

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, index: int) -> str:
        """The source string of item ``index``: its path relative to ``root``."""
        return Path(self.paths[index]).relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        img = load_image(self.paths[index])
        return resize_center_crop(img, self.resolution), self.source(index)


class MirroredDataset(Dataset):
    """A dataset followed by its horizontal mirror images: item i < N is ``base[i]``; item N + i is ``base[i]``
    flipped left-right, with source ``"<source>#hflip"``. Encoding both gives a latent store that trains with
    horizontal flips (a flipped image's latent is not a flip of its latent: every patch's codeword changes, so the
    mirror images are encoded, not derived).
    """

    SUFFIX = "#hflip"

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return 2 * len(self.base)

    def source(self, index: int) -> str:
        n = len(self.base)
        return self.base.source(index) if index < n else self.base.source(index - n) + self.SUFFIX

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        n = len(self.base)
        if index < n:
            return self.base[index]
        img, _ = self.base[index - n]
        return np.ascontiguousarray(img[:, ::-1]), self.source(index)


# Read-only LMDB environments by (process id, resolved path, subdir). py-lmdb refuses to open one environment
# twice in a process, so datasets on the same LMDB share it. LMDB forbids using an environment in a forked
# child, and py-lmdb (3.x) would refuse the child's own open of a file its parent still holds, so every
# environment is closed just before this process forks (e.g. DataLoader workers with the "fork" start method)
# and re-opened lazily afterwards, in the parent and in each child.
_ENVS: dict[tuple[int, str, bool], object] = {}


def _close_envs_before_fork() -> None:
    """Close this process's LMDB environments (no transaction outlives a ``__getitem__``, so none is open)."""
    pid = os.getpid()
    for key in [k for k in _ENVS if k[0] == pid]:
        _ENVS.pop(key).close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_envs_before_fork)


def _open_lmdb(path: Path, subdir: bool):
    import lmdb

    try:
        return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=2048)
    except lmdb.Error as exc:
        raise ValueError(f"{path}: cannot open the LMDB ({exc})") from exc


def is_lmdb_path(path: str | os.PathLike) -> bool:
    """True when ``path`` is an LMDB: a folder holding ``data.mdb``, or a ``.mdb`` file."""
    path = Path(path)
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.suffix == ".mdb")


class LMDBImageDataset(Dataset):
    """An LSUN-style LMDB export: keys are image ids, values encoded images (JPEG/PNG/WebP bytes).

    The keys are listed once in ``__init__`` with a short-lived read-only environment (LMDB returns them in
    byte order, so the order is deterministic) and kept as a compact numpy ``S`` array when possible (LSUN
    church: ~126k keys, cat: ~1.6M; cheap to pickle into ``spawn`` workers). ``__len__`` never touches the
    environment. The environment is opened lazily on the first ``__getitem__`` in each process
    (``readonly=True, lock=False, readahead=False``) and held in a per-process table, not on the dataset: it is
    never pickled, datasets on the same LMDB share one per process, and it is closed before any ``os.fork`` so
    that forked workers (and the parent, afterwards) open their own. Not for reading from several threads
    while another thread forks.

    Item ``i`` is ``(uint8 (R, R, 3), source)`` with ``source`` the key decoded as UTF-8 (undecodable bytes
    backslash-escaped).

    Raises:
        FileNotFoundError: ``path`` does not exist.  ValueError: not an LMDB, empty, or bad ``resolution``;
        at ``__getitem__``, a key vanished or its value is not a readable image (the message names both).
    """

    def __init__(self, path: str | os.PathLike, resolution: int):
        self.path = Path(path)
        self.resolution = _check_resolution(resolution)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such LMDB")
        if not is_lmdb_path(self.path):
            raise ValueError(f"{self.path}: not an LMDB (expected a folder holding data.mdb, or a .mdb file)")
        self._subdir = self.path.is_dir()
        self._resolved = str(self.path.resolve())
        self._keys: np.ndarray | list[bytes] = self._list_keys()
        if len(self._keys) == 0:
            raise ValueError(f"{self.path}: the LMDB holds no entries")

    def _list_keys(self) -> np.ndarray | list[bytes]:
        """All keys in LMDB byte order, read with this process's environment if open, else a short-lived one."""
        env = _ENVS.get(self._env_key())
        short_lived = env is None
        if short_lived:
            env = _open_lmdb(self.path, self._subdir)
        try:
            with env.begin(write=False) as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
        finally:
            if short_lived:
                env.close()
        # numpy "S" strips trailing NUL bytes: keep a plain list for such (non-LSUN) keys.
        return keys if any(k.endswith(b"\x00") for k in keys) else np.array(keys, dtype=np.bytes_)

    def _env_key(self) -> tuple[int, str, bool]:
        return os.getpid(), self._resolved, self._subdir

    def _env(self):
        """This process's read-only environment, opened on first use (after a fork the child opens its own)."""
        key = self._env_key()
        if key not in _ENVS:
            _ENVS[key] = _open_lmdb(self.path, self._subdir)
        return _ENVS[key]

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> bytes:
        """The raw LMDB key of item ``index``."""
        return bytes(self._keys[index])

    def source(self, index: int) -> str:
        """The source string of item ``index``: its key as text."""
        return self.key(index).decode("utf-8", errors="backslashreplace")

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        key = self.key(index)
        with self._env().begin(write=False, buffers=False) as txn:
            data = txn.get(key)
        name = f"{self.path}[{self.source(index)}]"
        if data is None:
            raise ValueError(f"{name}: key not found (the LMDB changed after the dataset was opened?)")
        img = _decode_image_bytes(data, name)
        return resize_center_crop(img, self.resolution), self.source(index)


def open_image_dataset(path: str | os.PathLike, resolution: int) -> ImageFolderDataset | LMDBImageDataset:
    """Open ``path`` as an LMDB (a folder holding ``data.mdb``, or a ``.mdb`` file) or else as an image folder.

    Items are ``(uint8 (R, R, 3), source str)``; see :class:`ImageFolderDataset` / :class:`LMDBImageDataset`.

    Raises:
        FileNotFoundError: ``path`` does not exist.  ValueError: no images, or a bad ``resolution``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image folder or LMDB")
    if is_lmdb_path(path):
        return LMDBImageDataset(path, resolution)
    return ImageFolderDataset(path, resolution)


def collate_images(batch: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
    """DataLoader ``collate_fn`` keeping numpy: items -> (uint8 (B, R, R, 3), [source] * B)."""
    images = np.stack([img for img, _ in batch])
    return images, [src for _, src in batch]
