"""Tests of mbldm/data/latent_store.py and `mbldm latents`: contents, resume, sharding, validation, reader."""
from __future__ import annotations

import os
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from mbldm.cli import main
from mbldm.data import latent_store as ls
from mbldm.data.datasets import resize_center_crop
from mbldm.data.latent_store import LatentDataset, LatentStore, build_latent_store, read_store_config

FACES = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
             or Path(__file__).resolve().parents[2].parent / "shared" / "data") / "faces"
R = 32  # patch size 4 -> latents 8 x 8 x 3 (VQ-4-4-4: K = 16, uint8)
N = 10


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (leftover temporaries would show up too)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(codec_dir, data_dir, {relative path: expected latent (8, 8, 3)}): a tiny real codec and 10 real faces."""
    if not FACES.is_dir():
        pytest.skip(f"real face images not found at {FACES} (see MBLDM_TEST_DATA in README)")
    from mbldm.codec import Codec

    root = tmp_path_factory.mktemp("store_setup")
    files = sorted(FACES.glob("face_*.jpg"))[:N]
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    names = []
    for i, f in enumerate(files):  # a nested folder: the dataset is recursive
        rel = f"sub/{f.name}" if i % 3 == 0 else f.name
        shutil.copyfile(f, data / rel)
        names.append(rel)
    arrays = {rel: np.asarray(Image.open(data / rel).convert("RGB")) for rel in names}
    codec = Codec.fit([arrays[names[0]], arrays[names[1]]], spec="VQ-4-4-4", patch_size=4, max_patches=5000,
                      progress=False)
    codec_dir = codec.save(root / "codec")
    # expected latents, independently: each image alone through Pillow, resize + crop, codec.encode
    expected = {rel: codec.encode(resize_center_crop(arrays[rel], R)) for rel in names}
    return codec_dir, data, expected


def _build(setup, out, **kw):
    codec_dir, data, _ = setup
    kw = {"shard_size": 4, "batch_size": 3, "progress": False, **kw}
    return build_latent_store(codec_dir, data, R, out, **kw)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted single-process build."""
    return _build(setup, tmp_path_factory.mktemp("ref") / "store")


def test_store_contents(setup, reference):
    codec_dir, data, expected = setup
    cfg = json.loads((reference / "store.json").read_text())
    assert {k: cfg[k] for k in ("format", "version", "resolution", "latent_shape", "dtype", "num_codewords",
                                "spec", "count", "shard_size", "num_shards", "complete", "data")} == {
        "format": "mbldm-latent-store", "version": 1, "resolution": R, "latent_shape": [8, 8, 3],
        "dtype": "uint8", "num_codewords": 16, "spec": "VQ-4-4-4", "count": N, "shard_size": 4,
        "num_shards": 3, "complete": True, "data": str(data.resolve())}
    shapes = [np.load(ls.shard_path(reference, k)).shape for k in range(3)]
    assert shapes == [(4, 8, 8, 3), (4, 8, 8, 3), (2, 8, 8, 3)]
    assert _tree_digest(reference / "codec") == _tree_digest(codec_dir)  # byte-for-byte copy
    rows = [json.loads(line) for line in (reference / "sources.jsonl").read_text().splitlines()]
    order = [row["source"] for row in rows]
    assert rows == [{"index": i, "source": rel} for i, rel in enumerate(order)]
    assert sorted(order) == sorted(expected) and order == sorted(order, key=lambda rel: Path(rel).parts)
    expected = np.stack([expected[rel] for rel in order])  # (N, 8, 8, 3) in store order

    store = LatentStore(reference)
    assert len(store) == N and store.latent_shape == (8, 8, 3) and store.num_codewords == 16
    assert store.codec_dir == reference / "codec" and store.sources == order
    np.testing.assert_array_equal(store.batch(range(N)), expected)
    np.testing.assert_array_equal(store[9], expected[9])
    np.testing.assert_array_equal(store[-1], expected[9])
    np.testing.assert_array_equal(store.batch([7, 0, 7]), expected[[7, 0, 7]])
    assert isinstance(store.shard(0), np.memmap)
    with pytest.raises(IndexError):
        store[N]
    clone = pickle.loads(pickle.dumps(store))  # the memmaps are not carried
    assert clone._shards == [None] * 3
    np.testing.assert_array_equal(clone[5], expected[5])
    z = LatentDataset(reference)[4]
    assert z.dtype == torch.int64 and z.shape == (3, 8, 8)
    np.testing.assert_array_equal(z.numpy(), expected[4].transpose(2, 0, 1))


def test_resume_after_interruption_equals_uninterrupted(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"
    real_write = ls._write_shard
    calls = []

    def write_then_die(path, latents):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(path.name)
        real_write(path, latents)

    monkeypatch.setattr(ls, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, out)
    assert calls == ["shard_00000.npy"] and not read_store_config(out)["complete"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00000.npy"]
    with pytest.raises(ValueError, match="incomplete"):
        LatentStore(out)
    before = (out / "shards" / "shard_00000.npy").stat().st_mtime_ns

    written = []
    monkeypatch.setattr(ls, "_write_shard", lambda path, z: (written.append(path.name), real_write(path, z)))
    _build(setup, out, batch_size=2)  # batch size is not part of the store: any value resumes
    assert written == ["shard_00001.npy", "shard_00002.npy"]  # shard 0 skipped
    assert (out / "shards" / "shard_00000.npy").stat().st_mtime_ns == before
    assert _tree_digest(out) == _tree_digest(reference)  # byte for byte, incl. store.json


def test_two_processes_equal_one(setup, reference, tmp_path):
    out = tmp_path / "store"
    _build(setup, out, process_index=1, num_processes=2)  # shard 1 only
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00001.npy"]
    assert not read_store_config(out)["complete"]
    _build(setup, out, process_index=0, num_processes=2)  # shards 0 and 2; the last one marks complete
    assert _tree_digest(out) == _tree_digest(reference)


def test_resume_refusals_and_overwrite(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"
    _build(setup, out, process_index=0, num_processes=3)  # an unfinished store
    with pytest.raises(ValueError, match=r"store\.json.*different arguments.*shard_size"):
        _build(setup, out, shard_size=5)
    with pytest.raises(FileExistsError, match="complete latent store"):
        _build(setup, reference)
    _build(setup, out, overwrite=True)  # starts over
    assert _tree_digest(out) == _tree_digest(reference)
    with pytest.raises(ValueError, match="num_processes"):
        _build(setup, out, overwrite=True, process_index=0, num_processes=2)


def test_build_validation(setup, tmp_path):
    codec_dir, data, _ = setup
    with pytest.raises(ValueError, match="not divisible by the codec's patch size 4"):
        build_latent_store(codec_dir, data, 30, tmp_path / "a", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a latent store"):
        build_latent_store(codec_dir, data, R, tmp_path / "busy", progress=False)
    with pytest.raises(FileNotFoundError):
        build_latent_store(tmp_path / "no_codec", data, R, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        build_latent_store(codec_dir, data, R, tmp_path / "c", shard_size=0, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_build_from_lmdb_with_workers(setup, tmp_path):
    codec_dir, data, expected = setup
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for rel in expected:
            txn.put(Path(rel).stem.encode(), (data / rel).read_bytes())
    env.close()
    out = build_latent_store(codec_dir, tmp_path / "lmdb", R, tmp_path / "store", shard_size=4, batch_size=3,
                             num_workers=2, progress=False)
    store = LatentStore(out)
    by_key = {Path(rel).stem: z for rel, z in expected.items()}
    assert store.sources == sorted(by_key)
    np.testing.assert_array_equal(store.batch(range(N)), np.stack([by_key[k] for k in store.sources]))


def test_reader_rejects_foreign_and_damaged_stores(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="store.json"):
        LatentStore(tmp_path)
    (tmp_path / "store.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"store\.json.*not an mbldm latent store"):
        LatentStore(tmp_path)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"store\.json.*not valid JSON"):
        LatentStore(tmp_path)

    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    cfg = json.loads((bad / "store.json").read_text())
    (bad / "store.json").write_text(json.dumps({**cfg, "num_shards": 2}))
    with pytest.raises(ValueError, match=r"store\.json.*num_shards"):
        LatentStore(bad)
    (bad / "store.json").write_text(json.dumps(cfg))
    np.save(ls.shard_path(bad, 1), np.zeros((3, 8, 8, 3), np.uint8))  # wrong length
    store = LatentStore(bad)
    np.testing.assert_array_equal(store[0], LatentStore(reference)[0])
    with pytest.raises(ValueError, match=r"shard_00001\.npy.*\(3, 8, 8, 3\)"):
        store[4]


def test_cli_build_and_info(setup, reference, tmp_path, capsys):
    codec_dir, data, _ = setup
    out = tmp_path / "store"
    args = ["latents", "build", "--codec", str(codec_dir), "--data", str(data), "--resolution", str(R),
            "--out", str(out), "--shard-size", "4", "--batch-size", "3", "--quiet"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert f"{N} latents 8x8x3 uint8 (K=16, VQ-4-4-4)" in line and "complete" in line
    assert _tree_digest(out) == _tree_digest(reference)
    assert main(args) == 2  # complete store, no --overwrite: one-line error
    assert "complete latent store already exists" in capsys.readouterr().err
    assert main(["latents", "info", str(out)]) == 0
    assert capsys.readouterr().out.strip() == line


def test_hflip_store_holds_the_encoded_mirror_images(setup, tmp_path):
    """--hflip: entries N..2N-1 are codec.encode of the left-right mirrored images (not a flip of the latents)."""
    codec_dir, data, expected = setup
    from mbldm.codec import Codec

    codec = Codec.load(codec_dir)
    out = _build(setup, tmp_path / "flip", hflip=True)
    store = LatentStore(out)
    cfg = read_store_config(out)
    assert len(store) == 2 * N and cfg["hflip"] is True and cfg["count"] == 2 * N
    sources = store.sources
    assert sources[N:] == [s + "#hflip" for s in sources[:N]]
    for i in (0, 3, N - 1):
        rel = sources[i]
        assert np.array_equal(store[i], expected[rel])
        img = resize_center_crop(np.asarray(Image.open(data / rel).convert("RGB")), R)
        assert np.array_equal(store[N + i], codec.encode(np.ascontiguousarray(img[:, ::-1])))
    assert not np.array_equal(store[N], store[0][:, ::-1])  # mirroring changes the codewords, not just the order
    assert "and their mirrors" in ls.store_summary(out)
