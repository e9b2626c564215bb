"""Tests of configs/*.json: the paper's runs (§4.2.1) load, validate and say what the paper says.

§4.2.1: LSUN church and cat at 512 x 512, OPQ-32-8-8 latents of 64 x 64 x 6, a U-Net of "around 50 million
parameters" with four down/up stages and attention only at the bottleneck, min-SNR weighting, self-conditioning,
1 million steps with a batch of 64. The dry runs of these files are in tests/test_dry_run.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbldm.codec.spec import parse_spec
from mbldm.diffusion.models import build_unet, count_parameters
from mbldm.diffusion.train_config import TrainConfig, resolve_config
from mbldm.dry_run import latent_geometry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = [f"lsun_{ds}_512_{v}" for ds in ("church", "cat") for v in ("continuous", "categorical")]


FACES = ["faces128_cpu", "faces128_cpu_continuous", "faces128_paper_categorical", "faces128_paper_continuous"]


def test_the_named_configs_exist():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(NAMES + FACES)


@pytest.mark.parametrize("name", FACES)
def test_faces_configs_load_and_name_their_recipe(name):
    """The measured short-budget recipe (faces128_cpu*: BENCHMARKS.md "Generation recipe") and the paper-faithful
    settings at the same scale (faces128_paper_*) resolve to valid TrainConfigs with what their names promise."""
    from mbldm.diffusion.train_config import VERSION1_VALUES

    cfg = resolve_config({"config": str(CONFIGS / f"{name}.json")})
    assert (cfg.preset, cfg.batch_size, cfg.max_cpu_minutes) == ("cpu", 32, 60)
    if name == "faces128_cpu":
        assert (cfg.variant, cfg.head, cfg.nll_weight, cfg.eq24_weight) == ("categorical", "logistic", 1.0, 0.0)
    elif name == "faces128_paper_categorical":
        paper = {k: getattr(cfg, k) for k in VERSION1_VALUES}
        assert cfg.variant == "categorical" and paper == VERSION1_VALUES  # free logits, Eq. 24, Gumbel
    elif name == "faces128_paper_continuous":
        assert (cfg.variant, cfg.prediction, cfg.min_snr_gamma) == ("continuous", "epsilon", 5.0)  # Eq. 4


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_validates_and_matches_the_paper(name):
    path = CONFIGS / f"{name}.json"
    raw = json.loads(path.read_text())
    cfg = resolve_config({"config": str(path)})
    assert isinstance(cfg, TrainConfig)
    dataset, variant = name.split("_")[1], name.split("_")[3]
    assert (cfg.latents, cfg.out) == (f"stores/lsun_{dataset}_512", f"runs/{name}")
    assert (cfg.variant, cfg.preset, cfg.batch_size, cfg.steps) == (variant, "paper", 64, 1_000_000)
    assert cfg.self_condition is True and cfg.min_snr_gamma == 5.0
    assert (cfg.timesteps, cfg.beta_schedule) == (1000, "linear")  # DDPM (Ho et al.) as the paper's base code
    assert cfg.mixed_precision == "auto" and 0 < cfg.ema_decay < 1 and cfg.checkpoint_every >= 1
    # every setting of the file is a TrainConfig field or one of the four declared latent-geometry keys
    fields = {k: getattr(cfg, k) for k in TrainConfig.field_names()}
    geometry_keys = {"latent_shape", "num_codewords", "codec_spec", "resolution"}
    assert set(raw) - set(fields) == geometry_keys
    assert all(fields[k] == v for k, v in raw.items() if k in fields)


@pytest.mark.parametrize("name", NAMES)
def test_declared_latent_geometry_is_opq_32_8_8_at_512(name):
    geometry = latent_geometry(resolve_config({"config": str(CONFIGS / f"{name}.json")}))
    spec = parse_spec("OPQ-32-8-8", 8)  # Y: 4 x 8 bits, Cb and Cr: 1 x 8 bits
    assert geometry.source == "config"  # stores/... does not exist here: the dry run needs only the file
    assert geometry.latent_shape == (512 // 8, 512 // 8, spec.latent_channels) == (64, 64, 6)
    assert geometry.num_codewords == spec.max_k == 256 and geometry.codec_spec == "OPQ-32-8-8"
    assert geometry.store_bytes_per_image == 64 * 64 * 6 == 24 * 1024  # uint8 indices: 24 KiB per image


def test_flags_override_the_config_file():
    path = str(CONFIGS / "lsun_church_512_continuous.json")
    cfg = resolve_config({"config": path, "batch_size": 32, "out": "elsewhere", "mixed_precision": "fp16"})
    base = resolve_config({"config": path})
    assert (cfg.batch_size, cfg.out, cfg.mixed_precision) == (32, "elsewhere", "fp16")
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("batch_size", "out", "mixed_precision")} == \
        {k: v for k, v in base.to_dict().items() if k not in ("batch_size", "out", "mixed_precision")}


@pytest.mark.parametrize("variant, out_channels", [("continuous", 6), ("categorical", 6 * 256)])
def test_paper_preset_fits_the_latent_and_has_about_50m_parameters(variant, out_channels):
    """Four stages (three 2x downsamplings: 64 -> 8 at the bottleneck), ~50 M parameters (§4.2.1)."""
    model = build_unet("paper", 2 * 6, out_channels, 64, device="meta")  # self-conditioning doubles the input
    assert len(model.config.block_out_channels) == 4
    assert 45e6 < count_parameters(model) < 55e6
