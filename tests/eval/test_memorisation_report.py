"""Tests for mbldm/eval/memorisation_report.py and the ``mbldm nearest`` command (network replaced by a stub)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mbldm.eval import fid as F
from mbldm.eval import inception
from mbldm.eval import memorisation_report as R


class _GreyLevelExtractor:
    """Feature of an image = its mean grey level in dimension 0 (zeros elsewhere): distances are grey-level gaps."""

    def __call__(self, images):
        out = np.zeros((len(images), inception.FEATURE_DIM), np.float32)
        out[:, 0] = [im.mean() for im in images]
        return out.astype(np.float64)


@pytest.fixture
def stub_network(monkeypatch):
    monkeypatch.setattr(inception, "InceptionFeatures", lambda device=None: _GreyLevelExtractor())


def _folder(path: Path, levels, size=(6, 6)) -> Path:
    from mbldm.io.images import save_png

    for i, v in enumerate(levels):
        save_png(path / f"im_{i:03d}.png", np.full((*size, 3), v, np.uint8))
    return path


@pytest.fixture
def sets(tmp_path):
    train = _folder(tmp_path / "train", [0, 10, 30, 70, 100], size=(8, 10))  # LOO NN distances 10, 10, 20, 30, 30
    fake = _folder(tmp_path / "fake", [9, 50, 100, 200])  # NN distances 1 (->10), 20 (->30; tie with 70), 0, 100
    return train, fake


def test_report_numbers_json_and_figure(tmp_path, sets, stub_network):
    from mbldm.io.images import load_image

    train, fake = sets
    report = R.memorisation_report(train, fake, tmp_path / "out", k=2, quantile=0.5, rows=3, tile=16, progress=False)
    s = report.summary()
    # threshold: median of [10, 10, 20, 30, 30] = 20; strictly below: 1 and 0 -> 2 of 4 samples
    assert s == {"n_train": 5, "n_fake": 4, "k": 2, "quantile": 0.5, "threshold": pytest.approx(20.0),
                 "near_copy_fraction": 0.5, "near_copies": 2, "median_fake_distance": pytest.approx(10.5),
                 "median_train_distance": pytest.approx(20.0)}
    data = json.loads((tmp_path / "out" / R.JSON_FILE).read_text())
    assert data["near_copy_fraction"] == 0.5 and len(data["samples"]) == 4
    first = data["samples"][0]
    assert first["source"] == str(fake / "im_000.png")
    assert first["distances"] == pytest.approx([1.0, 9.0])
    assert first["neighbours"] == [str(train / "im_001.png"), str(train / "im_000.png")]
    assert data["figure_rows"] == [str(fake / "im_002.png"), str(fake / "im_000.png"), str(fake / "im_001.png")]
    figure = load_image(tmp_path / "out" / R.FIGURE_FILE)
    assert figure.shape == (3 * 18 + 2, 3 * 18 + 2, 3)  # 3 rows of sample + 2 neighbours, 16 px tiles, padding 2
    # row 0: sample 100 (fake im_002) then training 100 (im_004) and 70 (im_003)
    assert [int(figure[2 + 8, 2 + c * 18 + 8, 0]) for c in range(3)] == [100, 100, 70]
    with pytest.raises(FileExistsError, match="nearest.json"):
        R.memorisation_report(train, fake, tmp_path / "out", progress=False)


def test_report_reads_training_features_from_statistics_file(tmp_path, sets, stub_network):
    train, fake = sets
    stats = tmp_path / "train.npz"
    F.cache_features(train, stats, extractor=_GreyLevelExtractor(), progress=False)
    from_file = R.memorisation_report(stats, fake, tmp_path / "a", k=2, quantile=0.5, progress=False)
    from_folder = R.memorisation_report(train, fake, tmp_path / "b", k=2, quantile=0.5, progress=False)
    assert from_file.summary() == from_folder.summary()
    np.testing.assert_array_equal(from_file.result.indices, from_folder.result.indices)
    assert from_file.train_sources == [str((train / f"im_{i:03d}.png").resolve()) for i in range(5)]


def test_cli_nearest_prints_summary_and_refuses_old_statistics(tmp_path, sets, stub_network, capsys):
    from mbldm.cli import main

    train, fake = sets
    out = tmp_path / "out"
    assert main(["nearest", "--train", str(train), "--fake", str(fake), "--out", str(out), "--quantile", "0.5",
                 "--k", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("near-copies: 50.0% of 4 samples (2) are closer to a training image than the 50% quantile of "
                        "training-vs-training distances (20.00; fresh draws: about 50%)")
    assert lines[1] == ("median nearest-neighbour distance: samples 10.50, training (leave-one-out) 20.00 "
                        "(5 training images)")
    assert (out / R.FIGURE_FILE).is_file() and (out / R.JSON_FILE).is_file()
    old = tmp_path / "old.npz"
    F.save_statistics(old, np.zeros(F.FEATURE_DIM), np.eye(F.FEATURE_DIM), 10)  # no features stored
    assert main(["nearest", "--train", str(old), "--fake", str(fake), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mbldm nearest: error: {old}: statistics file holds no Inception")
    assert not (tmp_path / "o2").exists()  # refused before any work


def test_report_checks_settings_before_work(tmp_path, sets, monkeypatch):
    def no_network(device=None):
        raise AssertionError("the network must not be loaded")

    monkeypatch.setattr(inception, "InceptionFeatures", no_network)
    train, fake = sets
    with pytest.raises(ValueError, match="k, rows and tile must be >= 1"):
        R.memorisation_report(train, fake, tmp_path / "out", k=0)
    with pytest.raises(ValueError, match="quantile"):
        R.memorisation_report(train, fake, tmp_path / "out", quantile=0.0)
    with pytest.raises(FileNotFoundError, match="missing"):
        R.memorisation_report(tmp_path / "missing", fake, tmp_path / "out")


def test_neighbour_figure_rejects_ragged_rows():
    im = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="neighbour_figure"):
        R.neighbour_figure([im, im], [[im], [im, im]])
