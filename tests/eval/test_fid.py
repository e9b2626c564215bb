"""Tests for mbldm/eval/fid.py (statistics files, features cache, FID and KID of image sets) and ``mbldm fid``."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from mbldm.eval import fid as F


def test_names_from_before_the_split_are_importable_from_fid():
    from mbldm.eval import frechet, inception

    for name in ("feature_statistics", "frechet_distance", "_check_gaussian"):
        assert callable(getattr(F, name))
    assert F.frechet_distance is frechet.frechet_distance and F.extract_features is inception.extract_features
    for name in ("INCEPTION_SIZE", "FEATURE_DIM", "MIN_UNBIASED_N", "WEIGHTS_PACKAGE", "WEIGHTS_FILE", "WEIGHTS_SHA1",
                 "FEATURE_EXTRACTOR_ID", "inception_weights_path", "resolve_device", "load_inception",
                 "tf_bilinear_resize", "InceptionFeatures", "extract_features", "extract_features_sharded",
                 "save_statistics", "load_statistics", "compute_statistics", "fid"):
        assert hasattr(F, name), name


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


# ---------------------------------------------------------------------------------------------------- features cache, KID
class _MeanColourExtractor:
    """Feature of an image = its mean R, G, B / 10, then zeros (dimension F.FEATURE_DIM at call time); float32
    values widened to float64, as the network's output."""

    def __call__(self, images):
        out = np.zeros((len(images), F.FEATURE_DIM), np.float32)
        for i, im in enumerate(images):
            out[i, :3] = im.reshape(-1, 3).mean(axis=0) / 10.0
        return out.astype(np.float64)


def _folder(path: Path, values) -> Path:
    from mbldm.io.images import save_png

    for i, v in enumerate(values):
        save_png(path / f"im_{i:03d}.png", np.full((5, 6, 3), v, np.uint8) + np.arange(3, dtype=np.uint8))
    return path


@pytest.fixture
def stub_network(monkeypatch):
    monkeypatch.setattr(F, "InceptionFeatures", lambda device=None: _MeanColourExtractor())


def test_statistics_file_stores_features_float32_and_sources(tmp_path, small_dim):
    x = np.random.default_rng(12).normal(size=(10, small_dim))
    mu, sigma = F.feature_statistics(x)
    path = tmp_path / "ref.npz"
    F.save_statistics(path, mu, sigma, 10, features=x, sources=[f"/data/{i}.png" for i in range(10)])
    with np.load(path, allow_pickle=False) as data:
        assert data["features"].dtype == np.float32 and data["features"].shape == (10, small_dim)
        assert data["sources"].dtype.kind == "U"
    features, sources = F.load_features(path, return_sources=True)
    np.testing.assert_array_equal(features, x.astype(np.float32).astype(np.float64))
    assert features.dtype == np.float64 and sources[3] == "/data/3.png"
    assert F.has_features(path) and F.load_statistics(path)[2] == 10
    with pytest.raises(ValueError, match=r"ref2.npz: features must be finite \(10, 8\)"):
        F.save_statistics(tmp_path / "ref2.npz", mu, sigma, 10, features=x[:9])


def test_old_statistics_file_without_features_works_for_fid_and_refuses_kid(tmp_path, small_dim, capsys):
    from mbldm.cli import main

    (mu_a, s_a), (mu_b, s_b) = _stats(13, dim=small_dim), _stats(14, dim=small_dim)
    F.save_statistics(tmp_path / "old.npz", mu_a, s_a, 10)  # no features, as files written before KID
    np.savez(tmp_path / "b.npz", mu=mu_b, sigma=s_b)
    assert not F.has_features(tmp_path / "old.npz")
    with pytest.warns(UserWarning, match="biased"):
        assert F.fid(tmp_path / "old.npz", tmp_path / "b.npz")["fid"] == pytest.approx(
            F.frechet_distance(mu_a, s_a, mu_b, s_b))
    with pytest.raises(ValueError, match=r"old.npz: statistics file holds no Inception features"):
        F.fid(tmp_path / "old.npz", tmp_path / "b.npz", kid=True)
    with pytest.raises(ValueError, match="old.npz: statistics file holds no Inception features"):
        F.load_features(tmp_path / "old.npz")
    assert main(["fid", "--real", str(tmp_path / "old.npz"), "--fake", str(tmp_path / "b.npz"), "--kid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mbldm fid: error: {tmp_path / 'old.npz'}: statistics file holds no "
                                               "Inception features")
    assert "--save-stats" in err[0]


def test_fid_kid_from_folders_equals_kid_of_cached_features(tmp_path, small_dim, stub_network, capsys):
    from mbldm.cli import main
    from mbldm.eval.kid import kid

    real = _folder(tmp_path / "real", range(0, 240, 20))  # 12 images
    fake = _folder(tmp_path / "fake", range(5, 205, 20))  # 10 images
    stats = tmp_path / "real.npz"
    with pytest.warns(UserWarning, match="biased"):
        result = F.fid(real, fake, save_stats=stats, kid=True, kid_subsets=7, kid_subset_size=50, progress=False)
    cached, sources = F.load_features(stats, return_sources=True)
    assert cached.shape == (12, small_dim) and sources == [str((real / f"im_{i:03d}.png").resolve()) for i in range(12)]
    fake_features = F.extract_features(fake, extractor=_MeanColourExtractor(), progress=False)
    expected = kid(cached, fake_features, subsets=7, subset_size=50, seed=0)
    assert (result["kid_subsets"], result["kid_subset_size"]) == (7, 10)  # capped at the 10 fake images
    assert result["kid_mean"] == pytest.approx(expected.mean, rel=1e-12)
    assert result["kid_std"] == pytest.approx(expected.std, rel=1e-12)
    assert result["fid"] == pytest.approx(F.frechet_distance(*F.feature_statistics(cached),
                                                             *F.feature_statistics(fake_features)), rel=1e-9)
    out = tmp_path / "fid.json"
    assert main(["fid", "--real", str(stats), "--fake", str(fake), "--kid", "--kid-subsets", "7",
                 "--kid-subset-size", "50", "--json", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"FID: {result['fid']:.2f} (12 real, 10 fake)",
                     f"KID: {expected.mean:.5f} ± {expected.std:.5f} (subsets 7 of size 10)"]
    data = json.loads(out.read_text())
    assert data["kid_mean"] == pytest.approx(expected.mean) and data["kid_std"] == pytest.approx(expected.std)
    assert (data["kid_subsets"], data["kid_subset_size"]) == (7, 10)


def test_cache_features_and_compute_features(tmp_path, small_dim):
    real = _folder(tmp_path / "real", (10, 50, 90))
    path = tmp_path / "cache.npz"
    features = F.cache_features(real, path, extractor=_MeanColourExtractor(), progress=False)
    np.testing.assert_allclose(features[:, 0], [1.0, 5.0, 9.0], rtol=1e-7)  # mean red / 10
    np.testing.assert_array_equal(F.compute_features(path), features)
    mu, sigma, n = F.load_statistics(path)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    assert n == 3
    with pytest.raises(FileExistsError):
        F.cache_features(real, path, extractor=_MeanColourExtractor(), progress=False)


def test_fid_kid_settings_checked_before_work(tmp_path, small_dim):
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    with pytest.raises(ValueError, match="subset_size must be an integer >= 2"):
        F.fid(tmp_path / "real", tmp_path / "fake", kid=True, kid_subset_size=1)
