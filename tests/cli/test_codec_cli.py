"""Tests of mbldm/cli/codec.py: ``mbldm codec fit|encode|decode`` run in-process through ``mbldm.cli.main``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbldm.cli import main
from mbldm.codec import Codec
from mbldm.io.images import load_image

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, real_image) -> Path:
    """train/{a,b}.png: two small crops of real photographs; odd.png: a 37 x 53 crop to encode."""
    root = tmp_path_factory.mktemp("cli")
    lena, baboon = real_image("sipi/lena.png"), real_image("sipi/baboon.png")
    (root / "train").mkdir()
    Image.fromarray(lena[200:248, 200:248]).save(root / "train" / "a.png")
    Image.fromarray(baboon[0:40, 0:56]).save(root / "train" / "b.png")
    Image.fromarray(lena[260:297, 180:233]).save(root / "odd.png")
    return root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mbldm codec: error: ")
    return err


def test_fit_encode_decode(workspace, capsys):
    codec_dir, latents, decoded = workspace / "codec", workspace / "latents", workspace / "decoded"
    rc = main(["codec", "fit", "--spec", "VQ-4-4-4", "--patch-size", "4", "--images", str(workspace / "train"),
               "--out", str(codec_dir), "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"wrote {codec_dir}" in out and "VQ-4-4-4" in out
    codec = Codec.load(codec_dir)
    assert codec.config.training["sources"] == ["a.png", "b.png"] and codec.config.training["seed"] == 1
    assert codec.config.training["vertical_flip"] is True

    assert main(["codec", "encode", "--codec", str(codec_dir), "--out", str(latents),
                 str(workspace / "odd.png")]) == 0
    assert "encoded 1 image(s)" in capsys.readouterr().out
    z = np.load(latents / "odd.npy")
    assert z.shape == (10, 14, 3) and z.dtype == np.uint8
    assert json.loads((latents / "odd.json").read_text())["size"] == [37, 53]

    assert main(["codec", "decode", "--codec", str(codec_dir), "--out", str(decoded), str(latents)]) == 0
    assert "decoded 1 latent(s)" in capsys.readouterr().out
    with Image.open(decoded / "odd.png") as im:
        assert im.size == (53, 37) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), codec.decode(z, size=(37, 53)))


def test_fit_no_flip_and_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["codec", "fit", "--spec", "VQ-2-2-2", "--patch-size", "4", "--images", str(workspace / "train"),
            "--out", str(out), "--no-flip"]
    assert main(args) == 0
    assert Codec.load(out).config.training["vertical_flip"] is False
    capsys.readouterr()
    assert main(args) == 2  # refuses to overwrite
    assert "overwrite" in _one_error_line(capsys)
    assert main(args + ["--overwrite"]) == 0


def test_missing_codec_dir(workspace, tmp_path, capsys):
    rc = main(["codec", "encode", "--codec", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               str(workspace / "odd.png")])
    assert rc == 2
    err = _one_error_line(capsys)
    assert str(tmp_path / "nope") in err and "not found" in err


def test_latent_with_wrong_channels(workspace, tmp_path, capsys):
    codec_dir = tmp_path / "c"
    assert main(["codec", "fit", "--spec", "VQ-2-2-2", "--patch-size", "4", "--images",
                 str(workspace / "train"), "--out", str(codec_dir)]) == 0
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 4, 6), np.uint8))
    capsys.readouterr()
    assert main(["codec", "decode", "--codec", str(codec_dir), "--out", str(tmp_path / "o"), str(bad)]) == 2
    err = _one_error_line(capsys)
    assert str(bad) in err and "6 channels" in err


def test_bad_spec(workspace, tmp_path, capsys):
    rc = main(["codec", "fit", "--spec", "VQ-20-8-8", "--images", str(workspace / "train"),
               "--out", str(tmp_path / "c")])
    assert rc == 2
    assert "valid specs look like" in _one_error_line(capsys)


def test_missing_images_folder(tmp_path, capsys):
    rc = main(["codec", "fit", "--spec", "VQ-2-2-2", "--images", str(tmp_path / "none"),
               "--out", str(tmp_path / "c")])
    assert rc == 2
    assert str(tmp_path / "none") in _one_error_line(capsys)
