"""Tests for mbldm/io/images.py: every input is made here with Pillow / numpy / tifffile / a hand PNG writer.

Expected values are derived independently: by hand (alpha compositing), with exact fractions
(round(v * 255 / 65535)), or with reference libraries (PIL.ImageOps.exif_transpose, tifffile).
"""
from __future__ import annotations

import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from mbldm.io.images import IMAGE_EXTENSIONS, load_image, save_png, scan_images

DATA = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
            or Path(__file__).resolve().parents[2].parent / "shared" / "data")


# ---------------------------------------------------------------------------------------------- helpers


def to8_exact(v: int) -> int:
    """round(v * 255 / 65535) with exact rationals (no ties exist for integer v)."""
    return round(Fraction(v * 255, 65535))


def composite8_exact(c: int, a: int, m: int) -> int:
    """Colour c with alpha a (both in [0, m]) over white, mapped to 8 bits, exactly."""
    return round(Fraction(255 * (c * a + m * (m - a)), m * m))


def write_png16(path: Path, samples: np.ndarray) -> None:
    """Minimal 16-bit PNG writer (PNG spec 1.2), cycling filter types 0..4 row by row.

    samples: (H, W, C) uint16, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA.
    """
    height, width, channels = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = 2 * channels  # bytes per complete pixel
    rows = [np.frombuffer(row.astype(">u2").tobytes(), np.uint8).astype(np.int64) for row in samples]
    raw = bytearray()
    prev = np.zeros_like(rows[0])
    for y, row in enumerate(rows):
        ftype = y % 5
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if ftype == 0:
            pred = np.zeros_like(row)
        elif ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (left + prev) // 2
        else:  # Paeth
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw.append(ftype)
        raw += ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw)))
                     + chunk(b"IEND", b""))


def quadrants(height: int, width: int, colors) -> np.ndarray:
    """(H, W, 3) uint8 image with four flat quadrants (top-left, top-right, bottom-left, bottom-right)."""
    img = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:] = colors
    return img


def assert_valid(rgb: np.ndarray, shape) -> None:
    assert rgb.dtype == np.uint8 and rgb.shape == shape and rgb.flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------------------------------- 8-bit modes


def test_rgb_png_is_read_exactly(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert_valid(out, (5, 7, 3))
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                        ("WEBP", ".webp")])
def test_lossless_formats_read_exactly(tmp_path, fmt, suffix):
    img = np.random.default_rng(7).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    options = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(img).save(tmp_path / f"a{suffix}", format=fmt, **options)
    np.testing.assert_array_equal(load_image(tmp_path / f"a{suffix}"), img)


def test_grayscale_is_replicated(tmp_path):
    gray = np.array([[0, 1, 127], [128, 254, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert_valid(out, (2, 3, 3))
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], gray)


def test_one_bit_image(tmp_path):
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "b.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "b.bmp"), [[[255] * 3, [0] * 3]])


def test_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 128], [100, 50, 200, 64], [10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    # by hand, c*a/255 + 255*(1 - a/255):
    # red, a=128: R = 255, G = B = 255*127/255 = 127
    # (100, 50, 200), a=64: (6400+48705)/255 = 216.1, (3200+48705)/255 = 203.5(5), (12800+48705)/255 = 241.2
    expected = [[[255, 127, 127], [216, 204, 241], [255, 255, 255], [10, 20, 30]]]
    np.testing.assert_array_equal(out, expected)


def test_gray_alpha_composited_on_white(tmp_path):
    la = np.array([[[0, 128], [0, 0], [90, 255]]], np.uint8)
    Image.frombytes("LA", (3, 1), la.tobytes()).save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), [[[127] * 3, [255] * 3, [90] * 3]])


def test_palette_with_transparency(tmp_path):
    im = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.save(tmp_path / "p.png", transparency=bytes([255, 0, 128]))  # red opaque, green clear, blue a=128
    out = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255], [127, 127, 255]]])


def test_palette_without_transparency(tmp_path):
    im = Image.frombytes("P", (2, 1), bytes([1, 0]))
    im.putpalette([10, 20, 30, 40, 50, 60])
    im.save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "p.bmp"), [[[40, 50, 60], [10, 20, 30]]])


def test_rgb_color_key_transparency(tmp_path):
    img = np.array([[[10, 20, 30], [10, 20, 31]]], np.uint8)
    Image.fromarray(img).save(tmp_path / "k.png", transparency=(10, 20, 30))
    np.testing.assert_array_equal(load_image(tmp_path / "k.png"), [[[255, 255, 255], [10, 20, 31]]])


# ------------------------------------------------------------------------------------------ 16-bit data

VALUES16 = [0, 128, 129, 257, 300, 1000, 257 * 77, 32768, 40000, 65000, 65534, 65535]


def test_16bit_gray_png_scaled_not_clipped(tmp_path):
    gray = np.array([VALUES16], np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")  # Pillow writes a 16-bit grayscale PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    out = load_image(tmp_path / "g16.png")
    # round(v*255/65535): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 257k -> k, 300 -> 1 (clipping would give 255)
    assert list(out[0, :, 0]) == [0, 0, 1, 1, 1, 4, 77, 128, 156, 253, 255, 255]
    assert list(out[0, :, 0]) == [to8_exact(v) for v in VALUES16]
    assert np.all(out[..., 0] == out[..., 2])


def test_16bit_gray_png_every_multiple_of_257(tmp_path):
    gray = (257 * np.arange(256, dtype=np.uint16)).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png")[..., 1], np.arange(256).reshape(16, 16))


def test_16bit_rgb_png_full_precision(tmp_path):
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 65536, (10, 6, 3)).astype(np.uint16)  # 10 rows: every filter type twice
    samples[0, :3] = [[1000, 128, 65535], [129, 40000, 257], [65534, 0, 300]]
    write_png16(tmp_path / "rgb16.png", samples)
    out = load_image(tmp_path / "rgb16.png")
    assert_valid(out, (10, 6, 3))
    expected = np.vectorize(to8_exact)(samples.astype(np.int64))
    np.testing.assert_array_equal(out, expected)
    assert list(out[0, 0]) == [4, 0, 255]  # high-byte truncation would give 3 for 1000


def test_16bit_rgba_png_composited(tmp_path):
    rng = np.random.default_rng(2)
    samples = rng.integers(0, 65536, (5, 4, 4)).astype(np.uint16)
    samples[0, 0] = [65535, 0, 0, 32768]
    write_png16(tmp_path / "rgba16.png", samples)
    out = load_image(tmp_path / "rgba16.png")
    s = samples.astype(np.int64)
    expected = np.array([[[composite8_exact(s[y, x, c], s[y, x, 3], 65535) for c in range(3)]
                          for x in range(4)] for y in range(5)])
    np.testing.assert_array_equal(out, expected)
    assert list(out[0, 0]) == [255, 127, 127]  # half-transparent red on white


def test_16bit_gray_alpha_png(tmp_path):
    samples = np.array([[[1000, 65535], [65535, 0], [0, 32768], [257 * 9, 65535], [40000, 30000]]], np.uint16)
    write_png16(tmp_path / "la16.png", samples)
    out = load_image(tmp_path / "la16.png")
    expected = [composite8_exact(int(c), int(a), 65535) for c, a in samples[0]]
    assert expected[:4] == [4, 255, 127, 9]
    np.testing.assert_array_equal(out[0], np.repeat(np.array(expected)[:, None], 3, axis=1))


def test_16bit_rgb_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    samples[0, 0] = [1000, 129, 65535]
    tifffile.imwrite(tmp_path / "rgb16.tif", samples, photometric="rgb")
    out = load_image(tmp_path / "rgb16.tif")
    np.testing.assert_array_equal(out, np.vectorize(to8_exact)(samples.astype(np.int64)))
    assert list(out[0, 0]) == [4, 1, 255]


def test_16bit_rgba_tiff_unassociated_alpha(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    samples = np.array([[[65535, 0, 0, 32768], [1000, 2000, 3000, 65535], [5, 5, 5, 0]]], np.uint16)
    tifffile.imwrite(tmp_path / "rgba16.tif", samples, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(load_image(tmp_path / "rgba16.tif"),
                                  [[[255, 127, 127], [4, 8, 12], [255, 255, 255]]])


def test_int32_image_in_16bit_range_and_out_of_range(tmp_path):
    Image.fromarray(np.array([[0, 257 * 5, 65535]], np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "i.tif")[0, :, 0], [0, 5, 255])
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big\.tif.*outside the 16-bit range"):
        load_image(tmp_path / "big.tif")


def test_float_image_unit_range_scaled(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2, 0.1]], np.float32)).save(tmp_path / "f.tif")
    # [0, 1] * 255 rounded half up: 0, 127.5 -> 128, 255, clipped -> 0, 25.5 -> 26
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 2], [0, 128, 255, 0, 26])


def test_float_image_above_one_clipped_to_255(tmp_path):
    Image.fromarray(np.array([[0.0, 100.4, 300.0, -5.0, 1.0]], np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 0], [0, 100, 255, 0, 1])


def test_float_image_with_nan_rejected(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif.*NaN"):
        load_image(tmp_path / "nan.tif")


# ------------------------------------------------------------------------------------- CMYK and EXIF


def test_adobe_cmyk_jpeg_colors(tmp_path):
    colors = [(200, 30, 40), (20, 180, 60), (30, 60, 200), (240, 220, 30)]
    img = quadrants(32, 32, colors)
    Image.fromarray(img).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    data = (tmp_path / "cmyk.jpg").read_bytes()
    assert b"\xff\xee" in data and b"Adobe" in data  # APP14 marker: inverted (Adobe) CMYK on disk
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(out - img).max() <= 6
    inverted = 255 - out  # what a loader ignoring the Adobe inversion would roughly give
    assert np.abs(inverted - img).max() > 100


def test_exif_orientation_6_jpeg(tmp_path):
    img = quadrants(20, 40, [(255, 0, 0), (0, 0, 255), (0, 0, 255), (0, 255, 0)])  # stored H=20, W=40
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(img).save(tmp_path / "o6.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "o6.jpg").astype(int)
    assert out.shape == (40, 20, 3)
    # 90 deg clockwise: stored (r, c) -> shown (c, H-1-r); stored top-left red -> shown top-right,
    # stored bottom-right green -> shown bottom-left.
    assert np.abs(out[0, -1] - [255, 0, 0]).max() <= 8
    assert np.abs(out[-1, 0] - [0, 255, 0]).max() <= 8
    assert np.abs(out[0, 0] - [0, 0, 255]).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    img = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), reference)


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_file_names_file(tmp_path, fmt, name):
    img = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "full", format=fmt)
    data = (tmp_path / "full").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: truncated or corrupt image"):
        load_image(tmp_path / name)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_jpeg_missing_last_bytes_detected(tmp_path):
    img = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "full.jpg")
    (tmp_path / "short.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-2])  # EOI marker gone
    with pytest.raises(ValueError, match=r"short\.jpg: truncated"):
        load_image(tmp_path / "short.jpg")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(ValueError, match=r"notes\.png: not an image file"):
        load_image(tmp_path / "notes.png")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ghost\.png: no such file"):
        load_image(tmp_path / "ghost.png")


def test_directory_rejected(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match=r"dir\.png: is a directory"):
        load_image(tmp_path / "dir.png")


# ---------------------------------------------------------------------------------------------- scan


def _make(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # scan_images looks at names only


def test_scan_nested_tree_case_insensitive(tmp_path):
    names = ["a.png", "b.PNG", "sub/c.jpg", "sub/d.JPEG", "sub/deep/e.Jpg", "sub/deep/f.tif", "g.bmp",
             "sub/h.webp", "sub/deep/i.TIFF", "sub/j.jpeg"]
    for n in names + ["readme.txt", "sub/notes.txt", ".hidden.png", ".cache/k.png", "sub/.x/l.jpg", "png"]:
        _make(tmp_path / n)
    found = scan_images(tmp_path)
    assert found == sorted(found, key=lambda p: p.relative_to(tmp_path).parts)
    assert len(found) == len(set(found)) == len(names)
    assert {p.relative_to(tmp_path).as_posix() for p in found} == set(names)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.png", "b.PNG", "g.bmp", "sub/c.jpg", "sub/d.JPEG", "sub/deep/e.Jpg", "sub/deep/f.tif",
        "sub/deep/i.TIFF", "sub/h.webp", "sub/j.jpeg"]


def test_scan_symlink_loop_and_duplicate_links(tmp_path):
    _make(tmp_path / "real" / "x.png")
    os.symlink(tmp_path / "real", tmp_path / "real" / "loop")  # real/loop -> real
    os.symlink(tmp_path / "real", tmp_path / "alias")  # second way into the same folder
    os.symlink(tmp_path / "real" / "x.png", tmp_path / "link.png")  # second name for the same file
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    os.link(tmp_path / "real" / "x.png", tmp_path / "zz_hard.png")  # hard link: same file again
    assert scan_images(tmp_path) == [tmp_path / "real" / "x.png"]  # the name not reached via a link


def test_scan_single_file_and_errors(tmp_path):
    _make(tmp_path / "one.JPG")
    assert scan_images(tmp_path / "one.JPG") == [tmp_path / "one.JPG"]
    _make(tmp_path / "empty" / "a.txt")
    with pytest.raises(ValueError, match=r"empty: folder holds no image files"):
        scan_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_images(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"a\.txt: not an image file"):
        scan_images(tmp_path / "empty" / "a.txt")
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


# ---------------------------------------------------------------------------------------------- save


def test_save_png_round_trip_and_no_overwrite(tmp_path):
    img = np.random.default_rng(6).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    target = tmp_path / "out" / "img.png"
    save_png(target, img)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), img)
    np.testing.assert_array_equal(load_image(target), img)
    assert [p.name for p in target.parent.iterdir()] == ["img.png"]  # no temp file left
    with pytest.raises(FileExistsError, match=r"img\.png"):
        save_png(target, img)
    save_png(target, img[::-1], overwrite=True)
    np.testing.assert_array_equal(load_image(target), img[::-1])


def test_save_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "g.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\.png"):
        save_png(tmp_path / "h.jpg", np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------ real data


def test_real_files():
    if not DATA.is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    cases = [(DATA / "kodak" / "kodim01.png", (512, 768, 3)), (DATA / "mcm" / "1.tif", (500, 500, 3)),
             (DATA / "faces" / "face_0000.jpg", (200, 200, 3))]
    for path, shape in cases:
        if not path.exists():
            pytest.skip(f"{path} not found")
        out = load_image(path)
        assert_valid(out, shape)
        with Image.open(path) as im:  # 8-bit RGB files: identical to Pillow's own decoding
            np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))
    assert len(scan_images(DATA / "kodak")) == 24
