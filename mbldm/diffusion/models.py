"""diffusers ``UNet2DModel`` presets for the latent denoiser (§4.2.1) and the image-space refiner (§4.2.2).

The paper: "a U-Net model with four down/up sampling stages and attention only at the bottleneck level ... around
50 million parameters", and a refiner with "the same U-Net architecture with a smaller configuration with only
1.7 M parameters". Every preset uses ResNet-only ``DownBlock2D`` / ``UpBlock2D`` blocks and diffusers'
``UNetMidBlock2D`` (ResNet, self-attention, ResNet) as the bottleneck, so attention happens only there.
A U-Net with ``n`` stages downsamples n-1 times (the last stage has no downsampler), so the latent side must be
divisible by 2**(n-1).

Parameter counts (measured with diffusers 0.42; the model input is 2c channels with self-conditioning, c = 6 for
OPQ-32-8-8, output c (continuous) or c*K = 6*256 (categorical)):

| preset    | stages / channels             | layers | in -> out    | parameters |
|-----------|-------------------------------|--------|--------------|------------|
| "paper"   | 4: (128, 256, 256, 384)       | 2      | 12 -> 6      | 48,491,270 |
|           |                               |        | 12 -> 1536   | 50,255,360 |
| "small"   | 3: (64, 128, 128)             | 1      | 12 -> 6      |  4,245,702 |
|           |                               |        | 12 -> 1536   |  5,128,512 |
| "tiny"    | 2: (16, 32)                   | 1      | 12 -> 6      |    166,294 |
| "refiner" | 4: (32, 32, 64, 64)           | 2      | 3 -> 3       |  1,706,819 |

"paper" turns a 64x64 latent (512x512 images, s = 8) into an 8x8 bottleneck; "small" turns a 16x16 latent (faces
at 128x128) into 4x4; "tiny" is for tests only.
"""
from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel


def _unet_kwargs(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int,
                 attention_head_dim: int) -> dict:
    n = len(block_out_channels)
    return {
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("DownBlock2D",) * n,
        "up_block_types": ("UpBlock2D",) * n,
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,  # the mid block's self-attention: the only attention in the network
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": norm_num_groups,
    }


# Plain dicts of UNet2DModel keyword arguments (in/out channels and sample size come from build_unet).
UNET_PRESETS: dict[str, dict] = {
    "paper": _unet_kwargs((128, 256, 256, 384), layers_per_block=2, norm_num_groups=32, attention_head_dim=32),
    "small": _unet_kwargs((64, 128, 128), layers_per_block=1, norm_num_groups=32, attention_head_dim=32),
    "cpu": _unet_kwargs((32, 64, 64), layers_per_block=1, norm_num_groups=16, attention_head_dim=16),
    "tiny": _unet_kwargs((16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8),
    "refiner": _unet_kwargs((32, 32, 64, 64), layers_per_block=2, norm_num_groups=16, attention_head_dim=16),
}


def preset_downsamplings(preset: str) -> int:
    """Number of 2x downsamplings of a preset (stages - 1).

    Raises:
        ValueError: unknown preset.
    """
    return len(_preset(preset)["block_out_channels"]) - 1


def _preset(preset: str) -> dict:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    return UNET_PRESETS[preset]


def build_unet(
    preset: str,
    in_channels: int,
    out_channels: int,
    sample_size: int | tuple[int, int],
    device: torch.device | str | None = None,
) -> UNet2DModel:
    """Build a ``UNet2DModel`` from a preset.

    Args:
        preset: a key of ``UNET_PRESETS`` ("paper", "small", "tiny", "refiner").
        in_channels: input channels: 2c for a latent denoiser with self-conditioning (``self_condition_input``),
            3 for the RGB refiner.
        out_channels: c (continuous, eps or x_0 prediction) or c*K (categorical logits, see
            ``logits_from_model_output``), 3 for the refiner.
        sample_size: latent (or image) side h (or (h, w)); each side must be divisible by 2**(stages-1).
        device: where to create the parameters; ``"meta"`` builds without memory (parameter counting).

    Returns:
        a UNet2DModel in training mode; call it as ``model(x, t).sample`` with x (B, in_channels, h, w) and t a
        LongTensor (B,) -> (B, out_channels, h, w).

    Raises:
        ValueError: unknown preset (the message lists the presets), non-positive channels, or a sample size not
            divisible by 2**(stages-1).
    """
    kwargs = copy.deepcopy(_preset(preset))
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"build_unet: channels must be >= 1, got in={in_channels}, out={out_channels}")
    sides = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    factor = 2 ** preset_downsamplings(preset)
    if any(s < 1 or s % factor for s in sides):
        raise ValueError(
            f"build_unet: sample size {sample_size} is not divisible by {factor}: preset {preset!r} has "
            f"{preset_downsamplings(preset) + 1} stages ({preset_downsamplings(preset)} downsamplings)"
        )
    kwargs.update(in_channels=in_channels, out_channels=out_channels,
                  sample_size=sides[0] if sides[0] == sides[1] else sides)
    if device is None:
        return UNet2DModel(**kwargs)
    with torch.device(device):
        return UNet2DModel(**kwargs)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``; only those with requires_grad if ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
