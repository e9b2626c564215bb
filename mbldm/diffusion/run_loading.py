"""Loading a trained run for sampling: ``RUN/config.json`` checked for what sampling needs, the U-Net (EMA weights of
``RUN/model`` or the raw weights of the latest checkpoint) and the codec, as one :class:`RunModel`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbldm.diffusion.reverse_process import VARIANTS

__all__ = ["RunModel", "load_run", "read_trained_config", "run_parameterization"]

_RUN_KEYS = ("variant", "latent_shape", "num_codewords", "timesteps", "beta_schedule", "self_condition")


@dataclass
class RunModel:
    """A trained run ready to sample: its resolved config (dict of ``RUN/config.json``), U-Net and codec."""

    run_dir: Path
    config: dict
    model: Any  # diffusers.UNet2DModel, eval mode
    codec: Any  # mbldm.codec.Codec

    @property
    def variant(self) -> str:
        return self.config["variant"]

    @property
    def parameterization(self):
        """What the U-Net's output means (:func:`run_parameterization`)."""
        return run_parameterization(self.config)


def read_trained_config(run_dir: Path) -> dict:
    """``RUN/config.json`` of a training run, checked for the keys sampling needs.

    Raises:
        FileNotFoundError: no config.json.  ValueError: invalid JSON, missing keys, an unknown variant or a
            latent_shape that is not [h, w, c].
    """
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {run_dir} is not an mbldm training run (see `mbldm train`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [k for k in _RUN_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (expected a resolved TrainConfig)")
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"{path}: variant is {cfg['variant']!r}, expected one of {VARIANTS}")
    if len(cfg["latent_shape"]) != 3:
        raise ValueError(f"{path}: latent_shape must be [h, w, c], got {cfg['latent_shape']}")
    from mbldm.diffusion.train_config import with_version1_values

    return with_version1_values(cfg)


def run_parameterization(cfg: dict):
    """The :class:`~mbldm.diffusion.parameterization.Parameterization` of a run config (per-channel codebook
    sizes from ``codebook_sizes``, else K for every channel)."""
    from mbldm.diffusion.parameterization import parameterization_of

    c = int(cfg["latent_shape"][2])
    sizes = cfg.get("codebook_sizes") or [int(cfg["num_codewords"])] * c
    return parameterization_of(cfg, sizes)


def _load_raw_weights(run_dir: Path, model) -> None:
    """Replace ``model``'s (EMA) weights by the raw training weights of the latest checkpoint."""
    from safetensors.torch import load_file

    from mbldm.diffusion.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete step_* checkpoint holding non-EMA weights "
                                "(use the EMA weights in RUN/model, the default)")
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; cannot load the non-EMA weights of {ckpt}")
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match RUN/model's architecture ({exc})") from None


def load_run(run_dir: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> RunModel:
    """Load ``RUN/config.json``, the U-Net (``RUN/model``, EMA weights) and the codec (``RUN/codec``).

    Args:
        run_dir: a training run directory (contract: config.json, codec/, model/, checkpoints/).
        use_ema: True -> EMA weights from ``RUN/model``; False -> raw weights of the latest checkpoint
            (``RUN/checkpoints/step_*/model.safetensors``).
        device: where the U-Net goes.

    Raises:
        FileNotFoundError: missing run directory, config, model or codec.
        ValueError: a config that is not a resolved TrainConfig, or a model whose shape disagrees with it.
    """
    from diffusers import UNet2DModel

    from mbldm.codec import Codec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    cfg = read_trained_config(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no exported model (config.json + safetensors); has training saved?")
    model = UNet2DModel.from_pretrained(str(model_dir))
    if not use_ema:
        _load_raw_weights(run_dir, model)
    codec = Codec.load(run_dir / "codec")
    h, w, c = cfg["latent_shape"]
    K = int(cfg["num_codewords"])
    if codec.latent_channels != c or codec.num_codewords != K:
        raise ValueError(f"{run_dir}: codec has c={codec.latent_channels}, K={codec.num_codewords} but config says "
                         f"c={c}, K={K}")
    want_in = 2 * c if cfg["self_condition"] else c
    want_out = run_parameterization(cfg).out_channels()
    if model.config.in_channels != want_in or model.config.out_channels != want_out:
        raise ValueError(f"{model_dir}: U-Net has {model.config.in_channels} -> {model.config.out_channels} channels, "
                         f"the {cfg['variant']} config (self_condition={cfg['self_condition']}) needs "
                         f"{want_in} -> {want_out}")
    model.to(device).eval()
    return RunModel(run_dir, cfg, model, codec)
