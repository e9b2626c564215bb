"""Tests of mbldm/data/datasets.py: resize + centre crop geometry, image folders, LSUN-style LMDB with workers."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mbldm.data import datasets
from mbldm.data.datasets import (
    ImageFolderDataset,
    LMDBImageDataset,
    collate_images,
    open_image_dataset,
    resize_center_crop,
)

FACES = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
             or Path(__file__).resolve().parents[2].parent / "shared" / "data") / "faces"


# ------------------------------------------------------------------------------------------- resize_center_crop

def _ramp_image(H: int, W: int, step: float, axis: int) -> np.ndarray:
    """uint8 (H, W, 3): channel 0 = step * column index (axis=1) or step * row index (axis=0); others 100."""
    img = np.full((H, W, 3), 100, np.uint8)
    idx = np.arange(W if axis == 1 else H) * step
    img[..., 0] = idx[None, :] if axis == 1 else idx[:, None]
    return img


def test_crop_only_when_short_side_equals_resolution():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 37, 3), dtype=np.uint8)  # excess 5 -> left offset 5 // 2 = 2
    np.testing.assert_array_equal(resize_center_crop(wide, 32), wide[:, 2:34])
    tall = rng.integers(0, 256, (35, 32, 3), dtype=np.uint8)  # excess 3 -> top offset 1
    np.testing.assert_array_equal(resize_center_crop(tall, 32), tall[1:33])
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(square, 32), square)


def test_downscale_geometry_on_a_linear_ramp():
    # Bicubic (a symmetric, normalised kernel) reproduces a linear ramp exactly away from the borders, so the
    # output pins down the scale and the crop offset. Input 40 x 100, value 2*i at column i; R = 20 -> resize to
    # 20 x 50 (scale 2), crop columns [15, 35). Output column j samples input coordinate (j + 15 + 0.5) * 2 - 0.5
    # = 2j + 30.5, i.e. the value 4j + 61.
    out = resize_center_crop(_ramp_image(40, 100, 2, axis=1), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    expected = 4 * np.arange(20) + 61
    assert np.abs(out[..., 0].astype(int) - expected[None, :]).max() <= 1
    assert (out[..., 1:] == 100).all()
    # the same along rows for a tall image
    out = resize_center_crop(_ramp_image(100, 40, 2, axis=0), 20)
    assert np.abs(out[..., 0].astype(int) - expected[:, None]).max() <= 1


def test_upscale_geometry_on_a_linear_ramp():
    # LSUN at the paper's 512 is an upscale. Input 16 x 24, value 10*i at column i; R = 32 -> resize to 32 x 48
    # (scale 0.5), crop columns [8, 40). Output column j samples (j + 8 + 0.5) * 0.5 - 0.5 = 0.5j + 3.75 -> value
    # 5j + 37.5.
    out = resize_center_crop(_ramp_image(16, 24, 10, axis=1), 32)
    assert out.shape == (32, 32, 3)
    expected = 5 * np.arange(32) + 37.5
    assert np.abs(out[..., 0] - expected[None, :]).max() <= 1.0
    const = np.full((20, 30, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_center_crop(const, 64), np.full((64, 64, 3), 77, np.uint8))


def test_resize_center_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((8, 8), np.uint8), 8)
    with pytest.raises(ValueError, match="resolution"):
        resize_center_crop(np.zeros((8, 8, 3), np.uint8), 0)


# ------------------------------------------------------------------------------------------------ image folder

def test_image_folder_is_recursive_sorted_and_preprocessed(tmp_path):
    rng = np.random.default_rng(1)
    images = {"b.png": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
              "a/c.png": rng.integers(0, 256, (40, 16, 3), dtype=np.uint8),
              "a/b/d.png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)}
    for rel, img in images.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_image_dataset(tmp_path, 16)
    assert isinstance(ds, ImageFolderDataset)
    assert len(ds) == 3
    got = dict(ds[i][::-1] for i in range(len(ds)))
    assert sorted(got) == sorted(images)
    for rel, img in images.items():
        np.testing.assert_array_equal(got[rel], resize_center_crop(img, 16))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        open_image_dataset(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        open_image_dataset(tmp_path / "empty", 16)


# -------------------------------------------------------------------------------------------------------- LMDB

def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _lmdb_items() -> dict[bytes, tuple[bytes, np.ndarray]]:
    """12 entries key -> (encoded bytes, decoded uint8 RGB), JPEG/PNG/WebP like LSUN exports (real faces)."""
    if FACES.is_dir():
        files = sorted(FACES.glob("face_*.jpg"))[:12]
        raw = [(f.read_bytes(), np.asarray(Image.open(f).convert("RGB"))) for f in files]
    else:  # synthetic fallback (lossless PNG)
        rng = np.random.default_rng(2)
        arrays = [rng.integers(0, 256, (48, 40 + i, 3), dtype=np.uint8) for i in range(12)]
        raw = [(_encode(a, "PNG"), a) for a in arrays]
    assert len(raw) == 12
    items = {}
    for i, (data, img) in enumerate(raw):
        if i == 10:
            data = _encode(img, "PNG")
        elif i == 11:
            data = _encode(img, "WEBP", lossless=True)
        items[f"img_{(7 * i) % 12:02d}".encode()] = (data, img)  # keys not in insertion order
    return items


def _write_lmdb(path: Path, items: dict[bytes, tuple[bytes, np.ndarray]], subdir: bool = True) -> None:
    env = lmdb.open(str(path), map_size=1 << 27, subdir=subdir)
    with env.begin(write=True) as txn:
        for key, (data, _) in items.items():
            txn.put(key, data)
    env.close()


@pytest.fixture(scope="module")
def lmdb_data(tmp_path_factory):
    items = _lmdb_items()
    path = tmp_path_factory.mktemp("lsun") / "church_train_lmdb"
    _write_lmdb(path, items)
    return path, items


def test_lmdb_dataset_items_and_laziness(lmdb_data):
    path, items = lmdb_data
    ds = open_image_dataset(path, 32)
    assert isinstance(ds, LMDBImageDataset)
    assert len(ds) == 12 and not datasets._ENVS  # keys listed with a short-lived env; none kept
    assert [ds.source(i) for i in range(12)] == sorted(k.decode() for k in items)  # LMDB byte order
    for i in range(12):
        img, src = ds[i]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, resize_center_crop(items[src.encode()][1], 32))
    assert len(datasets._ENVS) == 1  # opened lazily, once for this process
    clone = pickle.loads(pickle.dumps(ds))  # an lmdb Environment cannot be pickled: it is not on the dataset
    assert len(clone) == 12
    np.testing.assert_array_equal(clone[3][0], ds[3][0])  # py-lmdb refuses a 2nd open: the env is shared
    assert len(datasets._ENVS) == 1


# spawn workers re-import torch (~10-30 s on a loaded 2-core machine): opt in with MBLDM_SLOW_TESTS=1. What spawn
# needs -- a picklable dataset without the environment, opened lazily in the new process -- is also checked
# in-process by test_lmdb_dataset_items_and_laziness.
SPAWN = pytest.param("spawn", marks=pytest.mark.skipif(
    not os.environ.get("MBLDM_SLOW_TESTS"), reason="spawn start method is slow; set MBLDM_SLOW_TESTS=1"))


@pytest.mark.parametrize("context", ["fork", SPAWN])
def test_lmdb_dataloader_two_workers(lmdb_data, context):
    path, items = lmdb_data
    ds = LMDBImageDataset(path, 24)
    ds[0]  # open the env in the parent first: fork workers must not reuse it, spawn must not pickle it
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=context,
                        collate_fn=collate_images)
    seen = []
    for images, sources in loader:
        assert images.shape == (len(sources), 24, 24, 3) and images.dtype == np.uint8
        for img, src in zip(images, sources):
            np.testing.assert_array_equal(img, resize_center_crop(items[src.encode()][1], 24))
        seen.extend(sources)
    assert sorted(seen) == sorted(k.decode() for k in items) and len(seen) == 12  # each item exactly once


def test_lmdb_single_mdb_file_and_bad_value(tmp_path):
    items = {b"good": (_encode(np.full((10, 12, 3), 9, np.uint8), "PNG"), None), b"bad": (b"not an image", None)}
    path = tmp_path / "one.mdb"
    _write_lmdb(path, items, subdir=False)
    ds = open_image_dataset(path, 8)
    assert isinstance(ds, LMDBImageDataset) and len(ds) == 2
    img, src = ds[1]  # byte order: b"bad" < b"good"
    assert src == "good"
    np.testing.assert_array_equal(img, np.full((8, 8, 3), 9, np.uint8))
    with pytest.raises(ValueError, match=r"one\.mdb\[bad\]: not an image"):
        ds[0]


def test_lmdb_rejects_non_lmdb(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not an LMDB"):
        LMDBImageDataset(f, 8)


def test_mirrored_dataset_appends_flipped_images_with_marked_sources():
    from mbldm.data.datasets import MirroredDataset

    class Two:
        def __len__(self):
            return 2

        def source(self, i):
            return f"img{i}.png"

        def __getitem__(self, i):
            img = np.zeros((2, 3, 3), np.uint8)
            img[:, 0] = 10 * (i + 1)  # the left column marks the image
            return img, self.source(i)

    m = MirroredDataset(Two())
    assert len(m) == 4 and [m.source(i) for i in range(4)] == ["img0.png", "img1.png", "img0.png#hflip",
                                                                 "img1.png#hflip"]
    img, src = m[3]
    assert src == "img1.png#hflip" and img[0, 2, 0] == 20 and img[0, 0, 0] == 0  # the column moved right
