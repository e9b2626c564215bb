"""Settings of ``mbldm demo``: :class:`DemoConfig`, its automatic choices by ``--minutes`` (see
:mod:`mbldm.demo.pipeline`), validation, and the equivalent command line shown in the report.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

__all__ = ["DemoConfig", "VARIANTS", "FID_MIN_SAMPLES", "HIDDEN_FIELDS", "demo_command", "hidden_settings"]

VARIANTS = ("continuous", "both")
FID_MIN_SAMPLES = 100


@dataclasses.dataclass
class DemoConfig:
    """Settings of ``mbldm demo`` (the first block are the command-line flags; the rest are knobs for tests and
    experiments, documented in the docstring of :mod:`mbldm.demo.pipeline`).

    Attributes:
        data: image folder (recursive) or None for the bundled photos.
        out: output folder (must be empty or absent unless ``overwrite``).
        minutes: wall-time budget of the whole command (> 0).
        spec: codec spec (``mbldm.codec.spec``).
        variant: "continuous" or "both" (continuous + categorical).
        resolution: image side R (None: 64 for minutes < 30, else 128); a multiple of 8 * 2**downsamplings.
        preset: U-Net preset (None: "cpu" for minutes < 60, else "small").
        seed: seed of every random choice (subsets, crops, codec, training, sampling).
        overwrite: remove the demo's previous outputs (``DEMO_ENTRIES``) from ``out`` first.
        threads: torch/faiss CPU threads (None: free cores, see module docstring).
        progress: show progress bars (summary lines are always printed).
        num_samples: generated images per variant (None: see module docstring).
        sample_steps: DDIM steps.
        max_patches: codec training patches per channel.
        num_crops: random crops of the bundled photos (generative training set).
        codec_images, bench_images: with ``data``: files fitting the codec / held out for the benchmark.
        photo_max_side: shrink the bundled photos' long side to this (tests); None keeps them.
        train_steps, refiner_steps: fixed step counts instead of the time budget (tests).
        batch_size, refiner_batch_size: training batch sizes.
        fid_min_samples: FID is computed only with at least this many samples and real images.
        fid_batch_size: Inception batch size.
        command: the command line to show in the report (None: :func:`demo_command`).
    """

    data: str | None = None
    out: str = "demo_out"
    minutes: float = 10.0
    spec: str = "OPQ-32-8-8"
    variant: str = "continuous"
    resolution: int | None = None
    preset: str | None = None
    seed: int = 0
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True
    num_samples: int | None = None
    sample_steps: int = 50
    max_patches: int = 200_000
    num_crops: int = 512
    codec_images: int = 24
    bench_images: int = 8
    photo_max_side: int | None = None
    train_steps: int | None = None
    refiner_steps: int | None = None
    batch_size: int = 64
    refiner_batch_size: int = 8
    fid_min_samples: int = FID_MIN_SAMPLES
    fid_batch_size: int = 50
    command: str | None = None

    def resolved(self) -> DemoConfig:
        """A copy with the automatic choices (resolution, preset, num_samples) filled in, validated.

        Raises:
            ValueError: a value out of range (naming the setting).
        """
        from mbldm.diffusion.models import UNET_PRESETS, preset_downsamplings

        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"demo: --minutes must be a positive number, got {self.minutes!r}")
        m = float(self.minutes)
        cfg = dataclasses.replace(
            self,
            resolution=self.resolution if self.resolution is not None else (64 if m < 30 else 128),
            preset=self.preset if self.preset is not None else (_cpu_preset() if m < 60 else "small"),
            num_samples=self.num_samples if self.num_samples is not None else (
                64 if m < 20 else min(1000, int(10 * m))),
        )
        from mbldm.codec.spec import parse_spec

        try:
            parse_spec(cfg.spec)
        except ValueError as exc:
            raise ValueError(f"demo: --spec {cfg.spec!r}: {exc}") from None
        if cfg.variant not in VARIANTS:
            raise ValueError(f"demo: --variant must be one of {VARIANTS}, got {cfg.variant!r}")
        if cfg.preset not in UNET_PRESETS or cfg.preset == "refiner":
            raise ValueError(f"demo: --preset must be one of {sorted(set(UNET_PRESETS) - {'refiner'})}, got "
                             f"{cfg.preset!r}")
        factor = 8 * 2 ** preset_downsamplings(cfg.preset)
        if cfg.resolution < 16 or cfg.resolution % factor:
            raise ValueError(f"demo: --resolution must be a multiple of {factor} (patch size 8 x the {cfg.preset!r} "
                             f"U-Net's downsampling {factor // 8}) and >= 16, got {cfg.resolution}")
        ints = {"num_samples": 1, "sample_steps": 1, "max_patches": 256, "num_crops": 2, "codec_images": 1,
                "bench_images": 1, "batch_size": 1, "refiner_batch_size": 1, "fid_min_samples": 2,
                "fid_batch_size": 1}
        for name, low in ints.items():
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"demo: {name} must be an integer >= {low}, got {v!r}")
        for name in ("train_steps", "refiner_steps", "threads", "photo_max_side"):
            v = getattr(cfg, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"demo: {name} must be a positive integer or None, got {v!r}")
        if cfg.data is not None:
            data = Path(cfg.data)
            if not data.exists():
                raise FileNotFoundError(f"{data}: --data folder not found")
            if not data.is_dir():
                raise NotADirectoryError(f"{data}: --data must be a folder of images")
        return cfg


def _cpu_preset() -> str:
    """The CPU-sized U-Net preset: "cpu", or "tiny" where "cpu" does not exist."""
    from mbldm.diffusion.models import UNET_PRESETS

    return "cpu" if "cpu" in UNET_PRESETS else "tiny"


def demo_command(config: DemoConfig) -> str:
    """The ``mbldm demo`` command line equivalent to ``config`` (flags that differ from the defaults)."""
    default = DemoConfig()
    args = ["mbldm", "demo"]
    flags = (("data", "--data"), ("out", "--out"), ("minutes", "--minutes"), ("spec", "--spec"),
             ("variant", "--variant"), ("resolution", "--resolution"), ("preset", "--preset"), ("seed", "--seed"),
             ("threads", "--threads"))
    for field, flag in flags:
        value = getattr(config, field)
        if value is not None and (value != getattr(default, field) or field == "out"):
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if config.overwrite:
        args.append("--overwrite")
    return shlex.join(args)


#: DemoConfig fields without a command-line flag (tests / experiments); listed in the report when changed.
HIDDEN_FIELDS = ("num_samples", "sample_steps", "max_patches", "num_crops", "codec_images", "bench_images",
                 "photo_max_side", "train_steps", "refiner_steps", "batch_size", "refiner_batch_size",
                 "fid_min_samples", "fid_batch_size")


def hidden_settings(config: DemoConfig) -> dict:
    """The settings of a resolved ``config`` that have no flag and differ from what the flags alone give."""
    base = DemoConfig(minutes=config.minutes, resolution=config.resolution, preset=config.preset).resolved()
    return {f: getattr(config, f) for f in HIDDEN_FIELDS if getattr(config, f) != getattr(base, f)}
