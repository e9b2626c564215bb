"""Tests of mbldm/codec/bench.py: JPEG at equal bpp, the Table 1 benchmark and its JSON, with a real tiny codec."""
from __future__ import annotations

import os
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mbldm.codec import bench

DATA = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
            or Path(__file__).resolve().parents[2].parent / "shared" / "data")
SIPI = DATA / "sipi"


def _load(name: str) -> np.ndarray:
    path = SIPI / name
    if not path.is_file():
        pytest.skip(f"real test image {path} not available (see MBLDM_TEST_DATA in README)")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _pillow_bpp(img: np.ndarray, q: int) -> float:
    """Independent Pillow encode with its defaults (4:2:0, optimize off)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    return 8 * len(buf.getvalue()) / (img.shape[0] * img.shape[1])


@pytest.fixture(scope="module")
def codec():
    from mbldm.codec import Codec

    train = _load("peppers.png")[:128, :128]  # 2 x 14,641 stride-1 patches -> 20,000
    return Codec.fit([train], spec="VQ-4-4-4", max_patches=20000, progress=False)


@pytest.fixture(scope="module")
def images():
    baboon, lena = _load("baboon.png"), _load("lena.png")
    # one crop divisible by s = 8 and one that is not (padded by the codec)
    return [("baboon", baboon[128:256, 128:256].copy()), ("lena", lena[200:260, 220:290].copy())]


def test_jpeg_at_bpp_is_lowest_quality_reaching_target():
    img = _load("lena.png")[:128, :128].copy()
    target = 1.0
    quality, bpp, decoded = bench.jpeg_at_bpp(img, target)
    assert bpp == pytest.approx(_pillow_bpp(img, quality))
    assert bpp >= target
    assert quality == 1 or _pillow_bpp(img, quality - 1) < target
    assert decoded.dtype == np.uint8 and decoded.shape == img.shape
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def test_jpeg_at_bpp_unreachable_target_uses_100_and_warns():
    img = _load("baboon.png")[:64, :64].copy()
    with pytest.warns(UserWarning, match="quality 100"):
        quality, bpp, _ = bench.jpeg_at_bpp(img, 40.0)
    assert quality == 100
    assert bpp == pytest.approx(_pillow_bpp(img, 100)) and bpp < 40.0


def test_jpeg_at_bpp_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        bench.jpeg_at_bpp(np.zeros((16, 16, 3), np.uint8), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        bench.jpeg_at_bpp(np.zeros((16, 16, 3), np.float32), 1.0)


def test_bench_codec_values(codec, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JPEG can reach these low rates: no flag expected
        result = bench.bench_codec(codec, images)
    assert result["spec"] == "VQ-4-4-4"
    assert [r["name"] for r in result["images"]] == ["baboon", "lena"]
    for (name, img), row in zip(images, result["images"]):
        h, w = img.shape[:2]
        rec = codec.decode(codec.encode(img), size=(h, w))
        assert row["psnr_db"] == pytest.approx(peak_signal_noise_ratio(img, rec, data_range=255), abs=1e-9)
        assert row["ssim"] == pytest.approx(
            structural_similarity(img, rec, data_range=255, channel_axis=-1), abs=1e-12)
        wrapped_mse = np.mean(((img.astype(np.int64) - rec.astype(np.int64)) ** 2) % 256)
        assert row["psnr_paper_uint8_db"] == pytest.approx(10 * math.log10(255**2 / wrapped_mse), abs=1e-9)
        # 12 bits per 8 x 8 patch; padded sizes count ceil(h/8) * ceil(w/8) patches over the original pixels
        assert row["bpp"] == pytest.approx(12 * math.ceil(h / 8) * math.ceil(w / 8) / (h * w), abs=1e-12)
        assert row["compression_ratio"] == 128.0  # Eq. 23: 24 * 64 / 12
        j = row["jpeg"]
        assert j["bpp"] >= row["bpp"] and j["bpp"] == pytest.approx(_pillow_bpp(img, j["quality"]))
        assert 10 < j["psnr_db"] < 60 and 0 < j["ssim"] <= 1
        assert 15 < row["psnr_db"] < 40
    assert result["images"][0]["bpp"] == 0.1875  # 128 x 128 divisible by 8
    assert result["images"][1]["bpp"] == pytest.approx(12 * 8 * 9 / (60 * 70))
    for f in ("psnr_db", "ssim", "psnr_paper_uint8_db", "bpp", "compression_ratio"):
        assert result["mean"][f] == pytest.approx(np.mean([r[f] for r in result["images"]]))
    for f in ("quality", "bpp", "psnr_db", "ssim"):
        assert result["mean"]["jpeg"][f] == pytest.approx(np.mean([r["jpeg"][f] for r in result["images"]]))


def test_bench_codec_json_shape(codec, images):
    result = json.loads(json.dumps(bench.bench_codec(codec, images[:1])))
    assert set(result) == {"spec", "images", "mean"}
    keys = {"name", "psnr_db", "ssim", "psnr_paper_uint8_db", "bpp", "compression_ratio", "jpeg"}
    assert set(result["images"][0]) == keys
    assert set(result["mean"]) == keys - {"name"}
    assert set(result["images"][0]["jpeg"]) == set(result["mean"]["jpeg"]) == {"quality", "bpp", "psnr_db", "ssim"}
    assert isinstance(result["images"][0]["jpeg"]["quality"], int)


def test_bench_codec_rejects_empty_and_bad_images(codec):
    with pytest.raises(ValueError, match="no images"):
        bench.bench_codec(codec, [])
    with pytest.raises(ValueError, match="'x'"):
        bench.bench_codec(codec, [("x", np.zeros((16, 16), np.uint8))])


def test_run_bench_writes_json_and_refuses_overwrite(codec, images, tmp_path):
    codec_dir = codec.save(tmp_path / "codec")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for name, img in images:
        Image.fromarray(img).save(img_dir / f"{name}.png")
    out = tmp_path / "bench.json"
    result = bench.run_bench(codec_dir, img_dir, json_out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["name"] for r in result["images"]] == ["baboon", "lena"]
    # a reloaded codec gives the same numbers as the in-memory one
    direct = bench.bench_codec(codec, images)
    assert result["mean"]["psnr_db"] == pytest.approx(direct["mean"]["psnr_db"], abs=1e-9)
    with pytest.raises(FileExistsError, match="bench.json"):
        bench.run_bench(codec_dir, img_dir, json_out=out)
    one = bench.run_bench(codec_dir, img_dir / "lena.png", json_out=out, overwrite=True)
    assert [r["name"] for r in one["images"]] == ["lena"]
    table = bench.format_table(result)
    assert "VQ-4-4-4" in table and "baboon" in table and "lena" in table
    assert f"{result['mean']['psnr_db']:.2f}" in table.splitlines()[-3]  # the mean row


def test_run_bench_missing_or_empty_folder(codec, tmp_path):
    codec_dir = codec.save(tmp_path / "codec")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bench.run_bench(codec_dir, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no image"):
        bench.run_bench(codec_dir, tmp_path / "empty")
