"""Tests of mbldm/codec/files.py: fit a codec on a folder, encode files to .npy/.json, decode to PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbldm.codec import Codec, files
from mbldm.io.images import load_image

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, real_image) -> Path:
    """images/a.png (40 x 48), images/sub/b.png (32 x 36), odd/x.png (37 x 53): crops of real photographs."""
    root = tmp_path_factory.mktemp("files")
    baboon, peppers = real_image("sipi/baboon.png"), real_image("sipi/peppers.png")
    (root / "images" / "sub").mkdir(parents=True)
    (root / "odd").mkdir()
    Image.fromarray(baboon[100:140, 200:248]).save(root / "images" / "a.png")
    Image.fromarray(peppers[300:332, 100:136]).save(root / "images" / "sub" / "b.png")
    Image.fromarray(peppers[50:87, 250:303]).save(root / "odd" / "x.png")
    return root


@pytest.fixture(scope="module")
def codec_dir(workspace) -> Path:
    files.fit_from_folder(workspace / "images", "VQ-4-4-4", workspace / "codec", patch_size=4, progress=False)
    return workspace / "codec"


def test_fit_from_folder_records_sources_and_patches(codec_dir):
    codec = Codec.load(codec_dir)
    assert codec.spec.name == "VQ-4-4-4" and codec.patch_size == 4
    training = codec.config.training
    assert training["sources"] == ["a.png", "sub/b.png"]
    assert training["num_images"] == 2
    # stride-1 4 x 4 patches of both images, doubled by the vertical flip
    assert training["patches"]["Y"]["total_patches"] == 2 * (37 * 45 + 29 * 33)


def test_fit_refuses_to_overwrite_before_fitting(codec_dir, workspace, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran although the output exists")

    monkeypatch.setattr(files.Codec, "fit", no_fit)
    with pytest.raises(FileExistsError, match="overwrite"):
        files.fit_from_folder(workspace / "images", "VQ-4-4-4", codec_dir, patch_size=4, progress=False)


def test_fit_overwrite(workspace, tmp_path):
    out = tmp_path / "c"
    files.fit_from_folder(workspace / "images", "VQ-2-2-2", out, patch_size=4, progress=False)
    files.fit_from_folder(workspace / "images", "VQ-3-2-2", out, patch_size=4, progress=False, overwrite=True)
    assert Codec.load(out).spec.name == "VQ-3-2-2"


def test_encode_then_decode_restores_the_original_size(codec_dir, workspace, tmp_path):
    codec = Codec.load(codec_dir)
    written = files.encode_files(codec_dir, [workspace / "odd" / "x.png"], tmp_path / "latents")
    assert written == [tmp_path / "latents" / "x.npy"]
    z = np.load(written[0], allow_pickle=False)
    assert z.shape == (10, 14, 3) and z.dtype == np.uint8  # ceil(37/4) x ceil(53/4)
    img = load_image(workspace / "odd" / "x.png")
    np.testing.assert_array_equal(z, codec.encode(img))
    meta = json.loads((tmp_path / "latents" / "x.json").read_text())
    assert meta["size"] == [37, 53] and meta["spec"] == "VQ-4-4-4"
    assert meta["source"].endswith("x.png")

    pngs = files.decode_files(codec_dir, [tmp_path / "latents"], tmp_path / "decoded")
    assert pngs == [tmp_path / "decoded" / "x.png"]
    decoded = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert decoded.shape == (37, 53, 3)
    np.testing.assert_array_equal(decoded, codec.decode(z, size=(37, 53)))
    assert np.abs(decoded.astype(float) - img).mean() < 40  # a (coarse) picture of the input


def test_decode_without_metadata_keeps_the_padded_size(codec_dir, tmp_path):
    z = np.zeros((3, 5, 3), np.uint8)
    np.save(tmp_path / "plain.npy", z)
    (out,) = files.decode_files(codec_dir, [tmp_path / "plain.npy"], tmp_path / "dec")
    assert np.asarray(Image.open(out)).shape == (12, 20, 3)


def test_encode_refuses_to_overwrite(codec_dir, workspace, tmp_path):
    target = tmp_path / "x.npy"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="x.npy"):
        files.encode_files(codec_dir, [workspace / "odd" / "x.png"], tmp_path)
    assert target.read_bytes() == b"keep me"
    files.encode_files(codec_dir, [workspace / "odd" / "x.png"], tmp_path, overwrite=True)
    assert np.load(target).shape == (10, 14, 3)


def test_encode_rejects_clashing_names(codec_dir, workspace, tmp_path):
    (tmp_path / "other").mkdir()
    Image.open(workspace / "odd" / "x.png").save(tmp_path / "other" / "x.png")
    with pytest.raises(ValueError, match="share a file name"):
        files.encode_files(codec_dir, [workspace / "odd", tmp_path / "other"], tmp_path / "out")


def test_decode_refuses_to_overwrite_png(codec_dir, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "z.png").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        files.decode_files(codec_dir, [tmp_path / "z.npy"], tmp_path / "out")
    assert (tmp_path / "out" / "z.png").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (np.zeros((2, 2, 4), np.uint8), "expects 3"),  # wrong channel count for VQ-4-4-4
        (np.zeros((2, 2, 3), np.float32), "integer (h, w, c)"),
        (np.zeros((2, 3), np.uint8), "integer (h, w, c)"),
        (np.full((2, 2, 3), 16, np.uint8), "[0, 15]"),
        (b"not an npy file", "not a .npy index latent"),
    ],
)
def test_decode_rejects_bad_latents_naming_the_file(codec_dir, tmp_path, content, fragment):
    path = tmp_path / "bad.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(ValueError) as info:
        files.decode_files(codec_dir, [path], tmp_path / "out")
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert not (tmp_path / "out" / "bad.png").exists()


def test_decode_input_errors(codec_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy files found"):
        files.decode_files(codec_dir, [tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        files.decode_files(codec_dir, [tmp_path / "missing.npy"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="codec directory not found"):
        files.decode_files(tmp_path / "no_codec", [tmp_path / "missing.npy"], tmp_path / "out")
