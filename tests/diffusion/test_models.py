"""Tests for mbldm/diffusion/models.py: UNet2DModel presets (§4.2.1, §4.2.2)."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from mbldm.diffusion.models import UNET_PRESETS, build_unet, count_parameters, preset_downsamplings


def _n_attention(module: torch.nn.Module) -> int:
    return sum(isinstance(m, Attention) for m in module.modules())


def test_tiny_forward_shape_continuous_and_categorical():
    c, K, side = 2, 4, 8
    torch.manual_seed(0)
    for out_channels in (c, c * K):
        model = build_unet("tiny", in_channels=2 * c, out_channels=out_channels, sample_size=side)
        assert isinstance(model, UNet2DModel)
        x = torch.randn(3, 2 * c, side, side)
        y = model(x, torch.tensor([0, 10, 999])).sample
        assert y.shape == (3, out_channels, side, side)
        assert torch.isfinite(y).all()
    assert count_parameters(model) < 500_000


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_attention_only_at_the_bottleneck(preset):
    model = build_unet(preset, 12 if preset != "refiner" else 3, 6 if preset != "refiner" else 3, 64, device="meta")
    stages = len(UNET_PRESETS[preset]["block_out_channels"])
    assert len(model.down_blocks) == len(model.up_blocks) == stages
    assert preset_downsamplings(preset) == stages - 1
    assert sum(b.downsamplers is not None for b in model.down_blocks) == stages - 1
    assert _n_attention(model.down_blocks) == 0 and _n_attention(model.up_blocks) == 0
    assert _n_attention(model.mid_block) == 1


def test_paper_preset_has_about_50M_parameters_and_four_stages():
    assert len(UNET_PRESETS["paper"]["block_out_channels"]) == 4
    for out_channels in (6, 6 * 256):  # continuous, categorical (c = 6 for OPQ-32-8-8, K = 256)
        n = count_parameters(build_unet("paper", 12, out_channels, 64, device="meta"))
        assert 45_000_000 <= n <= 55_000_000, n


def test_small_and_refiner_sizes():
    n_small = count_parameters(build_unet("small", 12, 6, 16, device="meta"))
    assert 2_000_000 <= n_small <= 8_000_000, n_small
    n_ref = count_parameters(build_unet("refiner", 3, 3, 128, device="meta"))
    assert 1_500_000 <= n_ref <= 1_900_000, n_ref  # paper §4.2.2: 1.7 M


def test_count_parameters_hand_value():
    lin = torch.nn.Linear(3, 2)  # 3*2 weights + 2 biases
    assert count_parameters(lin) == 8
    lin.bias.requires_grad_(False)
    assert count_parameters(lin, trainable_only=True) == 6


def test_build_unet_errors():
    with pytest.raises(ValueError, match="paper.*refiner.*small.*tiny"):
        build_unet("huge", 12, 6, 64)
    with pytest.raises(ValueError, match="not divisible by 4"):
        build_unet("small", 12, 6, 18, device="meta")
    with pytest.raises(ValueError, match="not divisible by 8"):
        build_unet("paper", 12, 6, 36, device="meta")
    with pytest.raises(ValueError, match="channels"):
        build_unet("tiny", 0, 6, 16, device="meta")
    model = build_unet("paper", 12, 6, 16, device="meta")  # 16 -> 2x2 bottleneck is allowed
    assert model.config.in_channels == 12 and model.config.out_channels == 6 and model.config.sample_size == 16
