"""Tests of mbldm/diffusion/refiner.py: torch SSIM vs scikit-image, index-space corruption, training, apply."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mbldm.codec import Codec
from mbldm.diffusion.models import build_unet
from mbldm.diffusion.refiner import (
    Refiner,
    RefinerConfig,
    corrupt_latents,
    degrade_images,
    gaussian_window,
    refine_files,
    ssim_torch,
    train_refiner,
)
from mbldm.eval.metrics import psnr
from mbldm.io.images import load_image, save_png


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on 2 shared cores


def _synthetic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(9 * xx + rng.uniform(0, 6)), np.cos(7 * yy + rng.uniform(0, 6)),
                     np.sin(5 * (xx + yy) + rng.uniform(0, 6))], -1)
    return np.clip(127.5 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five 40 x 48 synthetic RGB images in a folder, and a VQ-4-4-4 codec (s = 4, K = 16) fitted on them."""
    root = tmp_path_factory.mktemp("refiner_data")
    rng = np.random.default_rng(1)
    imgs = [_synthetic_image(rng, 40, 48) for _ in range(5)]
    for i, img in enumerate(imgs):
        save_png(root / "imgs" / f"im{i}.png", img)
    codec = Codec.fit(imgs, spec="VQ-4-4-4", patch_size=4, progress=False)
    codec.save(root / "codec")
    return root, codec


def _to_tensor(img: np.ndarray, scale: float) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float64) / scale).permute(2, 0, 1)[None]  # (1, 3, H, W)


def test_gaussian_window_taps():
    g = gaussian_window(11, 1.5, torch.float64)
    i = np.arange(-5, 6)
    ref = np.exp(-(i**2) / (2 * 1.5**2))
    np.testing.assert_allclose(g.numpy(), ref / ref.sum(), rtol=1e-12)
    with pytest.raises(ValueError):
        gaussian_window(10)


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_ssim_torch_matches_skimage(scale):
    rng = np.random.default_rng(2)
    a = _synthetic_image(rng, 37, 45)
    pairs = [
        (a, np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)),  # noisy copy
        (a, np.roll(a, 2, axis=1)),  # shifted copy
        (a, _synthetic_image(rng, 37, 45)),  # unrelated image
        (a, a),  # identical: SSIM 1
    ]
    for x, y in pairs:
        ref = structural_similarity(x.astype(np.float64) / scale, y.astype(np.float64) / scale, channel_axis=-1,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255.0 / scale)
        got = ssim_torch(_to_tensor(x, scale).float(), _to_tensor(y, scale).float(), data_range=255.0 / scale)
        assert got.shape == (1,)
        assert abs(float(got) - ref) < 1e-3, (float(got), ref)
    with pytest.raises(ValueError, match="smaller than"):
        ssim_torch(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_corrupt_latents_noise_statistics():
    rng = np.random.default_rng(3)
    z = np.full((4, 50, 50, 3), 8, np.uint8)
    k = np.array([16, 16, 16])
    assert np.array_equal(corrupt_latents(z, np.zeros(4), k, rng), z)  # sigma 0: E(x) unchanged
    zn = corrupt_latents(z, np.array([1.0, 1.0, 1.0, 30.0]), k, rng)
    assert zn.dtype == np.uint8 and zn.min() >= 0 and zn.max() <= 15
    d = zn[:3].astype(np.float64) - 8
    # round(8 + N(0, 1)) - 8 has variance sum_n n^2 P(|n - N| <= 1/2) = 1.0833 (approx 1 + 1/12)
    assert abs(d.mean()) < 0.03 and abs(d.var() - 1.0833) < 0.04
    assert (zn[3] == 0).mean() > 0.3 and (zn[3] == 15).mean() > 0.3  # large noise is clamped to [0, K-1]


def test_identity_refiner_returns_its_input_exactly():
    torch.manual_seed(0)
    model = build_unet("refiner", 3, 3, 32)
    torch.nn.init.zeros_(model.conv_out.weight)
    torch.nn.init.zeros_(model.conv_out.bias)
    ref = Refiner(model)
    assert ref.factor == 8
    imgs = np.random.default_rng(4).integers(0, 256, (2, 20, 27, 3), dtype=np.uint8)  # not multiples of 8
    out = ref.apply(imgs, batch_size=1)
    assert out.dtype == np.uint8 and np.array_equal(out, imgs)  # [-1, 1] round trip is exact
    assert np.array_equal(ref.apply(imgs[0]), imgs[0])  # a single (H, W, 3) image
    with pytest.raises(ValueError, match="uint8"):
        ref.apply(imgs.astype(np.float32))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A refiner trained for 4 steps on 16 x 16 crops (the whole run takes a few seconds on one core)."""
    root, _ = data
    out = tmp_path_factory.mktemp("refiner") / "R"
    cfg = RefinerConfig(codec=str(root / "codec"), data=str(root / "imgs"), out=str(out), crop_size=16, steps=4,
                        batch_size=2, noise_std=1.5, holdout=0.2, log_every=2, seed=0, warmup_steps=4)
    assert train_refiner(cfg, progress=False) == out
    return cfg, out


def test_train_refiner_writes_artifacts_and_apply_works(data, trained):
    _, codec = data
    cfg, out = trained
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["format"] == "mbldm-refiner" and saved["steps_done"] == 4 and saved["crop_size"] == 16
    assert 1.6e6 < saved["parameters"] < 1.8e6  # the paper's "only 1.7 M parameters"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)
    # linear warm-up over 4 steps: after k optimizer steps the rate is lr * min(1, (k + 1) / 4)
    assert [r["lr"] for r in log] == pytest.approx([2e-4 * 3 / 4, 2e-4])

    ev = json.loads((out / "eval.json").read_text())
    assert [r["noise_std"] for r in ev["results"]] == [0.0, 0.75, 1.5]
    assert len(ev["images"]) == 1  # 20 % of 5 files held out
    held = load_image(ev["images"][0])
    clean_psnr = psnr(codec.decode(codec.encode(held)), held)  # sigma 0: pure codec error, computed here
    assert ev["results"][0]["psnr_before"] == pytest.approx(clean_psnr, abs=1e-9)
    assert ev["results"][2]["psnr_before"] < ev["results"][0]["psnr_before"]  # noise lowers PSNR

    ref = Refiner.load(out, device="cpu")
    imgs = np.random.default_rng(5).integers(0, 256, (3, 21, 30, 3), dtype=np.uint8)
    res = ref.apply(imgs)
    assert res.shape == imgs.shape and res.dtype == np.uint8
    assert np.abs(res.astype(int) - imgs).mean() < 20  # a few steps from the identity: still close to the input

    with pytest.raises(FileExistsError, match="not empty"):
        train_refiner(cfg, progress=False)


def test_degrade_images_is_decode_of_corrupted_encode(data):
    _, codec = data
    img = _synthetic_image(np.random.default_rng(6), 18, 22)[None]  # not a multiple of s = 4: padded, cropped
    assert np.array_equal(degrade_images(codec, img, np.zeros(1), np.random.default_rng(0)),
                          codec.decode(codec.encode(img), size=(18, 22)))


def test_refiner_config_validation_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="holdout"):
        RefinerConfig(codec="c", data="d", out="o", holdout=0.0).validate()
    with pytest.raises(ValueError, match="warmup_steps"):
        RefinerConfig(codec="c", data="d", out="o", warmup_steps=0).validate()
    with pytest.raises(ValueError, match="crop_size"):
        RefinerConfig(codec="c", data="d", out="o", crop_size=128, resolution=64).validate()
    with pytest.raises(FileNotFoundError, match="not found"):
        Refiner.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an mbldm refiner"):
        Refiner.load(tmp_path / "bad")


def test_cli_refiner_train_passes_options(monkeypatch, tmp_path, capsys):
    """The thin command builds the RefinerConfig from its flags and calls train_refiner once."""
    import mbldm.diffusion.refiner as refiner_mod
    from mbldm.cli import main

    seen = {}

    def fake_train(cfg, overwrite=False, progress=True):
        seen.update(cfg=cfg, overwrite=overwrite, progress=progress)
        (tmp_path / "eval.json").write_text(json.dumps({"results": [
            {"noise_std": 2.0, "psnr_before": 25.0, "psnr_after": 27.5, "ssim_before": 0.5, "ssim_after": 0.6}]}))
        return tmp_path

    monkeypatch.setattr(refiner_mod, "train_refiner", fake_train)
    assert main(["refiner", "train", "--codec", "C", "--data", "D", "--out", "R", "--crop-size", "64", "--steps",
                 "7", "--noise-std", "1.25", "--resolution", "256", "--max-minutes", "3", "--overwrite",
                 "--quiet"]) == 0
    cfg = seen["cfg"]
    assert (cfg.codec, cfg.data, cfg.out, cfg.crop_size, cfg.steps) == ("C", "D", "R", 64, 7)
    assert (cfg.noise_std, cfg.resolution, cfg.max_minutes) == (1.25, 256, 3.0)
    assert seen["overwrite"] is True and seen["progress"] is False
    assert "PSNR 25.00 -> 27.50 dB" in capsys.readouterr().out


def test_cli_refiner_apply(data, trained, tmp_path, capsys):
    from mbldm.cli import main

    root, _ = data
    _, R = trained
    out = tmp_path / "refined"
    assert main(["refiner", "apply", "--refiner", str(R), "--out", str(out), str(root / "imgs" / "im0.png"),
                 str(root / "imgs" / "im1.png")]) == 0
    a = load_image(out / "im0.png")
    assert a.shape == (40, 48, 3)
    assert np.array_equal(a, Refiner.load(R, device="cpu").apply(load_image(root / "imgs" / "im0.png")))
    assert main(["refiner", "apply", "--refiner", str(R), "--out", str(out), str(root / "imgs" / "im0.png")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert refine_files(R, [root / "imgs" / "im0.png"], out, overwrite=True) == [out / "im0.png"]
