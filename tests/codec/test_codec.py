"""Tests of mbldm/codec/codec.py: fit / encode / decode / decode_soft / ordering / save / load.

One PQ-32-8-8 codec is fitted once per module on three McMaster images (Fig. 3b vs 3c needs a real codebook);
OPQ and RQ decoding is checked on codecs built from known random codebooks against faiss's own decode.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from mbldm.codec import Codec, color, patches
from mbldm.codec.codebooks import TrainedQuantizer
from mbldm.codec.codec import CodecConfig, _training_patches
from mbldm.codec.quantizers import Encoder
from mbldm.io.images import load_image

def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 22 on [0, 255]: 10 log10(255^2 / MSE)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def mcm(real_image) -> list[np.ndarray]:
    return [real_image(f"mcm/{i}.tif") for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def peppers(real_image) -> np.ndarray:
    return real_image("sipi/peppers.png")


@pytest.fixture(scope="module")
def codec(mcm) -> Codec:
    return Codec.fit(mcm, spec="PQ-32-8-8", max_patches=40_000, seed=0, progress=False)


@pytest.fixture(scope="module")
def z_peppers(codec, peppers) -> np.ndarray:
    return codec.encode(peppers)


@pytest.fixture(scope="module")
def saved(codec, tmp_path_factory) -> Path:
    return codec.save(tmp_path_factory.mktemp("codec") / "pq")


def _synthetic(method: str, seed: int = 0) -> Codec:
    """A codec with known random codebooks, s = 4: OPQ-16-8-8 (random orthogonal R) or RQ-16-8-8."""
    rng = np.random.default_rng(seed)
    spec = f"{method}-16-8-8"
    quantizers = []
    for m in (2, 1, 1):
        if method == "RQ":
            cbs = rng.normal(0, 60 / m, (m, 256, 16)).astype(np.float32) + np.float32(128 / m)
            quantizers.append(TrainedQuantizer("RQ", cbs))
        else:
            cbs = rng.normal(128, 60, (m, 256, 16 // m)).astype(np.float32)
            rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0].astype(np.float32)
            quantizers.append(TrainedQuantizer("OPQ", cbs, rotation))
    perms = [np.tile(np.arange(256), (tq.m, 1)) for tq in quantizers]
    return Codec(CodecConfig(spec=spec, patch_size=4, latent_channels=4, num_codewords=256), quantizers, perms)


def _faiss_reference_decode(codec: Codec, z: np.ndarray) -> np.ndarray:
    """(B, h, w, c) -> float RGB via faiss's own decode of each channel (``Encoder.faiss_decode``)."""
    b, h, w, _ = z.shape
    s, planes, j = codec.patch_size, [], 0
    for tq in codec.quantizers:
        codes = z[..., j:j + tq.m].reshape(-1, tq.m).astype(np.int64)
        vectors = Encoder(tq).faiss_decode(codes)  # (B*h*w, d)
        planes.append(patches.from_patches(vectors.reshape(b, h, w, s * s), s))
        j += tq.m
    return color.ycbcr_to_rgb(np.stack(planes, axis=-1))


# ------------------------------------------------------------------ fit
def test_fit_config_and_patch_counts(codec):
    assert repr(codec) == "Codec(PQ-32-8-8, s=8, c=6, K=256, ordering=pca-first-component-descending)"
    assert (codec.latent_channels, codec.num_codewords, codec.index_dtype) == (6, 256, np.uint8)
    assert [tq.codebooks.shape for tq in codec.quantizers] == [(4, 256, 16), (1, 256, 64), (1, 256, 64)]
    cfg = codec.config
    assert (cfg.latent_channels, cfg.num_codewords, cfg.index_dtype) == (6, 256, "uint8")
    # §4.1: all stride-1 patches of each image and of its vertical flip: 3 x 2 x (500-8+1)^2
    total = 3 * 2 * 493**2
    assert cfg.training["patches"]["Y"] == {"total_patches": total, "used_patches": 40_000}
    assert cfg.training["num_images"] == 3 and cfg.training["image_sizes"] == ["500x500"]


def test_flip_adds_the_patches_of_the_vertically_flipped_image(mcm):
    img = mcm[0][:20, :30]
    got = _training_patches([img], 1, 4, flip=True)
    cb = color.rgb_to_ycbcr(img)[..., 1]
    expected = np.concatenate([patches.stride1_patches(cb, 4), patches.stride1_patches(cb[::-1], 4)])
    assert got.shape == expected.shape == (2 * 17 * 27, 16)
    np.testing.assert_array_equal(got[np.lexsort(got.T)], expected[np.lexsort(expected.T)])
    assert _training_patches([img], 1, 4, flip=False).shape == (17 * 27, 16)


def test_fit_is_seeded(mcm):
    crop = [mcm[1][:64, :64]]
    a = Codec.fit(crop, spec="VQ-4-4-4", patch_size=4, max_patches=2000, seed=3, progress=False)
    b = Codec.fit(crop, spec="VQ-4-4-4", patch_size=4, max_patches=2000, seed=3, progress=False)
    c = Codec.fit(crop, spec="VQ-4-4-4", patch_size=4, max_patches=2000, seed=4, progress=False)
    np.testing.assert_array_equal(a.quantizers[0].codebooks, b.quantizers[0].codebooks)
    assert not np.array_equal(a.quantizers[0].codebooks, c.quantizers[0].codebooks)


def test_fit_too_few_patches_names_the_codebook():
    tiny = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)  # 9 patches (+ 9 flipped)
    with pytest.raises(ValueError) as info:
        Codec.fit([tiny], spec="PQ-32-8-8", progress=False)
    message = str(info.value)
    assert "Y codebook" in message and "K=256" in message and "got 18" in message


@pytest.mark.parametrize(
    ("images", "fragment"),
    [([], "no training images"), ([np.zeros((16, 16, 3), np.float32)], "uint8"),
     ([np.zeros((16, 16), np.uint8)], "uint8 (H, W, 3)")],
)
def test_fit_rejects_bad_images(images, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Codec.fit(images, spec="VQ-2-2-2", patch_size=2, progress=False)


# ------------------------------------------------------------------ ordering (Fig. 3b vs 3c)
def test_ordering_makes_index_noise_gentle(codec, z_peppers, peppers):
    """Fig. 3b/3c: decode z + 1 (clipped to K-1). With the PCA ordering the image survives; without it is noise."""
    unordered = codec.reordered(False)
    z_unordered = unordered.encode(peppers)
    shifted = np.minimum(z_peppers.astype(np.int64) + 1, 255)
    shifted_unordered = np.minimum(z_unordered.astype(np.int64) + 1, 255)
    psnr_clean = _psnr(codec.decode(z_peppers), peppers)
    psnr_ordered = _psnr(codec.decode(shifted), peppers)
    psnr_unordered = _psnr(unordered.decode(shifted_unordered), peppers)
    print(f"\npeppers PQ-32-8-8: clean {psnr_clean:.2f} dB, z+1 ordered {psnr_ordered:.2f} dB, "
          f"z+1 unordered {psnr_unordered:.2f} dB")
    assert psnr_clean > 24
    assert psnr_ordered - psnr_unordered > 4.0
    assert psnr_unordered < 12
    # the same effect measured on the codebooks (ordering.ordinality: ~1 for a random order)
    assert max(codec.ordinality()) < 0.6
    assert min(unordered.ordinality()) > 0.9


def test_reordering_only_relabels_codewords(codec, z_peppers, peppers):
    unordered = codec.reordered(False)
    assert unordered.config.ordering is None
    assert all((p == np.arange(256)).all() for perm in unordered.permutations for p in perm)
    # ordered[k] = unordered[perm[k]]: relabelled codes decode to exactly the same image
    relabelled = np.empty_like(z_peppers)
    j = 0
    for perm in codec.permutations:
        for p in perm:
            relabelled[..., j] = p[z_peppers[..., j]]
            j += 1
    np.testing.assert_array_equal(unordered.decode(relabelled), codec.decode(z_peppers))
    # and reordering back gives the very same tables
    again = unordered.reordered(True)
    for a, b in zip(again.quantizers, codec.quantizers):
        np.testing.assert_array_equal(a.codebooks, b.codebooks)
    # encoding with either labelling picks the same codewords, up to faiss's float32 near-ties
    # (faiss ranks by ||x||^2 + ||c||^2 - 2<x,c>; with raw [0, 255] patches near-ties can flip)
    z_unordered = unordered.encode(peppers)
    same = z_unordered == relabelled
    assert same.mean() > 0.999
    assert abs(_psnr(unordered.decode(z_unordered), peppers) - _psnr(codec.decode(z_peppers), peppers)) < 0.01


# ------------------------------------------------------------------ encode
def test_encode_shape_dtype_and_batch(codec, z_peppers, peppers):
    assert z_peppers.shape == (64, 64, 6) and z_peppers.dtype == np.uint8
    crop = peppers[100:164, 200:264]
    batch = codec.encode(np.stack([peppers[:64, :64], crop]))
    assert batch.shape == (2, 8, 8, 6) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1], codec.encode(crop))
    np.testing.assert_array_equal(batch[0], z_peppers[:8, :8])  # patches are encoded independently


def test_encode_chooses_the_nearest_codewords(codec, z_peppers, peppers):
    """Eq. 13: each sub-vector gets its nearest sub-codeword (brute force in float64 as the reference)."""
    ycc = color.rgb_to_ycbcr(peppers)
    j = 0
    for ch, tq in enumerate(codec.quantizers):
        vectors = patches.to_patches(ycc[None, ..., ch], 8)[0].reshape(-1, 64).astype(np.float64)  # (h*w, d)
        dsub = tq.codebooks.shape[2]
        for m in range(tq.m):
            sub = vectors[:, m * dsub:(m + 1) * dsub]
            d2 = ((sub[:, None] - tq.codebooks[m][None].astype(np.float64)) ** 2).sum(-1)  # (h*w, K)
            chosen = d2[np.arange(len(sub)), z_peppers[..., j].ravel()]
            # faiss ranks by ||x||^2 + ||c||^2 - 2<x,c> in float32: a handful of near-ties may flip
            assert (chosen == d2.min(1)).mean() > 0.999
            np.testing.assert_allclose(chosen, d2.min(1), rtol=1e-4, atol=1.0)  # |x|^2 ~ 1e6: float32 ulp ~0.1
            j += 1


def test_odd_sizes_are_padded_and_cropped(codec, peppers):
    img = peppers[5:42, 11:64]  # 37 x 53
    z = codec.encode(img)
    assert z.shape == (5, 7, 6)
    padded = np.pad(img, ((0, 3), (0, 3), (0, 0)), mode="edge")  # edge replication to 40 x 56
    np.testing.assert_array_equal(z, codec.encode(padded))
    out = codec.decode(z, size=(37, 53))
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, codec.decode(z)[:37, :53])
    assert _psnr(out, img) > 20


def test_encode_rejects_non_uint8(codec):
    with pytest.raises(ValueError, match="uint8 RGB"):
        codec.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        codec.encode(np.zeros((8, 8, 4), np.uint8))


@pytest.fixture(scope="module")
def big_k(mcm) -> Codec:
    return Codec.fit([mcm[2][:160, :160]], spec="VQ-10-4-4", patch_size=4, max_patches=20_000, progress=False)


def test_more_than_256_codewords_use_uint16(big_k, mcm):
    assert big_k.num_codewords == 1024 and big_k.index_dtype == np.uint16
    assert big_k.config.index_dtype == "uint16"
    img = mcm[2][160:240, 160:240]
    z = big_k.encode(img)
    assert z.dtype == np.uint16 and z.shape == (20, 20, 3)
    assert z[..., 0].max() > 255  # really uses the upper codewords
    assert z[..., 1:].max() < 16
    assert _psnr(big_k.decode(z), img) > 22
    with pytest.raises(ValueError, match="same K"):  # Eq. 21 needs one K for all codebooks
        big_k.decode_soft(torch.zeros(1, 3, 1024, 2, 2))


# ------------------------------------------------------------------ decode
def test_decode_float_equals_faiss_decode(codec, z_peppers):
    z = z_peppers[None, 10:20, 30:45]
    np.testing.assert_allclose(codec.decode_float(z), _faiss_reference_decode(codec, z), atol=1e-3)


@pytest.mark.parametrize("method", ["OPQ", "RQ"])
def test_synthetic_opq_rq_decode_equals_faiss_decode(method):
    codec = _synthetic(method)
    assert codec.latent_channels == 4
    z = np.random.default_rng(1).integers(0, 256, (2, 3, 5, 4))
    np.testing.assert_allclose(codec.decode_float(z), _faiss_reference_decode(codec, z), atol=2e-3)
    expected = np.clip(np.rint(codec.decode_float(z)), 0, 255)
    assert np.abs(codec.decode(z).astype(np.float64) - expected).max() <= 1


def test_decode_lookup_equals_rounded_float(codec, z_peppers):
    hard = codec.decode(z_peppers)
    assert hard.shape == (512, 512, 3) and hard.dtype == np.uint8
    reference = np.clip(np.rint(codec.decode_float(z_peppers[None])[0]), 0, 255)
    diff = np.abs(hard.astype(np.float64) - reference)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_decode_torch_equals_decode_float(codec, z_peppers):
    z = z_peppers[None, :16, :24]
    out = codec.decode_torch(torch.from_numpy(z.astype(np.int64)).permute(0, 3, 1, 2))
    assert out.shape == (1, 3, 128, 192) and out.dtype == torch.float32
    expected = np.clip(codec.decode_float(z), 0, 255).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-3)
    with pytest.raises(ValueError, match="decode_torch expects"):
        codec.decode_torch(torch.zeros(1, 5, 2, 2, dtype=torch.long))


def test_decode_soft_one_hot_equals_hard_decode_and_has_gradients(codec, z_peppers):
    z = torch.from_numpy(z_peppers[None, 20:28, 20:30].astype(np.int64)).permute(0, 3, 1, 2)  # (1, 6, 8, 10)
    weights = torch.nn.functional.one_hot(z, 256).permute(0, 1, 4, 2, 3).float().requires_grad_(True)
    out = codec.decode_soft(weights)  # (1, 3, 64, 80)
    assert out.shape == (1, 3, 64, 80)
    expected = np.clip(codec.decode_float(z_peppers[None, 20:28, 20:30]), 0, 255).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-3)
    out.mean().backward()
    assert weights.grad.shape == weights.shape
    assert weights.grad.abs().sum() > 0
    assert torch.isfinite(weights.grad).all()


def test_decode_soft_is_linear_in_the_weights(codec):
    """Eq. 21: a 50/50 mixture of two codes decodes to the mean of their decodes (away from clipping)."""
    z1 = np.full((1, 1, 1, 6), 100)
    z2 = np.full((1, 1, 1, 6), 140)
    w = torch.zeros(1, 6, 256, 1, 1)
    w[:, :, 100] = 0.5
    w[:, :, 140] = 0.5
    mean = (codec.decode_float(z1) + codec.decode_float(z2)) / 2
    assert 0 < mean.min() and mean.max() < 255
    np.testing.assert_allclose(codec.decode_soft(w)[0].permute(1, 2, 0).numpy(), mean[0], atol=1e-3)


@pytest.mark.parametrize("shape", [(1, 6, 256, 4), (1, 5, 256, 2, 2), (1, 6, 255, 2, 2)])
def test_decode_soft_rejects_wrong_shapes(codec, shape):
    with pytest.raises(ValueError, match=r"decode_soft expects \(B, 6, 256, h, w\)"):
        codec.decode_soft(torch.zeros(shape))


def test_decode_rejects_bad_latents(codec):
    with pytest.raises(ValueError, match="expects 6"):
        codec.decode(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        codec.decode(np.full((4, 4, 6), 256, np.int64))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        codec.decode_float(np.full((1, 4, 4, 6), -1, np.int64))
    with pytest.raises(ValueError, match=re.escape("got shape (6,)")):  # (message speaks of images; see report)
        codec.decode(np.zeros((6,), np.uint8))


def test_decode_does_not_import_faiss(saved, z_peppers, tmp_path):
    np.save(tmp_path / "z.npy", z_peppers)
    script = (
        "import sys, numpy as np\n"
        "from mbldm.codec import Codec\n"
        f"c = Codec.load({str(saved)!r})\n"
        f"img = c.decode(np.load({str(tmp_path / 'z.npy')!r}))\n"
        "assert img.shape == (512, 512, 3), img.shape\n"
        "assert 'faiss' not in sys.modules, 'decode imported faiss'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(codec, saved, z_peppers, peppers):
    assert sorted(p.name for p in saved.iterdir()) == ["codebooks.safetensors", "config.json"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "mbldm-codec" and config["spec"] == "PQ-32-8-8" and config["latent_channels"] == 6
    loaded = Codec.load(saved)
    assert loaded.config == codec.config
    for a, b in zip(loaded.quantizers, codec.quantizers):
        np.testing.assert_array_equal(a.codebooks, b.codebooks)
    for a, b in zip(loaded.permutations, codec.permutations):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.encode(peppers), z_peppers)
    np.testing.assert_array_equal(loaded.decode(z_peppers), codec.decode(z_peppers))


def test_save_load_opq_keeps_the_rotation(tmp_path):
    codec = _synthetic("OPQ")
    loaded = Codec.load(codec.save(tmp_path / "opq"))
    for a, b in zip(loaded.quantizers, codec.quantizers):
        np.testing.assert_array_equal(a.rotation, b.rotation)
    z = np.random.default_rng(3).integers(0, 256, (1, 2, 2, 4))
    np.testing.assert_array_equal(loaded.decode_float(z), codec.decode_float(z))


def test_save_refuses_to_overwrite(codec, saved):
    before = (saved / "codebooks.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        codec.save(saved)
    assert (saved / "codebooks.safetensors").read_bytes() == before
    codec.save(saved, overwrite=True)
    assert Codec.load(saved).config == codec.config


def _rewrite_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _replace_array(directory: Path, name: str, value: np.ndarray) -> None:
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(directory / "codebooks.safetensors"))
    arrays[name] = value
    save_file(arrays, str(directory / "codebooks.safetensors"))


DAMAGES = {
    "missing config": (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json"),
    "missing arrays": (lambda d: (d / "codebooks.safetensors").unlink(), FileNotFoundError,
                       "codebooks.safetensors"),
    "wrong format": (lambda d: _rewrite_config(d, format="something-else"), ValueError, "config.json"),
    "invalid json": (lambda d: (d / "config.json").write_text("{not json"), ValueError, "not valid JSON"),
    "json list": (lambda d: (d / "config.json").write_text("[1, 2]"), ValueError, "not an mbldm codec config"),
    "version": (lambda d: _rewrite_config(d, version=99), ValueError, "version 99"),
    "bad spec": (lambda d: _rewrite_config(d, spec="XQ-1-2-3"), ValueError, "invalid codec config"),
    "truncated arrays": (lambda d: (d / "codebooks.safetensors").write_bytes(
        (d / "codebooks.safetensors").read_bytes()[:1000]), ValueError, "codebooks.safetensors"),
    "garbage arrays": (lambda d: (d / "codebooks.safetensors").write_bytes(b"\x00garbage" * 100), ValueError,
                       "codebooks.safetensors"),
    "wrong shape": (lambda d: _replace_array(d, "Y.codebooks", np.zeros((4, 128, 16), np.float32)), ValueError,
                    "Y.codebooks has shape (4, 128, 16), expected (4, 256, 16)"),
    "missing array": (lambda d: _replace_array(d, "Cr.permutation", np.zeros((2, 256), np.int64)), ValueError,
                      "Cr.permutation has shape (2, 256), expected (1, 256)"),
    "nan": (lambda d: _replace_array(d, "Cb.codebooks", np.full((1, 256, 64), np.nan, np.float32)), ValueError,
            "non-finite"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_artifacts_are_rejected(saved, tmp_path, damage):
    apply, error, fragment = DAMAGES[damage]
    directory = shutil.copytree(saved, tmp_path / "damaged")
    apply(directory)
    with pytest.raises(error) as info:
        Codec.load(directory)
    message = str(info.value)
    assert fragment in message
    assert str(directory) in message  # names the file or folder


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="codec directory not found"):
        Codec.load(tmp_path / "nowhere")


def test_load_opq_without_rotation(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _synthetic("OPQ").save(tmp_path / "opq")
    arrays = load_file(str(directory / "codebooks.safetensors"))
    del arrays["Cb.rotation"]
    save_file(arrays, str(directory / "codebooks.safetensors"))
    with pytest.raises(ValueError, match=r"Cb.rotation has shape None, expected \(16, 16\)"):
        Codec.load(directory)
