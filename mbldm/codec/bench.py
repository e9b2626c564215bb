"""``codec bench``: the lossy-compression benchmark of §4.1 / Table 1, with JPEG at an equal bit rate beside it.

For every image: encode + decode with the codec, then PSNR (standard, ``metrics.psnr``), SSIM, the paper-compatible
uint8-wraparound PSNR (``metrics.psnr_paper_uint8``, a bug reproduction kept only to compare with Table 1), bits
per pixel and the Eq. 23 compression ratio; and Pillow JPEG at the nearest bit rate at or above ours.

Bits per pixel of ours: the codec is fixed-rate, ``bits_per_patch`` per s x s patch. Images whose size is not a
multiple of s are padded (edge replication) before encoding, so their rate is reported over the ORIGINAL pixels:
bpp = bits_per_patch * ceil(H/s) * ceil(W/s) / (H*W) (= bits_per_patch / s^2 when s divides H and W). The
``compression_ratio`` field is Eq. 23 (a property of the spec, as in Table 1).
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np

from mbldm.eval import metrics

JPEG_SUBSAMPLING = "4:2:0"  # Pillow's default for RGB; stated explicitly
JPEG_OPTIMIZE = False  # Pillow's default (no optimised Huffman tables)
NUMERIC_FIELDS = ("psnr_db", "ssim", "psnr_paper_uint8_db", "bpp", "compression_ratio")
JPEG_FIELDS = ("quality", "bpp", "psnr_db", "ssim")


def _check_rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: expects a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}")
    return img


def jpeg_encode(img: np.ndarray, quality: int) -> bytes:
    """Pillow JPEG bytes of uint8 (H, W, 3) ``img`` at ``quality`` (1..100), 4:2:0 subsampling, optimize=False."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(
        buf, format="JPEG", quality=int(quality), subsampling=JPEG_SUBSAMPLING, optimize=JPEG_OPTIMIZE
    )
    return buf.getvalue()


def jpeg_decode(data: bytes) -> np.ndarray:
    """Pillow decode of JPEG bytes -> uint8 (H, W, 3) RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_at_bpp(img: np.ndarray, target_bpp: float) -> tuple[int, float, np.ndarray]:
    """Pillow JPEG of ``img`` at the nearest bit rate at or above ``target_bpp``.

    Finds the lowest quality q in 1..100 whose file has bpp = 8 * len(bytes) / (H*W) >= target_bpp, by binary
    search over q (it assumes the size grows with q, which holds for libjpeg's quality scaling up to rare 1-byte
    ties). Encoder: Pillow defaults, i.e. 4:2:0 chroma subsampling, optimize=False, baseline.

    Args:
        img: uint8 (H, W, 3) RGB.
        target_bpp: bits per pixel to reach (e.g. ours, 0.75 for OPQ-32-8-8).
    Returns:
        (quality, bpp, decoded uint8 (H, W, 3)). If even q = 100 stays below the target, q = 100 is returned
        with its (lower) bpp and a ``UserWarning`` is emitted: the caller sees it as ``bpp < target_bpp``.
    Raises:
        ValueError: not a uint8 RGB image, or a target that is not a positive finite number.
    """
    img = _check_rgb(img, "jpeg_at_bpp")
    if not (math.isfinite(target_bpp) and target_bpp > 0):
        raise ValueError(f"jpeg_at_bpp: target bits per pixel must be a positive number, got {target_bpp}")
    height, width = img.shape[:2]
    cache: dict[int, bytes] = {}

    def bpp_at(q: int) -> float:
        if q not in cache:
            cache[q] = jpeg_encode(img, q)
        return metrics.jpeg_bpp(len(cache[q]), height, width)

    if bpp_at(100) < target_bpp:
        warnings.warn(
            f"jpeg_at_bpp: even quality 100 gives {bpp_at(100):.3f} bpp < target {target_bpp:.3f}; using 100",
            stacklevel=2,
        )
        quality = 100
    else:
        lo, hi = 1, 100  # invariant: bpp_at(hi) >= target; answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if bpp_at(mid) >= target_bpp:
                hi = mid
            else:
                lo = mid + 1
        quality = hi
    return quality, bpp_at(quality), jpeg_decode(cache[quality])


def _mean(rows: list[dict], fields: tuple[str, ...]) -> dict:
    return {f: float(np.mean([r[f] for r in rows])) for f in fields}


def bench_codec(codec, images: list[tuple[str, np.ndarray]]) -> dict:
    """Table 1 for one codec on named images, with JPEG at an equal-or-higher bit rate.

    Args:
        codec: a ``mbldm.codec.Codec``.
        images: list of (name, uint8 (H, W, 3) RGB) pairs; any size (padded to a multiple of s for encoding).
    Returns:
        ``{"spec": str, "images": [{"name", "psnr_db", "ssim", "psnr_paper_uint8_db", "bpp", "compression_ratio",
        "jpeg": {"quality", "bpp", "psnr_db", "ssim"}}, ...], "mean": {same numeric fields averaged, "jpeg":
        {...}}}``. PSNR in dB (inf for a lossless reconstruction), bpp in bits per original pixel.
    Raises:
        ValueError: no images, or an image that is not uint8 RGB.
    """
    if not images:
        raise ValueError("bench_codec: no images given")
    spec = codec.spec
    s = spec.patch_size
    ratio = metrics.compression_ratio(spec)
    rows = []
    for name, img in images:
        img = _check_rgb(img, f"bench_codec: image {name!r}")
        height, width = img.shape[:2]
        z = codec.encode(img)  # (h, w, c)
        rec = codec.decode(z, size=(height, width))  # uint8 (H, W, 3)
        bpp = spec.bits_per_patch * math.ceil(height / s) * math.ceil(width / s) / (height * width)
        quality, j_bpp, j_rec = jpeg_at_bpp(img, bpp)
        rows.append({
            "name": str(name),
            "psnr_db": metrics.psnr(img, rec),
            "ssim": metrics.ssim(img, rec),
            "psnr_paper_uint8_db": metrics.psnr_paper_uint8(img, rec),
            "bpp": bpp,
            "compression_ratio": ratio,
            "jpeg": {"quality": quality, "bpp": j_bpp, "psnr_db": metrics.psnr(img, j_rec),
                     "ssim": metrics.ssim(img, j_rec)},
        })
    mean = _mean(rows, NUMERIC_FIELDS)
    mean["jpeg"] = _mean([r["jpeg"] for r in rows], JPEG_FIELDS)
    return {"spec": spec.name, "images": rows, "mean": mean}


def _image_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    return rel.with_suffix("").as_posix()


def run_bench(codec_dir, images_dir, json_out=None, overwrite: bool = False) -> dict:
    """Load a codec and a folder of images, run ``bench_codec`` and optionally write the result as JSON.

    Args:
        codec_dir: a codec directory written by ``Codec.save``.
        images_dir: a folder scanned recursively for images (``scan_images``), or one image file. Images are
            named by their path relative to the folder, without extension (e.g. "baboon").
        json_out: optional path for the JSON result (written atomically).
        overwrite: replace an existing ``json_out``.
    Returns:
        the ``bench_codec`` dict.
    Raises:
        FileNotFoundError: missing codec or images folder. FileExistsError: ``json_out`` exists and not
        ``overwrite`` (checked before any work). ValueError: a folder without images, a damaged codec.
    """
    from mbldm.codec import Codec
    from mbldm.io.atomic import write_json
    from mbldm.io.images import load_image, scan_images

    images_dir = Path(images_dir)
    if json_out is not None and Path(json_out).exists() and not overwrite:
        raise FileExistsError(f"{json_out}: already exists (pass overwrite=True / --overwrite)")
    if not images_dir.exists():
        raise FileNotFoundError(f"{images_dir}: images folder not found")
    paths = scan_images(images_dir)  # [images_dir] for one file; ValueError for a folder without images
    codec = Codec.load(codec_dir)
    result = bench_codec(codec, [(_image_name(p, images_dir), load_image(p)) for p in paths])
    if json_out is not None:
        write_json(json_out, result, overwrite=overwrite)
    return result


def format_table(result: dict) -> str:
    """A plain-text table in the spirit of Table 1: one row per image plus the mean.

    Columns: PSNR (dB, standard), SSIM, PSNR-u8 (the paper-compatible uint8-wraparound figure), bpp, CR (Eq. 23),
    then JPEG quality / bpp / PSNR / SSIM at the nearest bit rate at or above ours ('*' marks a JPEG below ours:
    even quality 100 could not reach it).
    """
    head = ("image", "PSNR", "SSIM", "PSNR-u8", "bpp", "CR", "JPEG q", "JPEG bpp", "JPEG PSNR", "JPEG SSIM")

    def cells(name: str, r: dict, is_mean: bool) -> list[str]:
        j = r["jpeg"]
        flag = "*" if j["bpp"] < r["bpp"] - 1e-12 else ""
        q = f"{j['quality']:.1f}" if is_mean else f"{j['quality']:d}"
        return [name, f"{r['psnr_db']:.2f}", f"{r['ssim']:.3f}", f"{r['psnr_paper_uint8_db']:.2f}",
                f"{r['bpp']:.4f}", f"1:{r['compression_ratio']:g}", q, f"{j['bpp']:.4f}{flag}",
                f"{j['psnr_db']:.2f}", f"{j['ssim']:.3f}"]

    rows = [cells(r["name"], r, False) for r in result["images"]] + [cells("mean", result["mean"], True)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    rule = "-" * len(fmt(head))
    lines = [f"codec {result['spec']}", fmt(head), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1]),
             "PSNR: standard, mean over H*W*3 values (dB). PSNR-u8: MSE on uint8 with wraparound, reproduces the "
             "paper's Table 1 (a bug, not a metric).",
             "JPEG: Pillow, 4:2:0, optimize=False, lowest quality with bpp >= ours."]
    return "\n".join(lines)
