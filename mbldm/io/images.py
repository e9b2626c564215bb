"""The one image loader: any common image file -> uint8 RGB array, and image-folder scanning.

Every dataset, codec and evaluation path reads pixels through :func:`load_image`, so the rules below
hold everywhere in mbldm:

* EXIF orientation is applied (same table as ``PIL.ImageOps.exif_transpose``).
* Grayscale (modes ``1``, ``L``, ``I``, ``I;16*``, ``F``) is replicated to three equal channels.
* Transparency (``RGBA``, ``LA``, premultiplied ``RGBa``/``La``, palette or colour-key ``tRNS``) is
  composited by alpha on a white background (255): ``out = c * a + 255 * (1 - a)`` with a in [0, 1].
* 16-bit samples (PNG, TIFF; gray, RGB, RGBA, gray+alpha) are read at full precision and mapped to
  8 bits by ``round(v * 255 / 65535)`` -- never clipped and never truncated to the high byte (Pillow 13
  opens 16-bit RGB(A) PNG/TIFF as 8-bit modes that keep only the high byte; we decode the low byte too).
* Float images (mode ``F``): if max <= 1 the data are taken as [0, 1] (clipped to it) and scaled by 255;
  otherwise they are taken as [0, 255] and clipped to it.  Non-finite values raise ``ValueError``.
* 32-bit integer images (mode ``I``) are taken as 16-bit data; values outside [0, 65535] raise.
* CMYK JPEGs (including Adobe APP14 inverted CMYK, which Pillow detects) convert with Pillow's
  ``convert("RGB")``; no ICC colour management is applied (embedded profiles are ignored).
* Multi-frame files (TIFF pages, animated WebP) give their first frame.

All integer rounding is exact integer arithmetic (no ties can occur for 8/16-bit data).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from mbldm.io.atomic import atomic_path

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
"""Lower-case file suffixes :func:`scan_images` collects (matched case-insensitively)."""

BACKGROUND = 255
"""Grey level (all three channels) that transparent pixels are composited on: white."""

# Pillow modes whose 8-bit conversion to RGB / RGBA is exact (no precision lost).
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                              "YCbCr"})
_ALPHA_MODES = frozenset({"PA", "LA", "La", "RGBA", "RGBa"})
# 16-bit PNG rawmodes Pillow truncates to 8 bits -> rawmodes that recover the low bytes (see _png16_samples).
_PNG16_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  zlib.error, Image.DecompressionBombError)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an 8-bit RGB array, following the module rules above.

    Args:
        path: image file (any format Pillow reads; 16-bit RGB TIFFs are read with tifffile).

    Returns:
        ``(H, W, 3)`` uint8 C-contiguous array, RGB, values in [0, 255], H/W after EXIF orientation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, not an image, truncated/corrupt, or of an unsupported kind;
            the message starts with the path, e.g. ``"photo.jpg: truncated or corrupt image (...)"``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not an image file")
    try:
        im = Image.open(path)
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image file or unsupported format") from exc
    except _DECODE_ERRORS as exc:
        raise ValueError(f"{path}: truncated or corrupt image ({exc})") from exc
    with im:
        try:
            tile = list(im.tile)  # load() empties it; the 16-bit PNG path needs the rawmode
            im.load()  # Pillow raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            rgb = _to_rgb8(im, tile, path)
        except _DECODE_ERRORS as exc:
            if isinstance(exc, _UnsupportedImage):
                raise ValueError(f"{path}: {exc}") from exc
            raise ValueError(f"{path}: truncated or corrupt image ({exc})") from exc
    return np.ascontiguousarray(apply_orientation(rgb, orientation))


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF ``Orientation`` tag value ``orientation`` into display orientation.

    Same mapping as ``PIL.ImageOps.exif_transpose`` (EXIF 2.32, tag 0x0112): 1 identity, 2 mirror
    left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise.  Other values are ignored.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array.
        orientation: EXIF orientation value.

    Returns:
        A view of ``image``, ``(H, W, ...)`` or ``(W, H, ...)``.
    """
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(image, k=-1)
    if orientation == 7:
        return image[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(image, k=1)
    return image


def scan_images(root: str | os.PathLike) -> list[Path]:
    """List the image files under ``root`` (recursively), or ``[root]`` if it is an image file.

    Files are collected when their suffix, lower-cased, is in :data:`IMAGE_EXTENSIONS` (so ``.PNG``,
    ``.Jpg``, ``.JPEG`` count).  Names starting with '.' (hidden files and folders) are skipped below
    ``root``.  Symlinked folders are followed except links back to a folder above (no loops); each real
    file is listed once: among several names for it (symlinks, hard links) the one not reached through a
    symlink wins, then the first in sorted order.  Broken links are skipped.  Paths are returned under
    ``root`` as given (not resolved), sorted by their components below ``root``.

    Returns:
        Sorted list of paths, at least one.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file without an image suffix, or a folder holding no image files.
        OSError: a folder below ``root`` cannot be listed.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{root}: not an image file (suffix not in {sorted(IMAGE_EXTENSIONS)})")
        return [root]

    def identity(path: str | Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def raise_error(exc: OSError) -> None:
        raise exc

    ancestors = {str(root): frozenset()}  # folder -> identities of the folders above it
    names: dict[tuple[int, int], list[Path]] = {}  # file identity -> every path reaching it
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=raise_error):
        above = ancestors.pop(dirpath) | {identity(dirpath)}
        keep = []
        for d in sorted(dirnames):
            child = os.path.join(dirpath, d)
            if d.startswith(".") or not os.path.exists(child) or identity(child) in above:
                continue  # hidden, broken link, or a symlink loop back to a folder above
            ancestors[child] = above
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            file = Path(dirpath, name)
            if name.startswith(".") or file.suffix.lower() not in IMAGE_EXTENSIONS or not file.exists():
                continue  # hidden, not an image suffix, or a broken symlink
            names.setdefault(identity(file), []).append(file)
    found = [paths[0] if len(paths) == 1 else _preferred_name(paths, root) for paths in names.values()]
    if not found:
        raise ValueError(f"{root}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _preferred_name(paths: list[Path], root: Path) -> Path:
    """Among several paths to one file, the first not reached through a symlink, else the first sorted."""
    real_root = root.resolve()

    def key(path: Path) -> tuple[bool, tuple[str, ...]]:
        parts = path.relative_to(root).parts
        return path.resolve() != real_root.joinpath(*parts), parts

    return min(paths, key=key)


def save_png(path: str | os.PathLike, rgb: np.ndarray, *, overwrite: bool = False) -> None:
    """Write an RGB image as a PNG file, atomically (``mbldm.io.atomic.atomic_path``).

    Args:
        path: destination; its suffix must be ``.png`` (any case).  Parent folders are created.
        rgb: ``(H, W, 3)`` uint8 array, RGB.
        overwrite: replace an existing file; otherwise an existing file raises.

    Raises:
        ValueError: wrong suffix, dtype or shape.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: save_png needs a .png file name")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{path}: expected a (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------
# decoding helpers


class _UnsupportedImage(ValueError):
    """A well-formed image of a kind load_image does not handle (message names the problem)."""


def _to_rgb8(im: Image.Image, tile: list, path: Path) -> np.ndarray:
    """Decode the loaded image ``im`` (``tile``: its tiles before loading) to ``(H, W, 3)`` uint8 RGB."""
    png16 = _png16_samples(im, tile, path)
    if png16 is not None:
        color, alpha = png16
        return _quantize(color, alpha, 65535)
    if im.format == "TIFF" and im.mode in ("RGB", "RGBA", "CMYK") and _tiff_bits(im) > 8:
        return _tiff16_rgb8(path)
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.int64)  # (H, W, 4), palette/tRNS resolved
            return _quantize(rgba[..., :3], rgba[..., 3], 255)
        return _quantize(np.asarray(im.convert("RGB"), dtype=np.int64), None, 255)
    if mode == "I" or mode.startswith("I;16"):
        gray = np.asarray(im).astype(np.int64)  # (H, W), any byte order
        low, high = int(gray.min(initial=0)), int(gray.max(initial=0))
        if low < 0 or high > 65535:
            raise _UnsupportedImage(f"integer image (mode {mode}) has values in [{low}, {high}], "
                                    "outside the 16-bit range [0, 65535]")
        alpha = _color_key_alpha(gray[..., None], im.info.get("transparency"), 65535)
        return _quantize(gray[..., None], alpha, 65535)
    if mode == "F":
        return _float_to_rgb8(np.asarray(im, dtype=np.float64))
    raise _UnsupportedImage(f"unsupported image mode {mode!r}")


def _quantize(color: np.ndarray, alpha: np.ndarray | None, maxval: int) -> np.ndarray:
    """Composite on BACKGROUND, map to 8 bits: round((255*c*a + 255*M*(M - a)) / M^2), exact in int64.

    Args:
        color: ``(H, W, 1)`` or ``(H, W, 3)`` integer samples in [0, maxval].
        alpha: ``(H, W)`` integer alpha in [0, maxval] (maxval = opaque), or None (opaque).
        maxval: 255 for 8-bit data, 65535 for 16-bit data.

    Returns:
        ``(H, W, 3)`` uint8.  With alpha None this is round(c * 255 / maxval).  The value is never a tie
        (x.5) for maxval in {255, 65535}, so round-half-up by integer floor division is exact.
    """
    c = color.astype(np.int64)
    m = np.int64(maxval)
    if alpha is None:
        num, den = 255 * c, m
    else:
        a = alpha.astype(np.int64)[..., None]
        num, den = 255 * c * a + BACKGROUND * m * (m - a), m * m  # 8-bit units: 255c/m * a/m + BG(1 - a/m)
    out = ((2 * num + den) // (2 * den)).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def _color_key_alpha(samples: np.ndarray, key, maxval: int) -> np.ndarray | None:
    """Alpha from a PNG ``tRNS`` colour key: 0 where all channels equal ``key``, else ``maxval``."""
    if key is None or isinstance(key, bytes):
        return None
    key = np.atleast_1d(np.asarray(key, dtype=np.int64))
    if key.shape[0] != samples.shape[-1]:
        return None
    return np.where(np.all(samples == key, axis=-1), 0, maxval).astype(np.int64)


def _float_to_rgb8(values: np.ndarray) -> np.ndarray:
    """Mode ``F`` (H, W) float -> (H, W, 3) uint8.

    If max <= 1: clip to [0, 1] and scale by 255; else clip to [0, 255].  Rounded half up.
    """
    if not np.all(np.isfinite(values)):
        raise _UnsupportedImage("float image holds NaN or infinite values")
    if values.size and values.max() <= 1.0:
        values = np.clip(values, 0.0, 1.0) * 255.0
    else:
        values = np.clip(values, 0.0, 255.0)
    gray = np.floor(values + 0.5).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _png16_samples(
    im: Image.Image, tile: list, path: Path
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Full 16-bit samples of a 16-bit RGB / RGBA / gray+alpha PNG, else None.

    Pillow opens these as 8-bit ``RGB``/``RGBA`` keeping only each sample's high byte (rawmodes
    ``RGB;16B``, ``RGBA;16B``, ``LA;16B``).  We re-decode the same zlib stream with a rawmode of equal
    bits per pixel (so PNG un-filtering is unchanged) that keeps the other bytes:
    ``RGB;16L``/``RGBA;16L`` read the big-endian data's low bytes; ``LA;16B`` data decoded as plain
    ``RGBA`` gives the four bytes (L high, L low, A high, A low).

    Returns:
        (color ``(H, W, C)`` int64 in [0, 65535], alpha ``(H, W)`` int64 or None), or None.
    """
    if im.format != "PNG" or len(tile) != 1 or tile[0].codec_name != "zip":
        return None
    rawmode = tile[0].args
    if rawmode == "LA;16B":
        b = _decode_png_with_rawmode(path, "RGBA").astype(np.int64)  # (H, W, 4) bytes
        return (b[..., 0:1] << 8) | b[..., 1:2], (b[..., 2] << 8) | b[..., 3]
    if rawmode not in _PNG16_LOW_BYTE_RAWMODE:
        return None
    high = _decode_png_with_rawmode(path, rawmode).astype(np.int64)
    low = _decode_png_with_rawmode(path, _PNG16_LOW_BYTE_RAWMODE[rawmode]).astype(np.int64)
    samples = (high << 8) | low  # (H, W, 3 or 4)
    if samples.shape[-1] == 4:
        return samples[..., :3], samples[..., 3]
    return samples, _color_key_alpha(samples, im.info.get("transparency"), 65535)


def _decode_png_with_rawmode(path: Path, rawmode: str) -> np.ndarray:
    """Decode the first frame of the PNG at ``path`` with its tile's rawmode replaced by ``rawmode``."""
    with Image.open(path) as im:
        im.tile = [im.tile[0]._replace(args=rawmode)]
        im.load()
        return np.asarray(im)


def _tiff_bits(im: Image.Image) -> int:
    """Largest BitsPerSample (TIFF tag 258) of the opened TIFF, 8 when absent."""
    bits = im.tag_v2.get(258, (8,))
    return max(bits) if isinstance(bits, tuple) else int(bits)


def _tiff16_rgb8(path: Path) -> np.ndarray:
    """16-bit RGB / RGBA / CMYK TIFF (first page) -> (H, W, 3) uint8, read at full depth with tifffile.

    Pillow 13 keeps only the high byte of these.  Alpha: ExtraSamples 2 (unassociated) is composited as
    usual; 1 (associated, premultiplied) as ``c_p + M * (1 - a)``; 0 (unspecified) is ignored.
    CMYK is rounded to 8 bits per ink, then converted by Pillow like 8-bit CMYK.
    """
    import tifffile  # ships with scikit-image

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        try:
            data = page.asarray()
        except Exception as exc:  # e.g. a compression needing the optional imagecodecs package
            raise _UnsupportedImage(f"cannot decode 16-bit TIFF with tifffile ({exc})") from exc
        photometric = int(page.photometric)
        planar = int(page.planarconfig) == 2
        extrasamples = tuple(int(e) for e in page.extrasamples)
    if data.dtype != np.uint16:
        raise _UnsupportedImage(f"unsupported TIFF sample type {data.dtype}")
    if planar:
        data = np.moveaxis(data, 0, -1)  # (S, H, W) -> (H, W, S)
    data = data.astype(np.int64)
    if photometric == 5:  # SEPARATED (CMYK)
        cmyk = ((data[..., :4] * 255 * 2 + 65535) // (2 * 65535)).astype(np.uint8)
        height, width = cmyk.shape[:2]
        return np.asarray(Image.frombytes("CMYK", (width, height), cmyk.tobytes()).convert("RGB"))
    if photometric != 2:
        raise _UnsupportedImage(f"unsupported 16-bit TIFF photometric interpretation {photometric}")
    color = data[..., :3]
    if data.shape[-1] > 3 and extrasamples and extrasamples[0] in (1, 2):
        alpha = data[..., 3]
        if extrasamples[0] == 1:  # premultiplied: c = c_true * a / M  ->  composite = c + M - a
            return _quantize(color + (65535 - alpha)[..., None], None, 65535)
        return _quantize(color, alpha, 65535)
    return _quantize(color, None, 65535)
