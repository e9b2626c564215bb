"""``mbldm demo``: the whole paper pipeline as one command, ending with ``OUT/report.html``.

Steps (each prints a header, shows the library's own progress bar, then one summary line):

1. data: without ``--data``, the real colour photographs bundled in scikit-image / scikit-learn / matplotlib
   (:mod:`mbldm.demo.sample_images`) are written to ``OUT/data/{fit,heldout}`` and ``num_crops`` random square
   crops (side 1.5R..2.5R, random left-right flip, resized to R x R with ``resize_center_crop``) to ``OUT/crops``,
   the generative training set. With ``--data DIR``, a seeded random subset of DIR (``codec_images`` files) is
   copied to ``OUT/data/fit`` and ``bench_images`` other files to ``OUT/data/heldout``; the generative model
   trains on every image of DIR (short side resized to R, centre crop).
2. codec: ``codec fit`` OPQ-32-8-8 (or ``--spec``) on ``OUT/data/fit`` with at most ``max_patches`` patches.
3. bench: Table 1 on the held-out photos (``bench_codec``) + crops original | ours | JPEG at the same bpp.
4. ordering: Fig. 3, D(E(x)), D(E(x)+1) in k-means order and in PCA order (§3.2.1).
5. latents: ``latents build`` at resolution R (8x8x6 latents at R = 64).
6. train: the continuous variant (and the categorical one with ``variant="both"``) for a time budget.
7. refiner: the image-space refiner (§4.2.2) for a time budget.
8. sample: DDIM (50 steps) samples with the refiner (continuous), grids, and one trajectory t = 1000..0 (Fig. 7).
9. fid: FID against real images when there are at least ``fid_min_samples`` samples.
10. report: ``OUT/report.html`` + ``OUT/report_files/``; every number is in ``OUT/demo.json``.

Choices by ``--minutes`` M (each can be overridden):
    resolution R = 64 (8x8x6 latents) for M < 30, else 128 (16x16x6);
    U-Net preset "cpu" (1.1M parameters; "tiny", 0.17M, where "cpu" does not exist) for M < 60, else "small"
    (4.2M);
    samples N = 64 for M < 20, else min(1000, 10 M) (M = 20 -> 200);
    FID only when N >= ``fid_min_samples`` = 100 (FID_MIN_SAMPLES): below that the Fréchet distance of 2048-d
    features is dominated by its small-N bias. It is still biased at N < 2048 (the report says so); compare
    values only at equal N. The real side is N images (crops, or a seeded subset of DIR at R x R).

Time budget: ``minutes`` is wall time for the whole command. The codec fit, benchmark and latent store run
first (their time depends on the data, not on M); what remains is split by :func:`plan_budget`: estimated
sampling / FID / report time is reserved, REFINER_SHARE of the rest trains the refiner and the remainder trains
the diffusion model(s) (``max_minutes`` of ``train``). The step count passed to ``train`` is an upper bound estimated
from a short timing of the U-Net (STEP_MARGIN x the budget), so the progress bar has a finite total; the time
budget normally stops training first.

CPU threads: ``threads=None`` uses the free cores, ``cpus - round(1-min load average)``, at least 1 (on a shared,
busy machine one thread per process is several times faster than oversubscribed threads: measured 13x for the
tiny U-Net's training step, 4x for the FID's 2048 x 2048 eigendecompositions). The limit applies to torch, to the
OpenMP runtime it shares with faiss and to numpy's OpenBLAS (``threadpoolctl``); it is lifted at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DemoConfig",
    "DEMO_ENTRIES",
    "FID_MIN_SAMPLES",
    "auto_threads",
    "plan_budget",
    "demo_command",
    "hidden_settings",
    "collect_samples",
    "run_demo",
]

FORMAT = "mbldm-demo"
VERSION = 1
VARIANTS = ("continuous", "both")
FID_MIN_SAMPLES = 100
#: Entries of OUT that the demo writes; ``overwrite=True`` removes exactly these (nothing else in OUT).
DEMO_ENTRIES = ("data", "crops", "codec", "bench.json", "latents", "run", "run_categorical", "refiner", "samples",
                "samples_categorical", "fid_real", "fid_fake", "fid_fake_categorical", "fid_real_stats.npz",
                "fid.json", "report_files", "report.html", "demo.json")
# Budget constants (seconds), measured on one busy CPU core with DDIM 50 steps at 8x8 latents; generous on
# purpose: on a faster machine the demo ends early rather than late.
SAMPLE_S_PER_IMAGE = {"tiny": 0.15, "cpu": 0.25, "small": 0.45, "paper": 3.0}
REFINE_S_PER_IMAGE = 1.0  # the 1.7M-parameter refiner on one 64x64 image (scaled by (R/64)^2)
CATEGORICAL_SAMPLE_FACTOR = 2.0
TRAJECTORY_S = 10.0
FID_FIXED_S = 30.0  # per FID value: Inception load + the 2048 x 2048 eigh / SVD of the Fréchet distance
FID_S_PER_IMAGE = 0.6
REPORT_S = 20.0
REFINER_EVAL_S = 15.0
REFINER_SHARE = 0.12
MIN_TRAIN_S = 30.0
MIN_REFINER_S = 15.0
# estimated steps = budget / measured step time * margin: a cap for the progress bar; the time budget stops
# training first. The short timing over-estimates the step time: ~2.3x from warm-up alone, and 16x was seen when
# another process held the cores during the timing (a cap of 271 steps for a 445 s budget that took 80 s).
STEP_MARGIN = 10.0


# ------------------------------------------------------------------------------------------------ configuration
@dataclasses.dataclass
class DemoConfig:
    """Settings of ``mbldm demo`` (the first block are the command-line flags; the rest are knobs for tests and
    experiments, documented in the module docstring).

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


def auto_threads() -> int:
    """Free CPU cores: usable cores minus the rounded 1-minute load average, clamped to [1, cores]."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, cores - int(round(load))))


def plan_budget(remaining_s: float, *, variants: Sequence[str], num_samples: int, preset: str, latent_side: int,
                sample_steps: int, fid: bool, patch_size: int = 8) -> dict:
    """Split the remaining wall time between training, the refiner and the reserved final steps.

    reserve = sampling (N * SAMPLE_S_PER_IMAGE[preset] * (h/8)^2 * S/50 per variant, x CATEGORICAL_SAMPLE_FACTOR
    for the categorical one, + TRAJECTORY_S each, + N * REFINE_S_PER_IMAGE * (h s / 64)^2 for refining the
    continuous samples) + FID (FID_S_PER_IMAGE * N for the real images, plus FID_FIXED_S + FID_S_PER_IMAGE
    * N per variant, when computed) + REPORT_S + REFINER_EVAL_S; free = remaining - reserve;
    refiner = max(MIN_REFINER_S, REFINER_SHARE * free); training = max(MIN_TRAIN_S * variants, free - refiner),
    split equally between variants.

    Args:
        remaining_s: seconds left of the ``--minutes`` budget.
        variants: trained variants, e.g. ("continuous",) or ("continuous", "categorical").
        num_samples: N per variant.  preset: U-Net preset.  latent_side: h.  sample_steps: DDIM steps S.
        fid: whether FID will be computed.  patch_size: s (image side R = h s).

    Returns:
        {"reserve_s", "refiner_s", "train_s": {variant: seconds}, "over_budget": bool (the minimums exceed the
        remaining time)}.
    """
    per_image = SAMPLE_S_PER_IMAGE.get(preset, 3.0) * (latent_side / 8) ** 2 * sample_steps / 50
    sampling = sum(num_samples * per_image * (CATEGORICAL_SAMPLE_FACTOR if v == "categorical" else 1.0)
                   + TRAJECTORY_S for v in variants)
    sampling += num_samples * REFINE_S_PER_IMAGE * (latent_side * patch_size / 64) ** 2  # continuous only
    fid_s = 0.0
    if fid:
        fid_s = (FID_FIXED_S + FID_S_PER_IMAGE * num_samples) * len(variants) + FID_S_PER_IMAGE * num_samples
    reserve = sampling + fid_s + REPORT_S + REFINER_EVAL_S
    free = remaining_s - reserve
    refiner = max(MIN_REFINER_S, REFINER_SHARE * free)
    train_total = max(MIN_TRAIN_S * len(variants), free - refiner)
    return {"reserve_s": reserve, "refiner_s": refiner,
            "train_s": {v: train_total / len(variants) for v in variants},
            "over_budget": free - refiner < MIN_TRAIN_S * len(variants)}


# ------------------------------------------------------------------------------------------------ small helpers
def _q(path: Any) -> str:
    return shlex.quote(str(path))


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove only the demo's own entries."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: --out exists and is not empty; pass --overwrite to replace the demo's "
                                  "outputs there, or choose another --out")
        for name in DEMO_ENTRIES:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _Recorder:
    """Prints step headers / summaries, times the steps and keeps demo.json up to date."""

    def __init__(self, out: Path, summary: dict, total_steps: int):
        self.out, self.summary, self.total, self.index = out, summary, total_steps, 0

    def run(self, name: str, title: str, fn: Callable[[], tuple[str, list[str], dict]]) -> dict:
        """Run ``fn() -> (one-line summary, commands, numbers)``; record and print them."""
        self.index += 1
        print(f"[{self.index}/{self.total}] {title}", flush=True)
        start, cpu_start = time.monotonic(), time.process_time()
        line, commands, numbers = fn()
        seconds, cpu = time.monotonic() - start, time.process_time() - cpu_start
        print(f"    -> {line} ({_fmt_s(seconds)}, CPU {_fmt_s(cpu)})", flush=True)
        self.summary["steps"].append({"name": name, "title": title, "seconds": round(seconds, 2),
                                      "cpu_seconds": round(cpu, 2), "summary": line, "commands": commands})
        self.summary[name] = numbers
        self.save()
        return numbers

    def save(self) -> None:
        from mbldm.io.atomic import write_json

        write_json(self.out / "demo.json", self.summary)


def _copy_files(paths: Sequence[Path], root: Path, dest: Path) -> list[Path]:
    """Copy files (bytes unchanged) into ``dest``, named by their path below ``root`` with '/' -> '__'.

    Each file is decoded first, so that a broken image is reported under its own path, not the copy's.

    Raises:
        ValueError: a file is not a readable image (from ``mbldm.io.images.load_image``, naming ``p``).
    """
    from mbldm.io.images import load_image

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        load_image(p)  # raises naming p when it is not a readable image
        target = dest / "__".join(p.relative_to(root).parts)
        shutil.copyfile(p, target)
        out.append(target)
    return out


def collect_samples(sample_dir: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy the generated images ``img_*.png`` of a ``sample`` folder into ``dest`` (created), leaving out
    ``grid.png``, ``raw/`` and ``trajectory/``: ``mbldm fid`` scans folders recursively, so it needs a folder
    holding only the samples.

    Raises:
        ValueError: ``sample_dir`` holds no ``img_*.png``.
    """
    sample_dir, dest = Path(sample_dir), Path(dest)
    files = sorted(sample_dir.glob("img_*.png"))
    if not files:
        raise ValueError(f"{sample_dir}: no img_*.png samples to collect")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    return [dest / f.name for f in files]


def _random_crops(photos: Sequence[np.ndarray], n: int, resolution: int, rng: np.random.Generator,
                  dest: Path, progress: bool) -> list[Path]:
    """n random square crops (side in [1.5R, 2.5R], at most the photo's short side; random left-right flip),
    round-robin over the photos, resized to R x R (``resize_center_crop``) and written as PNG."""
    from tqdm.auto import tqdm

    from mbldm.data.datasets import resize_center_crop
    from mbldm.io.images import save_png

    lo, hi = round(1.5 * resolution), round(2.5 * resolution)
    paths = []
    for i in tqdm(range(n), desc="random crops", unit="crop", disable=not progress):
        img = photos[i % len(photos)]
        H, W = img.shape[:2]
        top_side = min(hi, H, W)
        side = int(rng.integers(min(lo, top_side), top_side + 1))
        top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        crop = img[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = dest / f"crop_{i:05d}.png"
        save_png(path, resize_center_crop(np.ascontiguousarray(crop), resolution), overwrite=True)
        paths.append(path)
    return paths


def _seconds_per_step(preset: str, in_ch: int, out_ch: int, side: int, batch: int, forwards: int) -> float:
    """Wall time of one optimizer step (``forwards - 1`` extra no-grad passes, forward, backward, AdamW) of a
    freshly built U-Net: the fastest of the 2nd to 4th of four steps (the first warms up; the minimum is the
    least disturbed by other processes)."""
    import torch

    from mbldm.diffusion.models import build_unet

    model = build_unet(preset, in_ch, out_ch, side)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_ch, side, side)  # (B, C, h, w)
    t = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(forwards - 1):
            with torch.no_grad():
                model(x, t)
        model(x, t).sample.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return float(np.min(times[1:]))


def _steps_for(seconds: float, per_step: float) -> int:
    return max(10, int(math.ceil(seconds / max(per_step, 1e-3) * STEP_MARGIN)))


# ------------------------------------------------------------------------------------------------ the pipeline
def run_demo(config: DemoConfig) -> Path:
    """Run the whole pipeline (module docstring) and return the path of ``OUT/report.html``.

    Raises:
        ValueError: bad settings, too few images; FileExistsError: non-empty ``out`` without ``overwrite``;
        FileNotFoundError / NotADirectoryError: bad ``data``; and any error of the steps (codec, training, ...).
    """
    import torch

    cfg = config.resolved()
    t0 = time.monotonic()
    deadline = t0 + 60.0 * cfg.minutes
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    threads = cfg.threads or auto_threads()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    old_threads = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency: OpenBLAS + OpenMP pools
    except ImportError:  # pragma: no cover - only torch's pool is limited then
        threadpool_limits = None
    limits = threadpool_limits(limits=threads) if threadpool_limits is not None else contextlib.nullcontext()
    with limits:
        torch.set_num_threads(threads)
        try:
            return _run(cfg, out, t0, deadline, threads, load_start)
        finally:
            torch.set_num_threads(old_threads)


def _run(cfg: DemoConfig, out: Path, t0: float, deadline: float, threads: int, load_start: float | None) -> Path:
    import torch

    variants = ("continuous", "categorical") if cfg.variant == "both" else ("continuous",)
    R, S = cfg.resolution, 8
    h = R // S
    n_steps = 9 + len(variants)
    summary: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "command": cfg.command or demo_command(cfg),
        "hidden_settings": hidden_settings(cfg),
        "config": dataclasses.asdict(cfg),
        "out": str(out.resolve()),
        "machine": {"cpus": os.cpu_count(), "threads": threads, "load_average_start": load_start,
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]},
        "choices": {"resolution": R, "latent_shape": None, "preset": cfg.preset, "num_samples": cfg.num_samples,
                    "sample_steps": cfg.sample_steps, "fid_min_samples": cfg.fid_min_samples,
                    "variants": list(variants)},
        "steps": [], "figures": {},
    }
    rec = _Recorder(out, summary, n_steps)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    state: dict[str, Any] = {}

    # ---- 1. data -------------------------------------------------------------------------------------------
    def step_data():
        from mbldm.io.images import load_image, scan_images

        fit_dir, held_dir = out / "data" / "fit", out / "data" / "heldout"
        if cfg.data is None:
            from mbldm.demo.sample_images import write_bundled_photos

            written = write_bundled_photos(out / "data", max_side=cfg.photo_max_side)
            photos = [{"name": p.name, "package": p.package, "source": str(p.path), "role": p.role,
                       "file": str(path.relative_to(out)), "size": list(load_image(path).shape[:2])}
                      for p, path in written]
            images = [load_image(path) for _, path in written]
            crops = _random_crops(images, cfg.num_crops, R, rng, out / "crops", cfg.progress)
            state.update(train_data=out / "crops", real_pool=crops, bench_dir=held_dir if held_dir.is_dir()
                         else fit_dir)
            n_fit = sum(p["role"] == "fit" for p in photos)
            line = (f"{len(photos)} bundled photos ({n_fit} fit the codec, {len(photos) - n_fit} held out) -> "
                    f"{len(crops)} random crops {R}x{R} in {out / 'crops'}")
            numbers = {"mode": "bundled", "photos": photos, "crops": len(crops), "training_images": len(crops),
                       "crop_rule": "side ~ U[1.5R, 2.5R] (<= short side), random position, 50% left-right flip, "
                                    "resized to R x R"}
            commands = ["# data: bundled photos -> OUT/data/{fit,heldout}/*.png and random crops -> OUT/crops "
                        "(done by `mbldm demo` itself)"]
        else:
            root = Path(cfg.data)
            paths = scan_images(root)
            if len(paths) < 3:
                raise ValueError(f"{root}: the demo needs at least 3 images (codec, benchmark, training), found "
                                 f"{len(paths)}")
            perm = [paths[i] for i in rng.permutation(len(paths))]
            n_fit = min(cfg.codec_images, len(paths) - 1)
            n_bench = max(1, min(cfg.bench_images, len(paths) - n_fit))
            fit = _copy_files(sorted(perm[:n_fit]), root, fit_dir)
            held = _copy_files(sorted(perm[n_fit:n_fit + n_bench]), root, held_dir)
            state.update(train_data=root, real_pool=perm, bench_dir=held_dir)
            line = (f"{len(paths)} images in {root}: {len(fit)} copied to fit the codec, {len(held)} held out for "
                    f"the benchmark; all {len(paths)} train the diffusion model at {R}x{R}")
            numbers = {"mode": "folder", "folder": str(root.resolve()), "images": len(paths), "fit": len(fit),
                       "heldout": len(held), "training_images": len(paths)}
            commands = [f"# data: {n_fit} random files of {root} -> OUT/data/fit, {len(held)} -> OUT/data/heldout "
                        "(done by `mbldm demo` itself)"]
        return line, commands, numbers

    rec.run("data", "data: images for the codec, the benchmark and generative training", step_data)

    # ---- 2. codec ------------------------------------------------------------------------------------------
    def step_codec():
        from mbldm.codec.files import fit_from_folder
        from mbldm.eval.metrics import bits_per_pixel, compression_ratio

        codec = fit_from_folder(out / "data" / "fit", cfg.spec, out / "codec", max_patches=cfg.max_patches,
                                seed=cfg.seed, progress=cfg.progress)
        state["codec"] = codec
        patches = codec.config.training["patches"]
        bpp, cr = bits_per_pixel(codec.spec), compression_ratio(codec.spec)
        used = max(p["used_patches"] for p in patches.values())
        total = max(p["total_patches"] for p in patches.values())
        line = (f"{codec.spec.name}: c={codec.latent_channels} latent channels, K={codec.num_codewords}, "
                f"{bpp:.3f} bpp, 1:{cr:g}; fitted on {codec.config.training['num_images']} images "
                f"({used:,} of {total:,} patches per channel)")
        numbers = {"spec": codec.spec.name, "latent_channels": codec.latent_channels,
                   "num_codewords": codec.num_codewords, "bpp": bpp, "compression_ratio": cr,
                   "patches": patches, "num_images": codec.config.training["num_images"], "dir": "codec"}
        cmd = (f"mbldm codec fit --images {_q(out / 'data' / 'fit')} --spec {_q(cfg.spec)} --out {_q(out / 'codec')} "
               f"--max-patches {cfg.max_patches} --seed {cfg.seed}")
        return line, [cmd], numbers

    rec.run("codec", f"codec: fit {cfg.spec} (§3.1, one FAISS quantizer per YCbCr channel)", step_codec)
    codec = state["codec"]

    # ---- 3. bench ------------------------------------------------------------------------------------------
    def step_bench():
        from tqdm.auto import tqdm

        from mbldm.codec.bench import JPEG_FIELDS, NUMERIC_FIELDS, bench_codec, jpeg_at_bpp
        from mbldm.demo.figures import center_crop, plot_comparison
        from mbldm.eval.metrics import psnr
        from mbldm.io.atomic import write_json
        from mbldm.io.images import load_image, scan_images

        bench_dir = state["bench_dir"]
        paths = scan_images(bench_dir)
        images = [(p.stem, load_image(p)) for p in paths]
        rows = [bench_codec(codec, [item])["images"][0]
                for item in tqdm(images, desc="bench", unit="img", disable=not cfg.progress)]
        mean = {f: float(np.mean([r[f] for r in rows])) for f in NUMERIC_FIELDS}
        mean["jpeg"] = {f: float(np.mean([r["jpeg"][f] for r in rows])) for f in JPEG_FIELDS}
        result = {"spec": codec.spec.name, "images": rows, "mean": mean}
        write_json(out / "bench.json", result)
        crop = min(96, R * 2)
        panels = []
        for name, img in images[:3]:
            ours = codec.decode(codec.encode(img), size=img.shape[:2])
            row = next(r for r in rows if r["name"] == name)
            quality, j_bpp, jpeg = jpeg_at_bpp(img, row["bpp"])
            panels.append({"name": name, "spec": codec.spec.name, "original": center_crop(img, crop),
                           "ours": center_crop(ours, crop), "jpeg": center_crop(jpeg, crop), "bpp": row["bpp"],
                           "psnr": psnr(img, ours), "jpeg_bpp": j_bpp, "jpeg_psnr": psnr(img, jpeg),
                           "jpeg_quality": quality})
        plot_comparison(panels, files / "comparison.png")
        summary["figures"]["comparison"] = "report_files/comparison.png"
        state["ordering_image"] = images[0]
        j = mean["jpeg"]
        line = (f"{len(rows)} held-out images: ours {mean['psnr_db']:.2f} dB / SSIM {mean['ssim']:.3f} at "
                f"{mean['bpp']:.3f} bpp vs JPEG {j['psnr_db']:.2f} dB / SSIM {j['ssim']:.3f} at {j['bpp']:.3f} bpp")
        cmd = f"mbldm codec bench --codec {_q(out / 'codec')} --images {_q(bench_dir)} --json {_q(out / 'bench.json')}"
        return line, [cmd], {**result, "images_dir": str(bench_dir.relative_to(out))}

    rec.run("bench", "bench: Table 1 on held-out images, JPEG at the same bits per pixel", step_bench)

    # ---- 4. ordering ---------------------------------------------------------------------------------------
    def step_ordering():
        from mbldm.demo.figures import center_crop, ordering_effect, plot_ordering

        name, img = state["ordering_image"]
        effect = ordering_effect(codec, np.ascontiguousarray(center_crop(img, 256)))
        plot_ordering(effect, files / "ordering.png")
        summary["figures"]["ordering"] = "report_files/ordering.png"
        p, o = effect["psnr"], effect["ordinality"]
        line = (f"ordinality {o['ordered']:.3f} (PCA order) vs {o['unordered']:.3f} (k-means order); PSNR of "
                f"D(E(x)+1): {p['shift_unordered']:.2f} dB unordered -> {p['shift_ordered']:.2f} dB ordered "
                f"(D(E(x)): {p['reconstruction']:.2f} dB)")
        return line, [], {"image": name, "psnr": p, "ordinality": o}

    rec.run("ordering", "ordering: Fig. 3, the effect of index + 1 before and after the PCA ordering (§3.2.1)",
            step_ordering)

    # ---- 5. latents ----------------------------------------------------------------------------------------
    def step_latents():
        from mbldm.data.latent_store import LatentStore, build_latent_store

        store_dir = build_latent_store(out / "codec", state["train_data"], R, out / "latents", progress=cfg.progress)
        store = LatentStore(store_dir)
        hh, ww, c = store.latent_shape
        summary["choices"]["latent_shape"] = [hh, ww, c]
        line = f"{len(store)} latents {hh}x{ww}x{c} {store.dtype.name} (K={store.num_codewords}) of {R}x{R} images"
        cmd = (f"mbldm latents build --codec {_q(out / 'codec')} --data {_q(state['train_data'])} --resolution {R} "
               f"--out {_q(out / 'latents')}")
        return line, [cmd], {"count": len(store), "latent_shape": [hh, ww, c], "dtype": store.dtype.name,
                             "resolution": R, "dir": "latents"}

    rec.run("latents", f"latents: encode the training images at {R}x{R} into a latent store", step_latents)
    c = summary["latents"]["latent_shape"][2]
    K = codec.num_codewords

    # ---- budget --------------------------------------------------------------------------------------------
    n_real = len(state["real_pool"])
    do_fid = cfg.num_samples >= cfg.fid_min_samples and n_real >= cfg.fid_min_samples
    plan = plan_budget(deadline - time.monotonic(), variants=variants, num_samples=cfg.num_samples,
                       preset=cfg.preset, latent_side=h, sample_steps=cfg.sample_steps, fid=do_fid,
                       patch_size=S)
    summary["budget"] = {**plan, "elapsed_before_training_s": round(time.monotonic() - t0, 1)}
    if plan["over_budget"] and cfg.train_steps is None:
        print(f"    note: {_fmt_s(time.monotonic() - t0)} used before training; the demo will run over "
              f"--minutes {cfg.minutes:g} (minimum training times)", flush=True)

    # ---- 6. train ------------------------------------------------------------------------------------------
    def make_train_step(variant: str):
        def step():
            from mbldm.diffusion.training import TrainConfig, train
            from mbldm.demo.figures import read_metrics

            run_dir = out / ("run" if variant == "continuous" else "run_categorical")
            out_ch = c if variant == "continuous" else c * K
            later = sum(plan["train_s"][v] for v in variants[variants.index(variant) + 1:])
            left = deadline - time.monotonic() - plan["reserve_s"] - plan["refiner_s"] - later
            seconds = max(MIN_TRAIN_S, min(plan["train_s"][variant], left))  # an earlier overrun shrinks it
            if cfg.train_steps is not None:
                steps, max_minutes = cfg.train_steps, None
            else:
                per_step = _seconds_per_step(cfg.preset, 2 * c, out_ch, h, cfg.batch_size, forwards=2)
                steps, max_minutes = _steps_for(seconds, per_step), seconds / 60.0
            lr = 3e-4 if cfg.preset == "tiny" else 2e-4
            warmup = min(100, max(1, steps // 10))
            log_every = max(1, min(10, steps // 20))
            tc = TrainConfig(latents=str(out / "latents"), out=str(run_dir), steps=steps, preset=cfg.preset,
                             variant=variant, batch_size=cfg.batch_size, lr=lr, lr_warmup_steps=warmup,
                             checkpoint_every=10**9, keep_checkpoints=1, log_every=log_every, seed=cfg.seed,
                             max_minutes=max_minutes, progress=cfg.progress)
            start = time.monotonic()
            train(tc)
            seconds_used = time.monotonic() - start
            rows = read_metrics(run_dir / "metrics.jsonl")
            run_cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            from mbldm.diffusion.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(run_dir / "checkpoints")
            done = int(ckpt.name.split("_")[-1]) if ckpt is not None else (rows[-1]["step"] if rows else 0)
            first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (float("nan"), float("nan"))
            params = run_cfg.get("num_parameters")
            line = (f"{variant} {cfg.preset} U-Net ({params:,} parameters): {done:,} steps of batch "
                    f"{cfg.batch_size} in {_fmt_s(seconds_used)}, loss {first:.4f} -> {last:.4f}")
            cmd = (f"mbldm train --latents {_q(out / 'latents')} --out {_q(run_dir)} --steps {done} --preset "
                   f"{cfg.preset} --variant {variant} --batch-size {cfg.batch_size} --lr {lr:g} --lr-warmup-steps "
                   f"{warmup} --checkpoint-every {10**9} --keep-checkpoints 1 --log-every {log_every} "
                   f"--seed {cfg.seed}")
            numbers = {"dir": run_dir.name, "preset": cfg.preset, "parameters": params, "steps_done": done,
                       "steps_planned": steps, "budget_s": round(seconds, 1), "seconds": round(seconds_used, 1),
                       "batch_size": cfg.batch_size, "lr": lr, "first_loss": first, "last_loss": last,
                       "steps_per_s": done / seconds_used if seconds_used > 0 else None,
                       "note": "--steps is the number of steps the time budget allowed; training is deterministic "
                               "per (seed, step), so this command reproduces the run"}
            return line, [cmd], numbers

        return step

    for variant in variants:
        source = "Eq. 4, §4.2.2" if variant == "continuous" else "Eq. 24, §4.2.3"
        rec.run(f"train_{variant}", f"train: {variant} variant ({source})", make_train_step(variant))

    # ---- 7. refiner ----------------------------------------------------------------------------------------
    def step_refiner():
        from mbldm.diffusion.refiner import RefinerConfig, train_refiner

        crop = max(16, R // 2)  # the refiner is convolutional: small crops train it ~4x faster per image
        if cfg.refiner_steps is not None:
            steps, max_minutes = cfg.refiner_steps, None
        else:
            remaining = deadline - time.monotonic() - plan["reserve_s"]
            seconds = max(MIN_REFINER_S, min(plan["refiner_s"], remaining))
            per_step = 1.5 * _seconds_per_step("refiner", 3, 3, crop, cfg.refiner_batch_size, forwards=1)  # + data
            steps, max_minutes = _steps_for(seconds, per_step), seconds / 60.0
        eval_images = 4 if cfg.train_steps is None else 2
        rc = RefinerConfig(codec=str(out / "codec"), data=str(state["train_data"]), out=str(out / "refiner"),
                           resolution=R, crop_size=crop, steps=steps, batch_size=cfg.refiner_batch_size,
                           seed=cfg.seed, eval_images=eval_images, max_minutes=max_minutes, log_every=10)
        ref_dir = train_refiner(rc, progress=cfg.progress)
        facts = json.loads((ref_dir / "config.json").read_text(encoding="utf-8"))
        ev = json.loads((ref_dir / "eval.json").read_text(encoding="utf-8"))
        worst, clean = ev["results"][-1], ev["results"][0]
        line = (f"{facts['steps_done']:,} steps ({facts['parameters']:,} parameters); held-out PSNR at index noise "
                f"{worst['noise_std']:g}: {worst['psnr_before']:.2f} -> {worst['psnr_after']:.2f} dB, clean decodes: "
                f"{clean['psnr_before']:.2f} -> {clean['psnr_after']:.2f} dB")
        cmd = (f"mbldm refiner train --codec {_q(out / 'codec')} --data {_q(state['train_data'])} --out "
               f"{_q(out / 'refiner')} --resolution {R} --crop-size {crop} --steps {facts['steps_done']} "
               f"--batch-size {cfg.refiner_batch_size} --seed {cfg.seed} --eval-images {eval_images} --log-every 10")
        return line, [cmd], {"dir": "refiner", "steps_done": facts["steps_done"], "steps_planned": steps,
                             "parameters": facts["parameters"], "eval": ev["results"],
                             "seconds_training": ev.get("seconds_training")}

    rec.run("refiner", "refiner: image-space refiner on D(E(x) + noise) (§4.2.2)", step_refiner)

    # ---- 8. sample -----------------------------------------------------------------------------------------
    def step_sample():
        from mbldm.demo.figures import plot_trajectory, save_grid
        from mbldm.diffusion.sampling import TRAJECTORY_T, sample
        from mbldm.io.images import load_image

        numbers, commands, parts = {}, [], []
        for variant in variants:
            run_dir = out / ("run" if variant == "continuous" else "run_categorical")
            sample_dir = out / ("samples" if variant == "continuous" else "samples_categorical")
            refiner = out / "refiner" if variant == "continuous" else None
            res = sample(run_dir, cfg.num_samples, out_dir=sample_dir, sampler="ddim", steps=cfg.sample_steps,
                         seed=cfg.seed, batch_size=min(64, cfg.num_samples), refiner=refiner,
                         progress=cfg.progress, trajectory=list(TRAJECTORY_T))
            s = res["summary"]
            grid_name = f"grid_{variant}.png"
            shutil.copyfile(res["grid"], files / grid_name)
            summary["figures"][f"grid_{variant}"] = f"report_files/{grid_name}"
            if refiner is not None:
                raw = np.stack([load_image(sample_dir / "raw" / f"img_{i:06d}.png")
                                for i in range(min(cfg.num_samples, 64))])
                save_grid(raw, files / f"grid_{variant}_raw.png")
                summary["figures"][f"grid_{variant}_raw"] = f"report_files/grid_{variant}_raw.png"
            traj = res["trajectory"]  # decoded frames of every image, before the refiner
            plot_trajectory(traj["t"], traj["x_t"][0], traj["x0"][0], files / f"trajectory_{variant}.png",
                            title=f"{variant} variant, DDIM {cfg.sample_steps} steps, image 0 (seed {cfg.seed}), "
                                  "before the refiner")
            summary["figures"][f"trajectory_{variant}"] = f"report_files/trajectory_{variant}.png"
            numbers[variant] = {"dir": sample_dir.name, "count": s["count"], "image_size": s["image_size"],
                                "sampler": s["sampler"], "steps": s["steps"], "seconds": s["seconds"],
                                "refiner": refiner is not None, "trajectory_t": traj["t"], "seed": cfg.seed}
            commands.append(f"mbldm sample --run {_q(run_dir)} --num {cfg.num_samples} --out {_q(sample_dir)} "
                            f"--sampler ddim --steps {cfg.sample_steps} --seed {cfg.seed} --batch-size "
                            f"{min(64, cfg.num_samples)} --trajectory"
                            + (f" --refiner {_q(refiner)}" if refiner is not None else ""))
            parts.append(f"{variant}: {s['count']} images {s['image_size'][0]}x{s['image_size'][1]} in "
                         f"{s['seconds']:.1f} s")
        line = "; ".join(parts) + f" (DDIM {cfg.sample_steps} steps)"
        return line, commands, numbers

    rec.run("samples", f"sample: {cfg.num_samples} images per variant, DDIM {cfg.sample_steps} steps, refiner "
            "on the continuous ones; trajectory t = 1000..0 (Fig. 7)", step_sample)

    # ---- 9. fid --------------------------------------------------------------------------------------------
    def step_fid():
        if not do_fid:
            reason = (f"skipped: {cfg.num_samples} samples and {n_real} real images; FID needs at least "
                      f"{cfg.fid_min_samples} of each (fid_min_samples; more --minutes give more samples)")
            return reason, [], {"skipped": reason}
        import warnings

        from mbldm.data.datasets import resize_center_crop
        from mbldm.eval.fid import fid
        from mbldm.io.images import load_image, save_png

        real_dir = out / "fid_real"
        n = min(cfg.num_samples, n_real)
        for i, p in enumerate(state["real_pool"][:n]):
            save_png(real_dir / f"real_{i:06d}.png", resize_center_crop(load_image(p), R), overwrite=True)
        numbers, commands, parts = {}, [], []
        stats = out / "fid_real_stats.npz"
        commands.append(f"# fid_real: {n} {'crops' if cfg.data is None else 'random images of ' + str(cfg.data)} "
                        f"at {R}x{R} (written by `mbldm demo`)")
        for variant in variants:
            sample_dir = out / summary["samples"][variant]["dir"]
            fake_dir = out / ("fid_fake" if variant == "continuous" else "fid_fake_categorical")
            collect_samples(sample_dir, fake_dir)
            real = stats if stats.exists() else real_dir
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fid(real, fake_dir, save_stats=None if stats.exists() else stats,
                          batch_size=cfg.fid_batch_size, progress=cfg.progress)
            numbers[variant] = {**res, "n_real": res["n_real"] if res["n_real"] is not None else n}
            parts.append(f"{variant} {res['fid']:.2f}")
            commands += [f"mkdir -p {_q(fake_dir)} && cp {_q(sample_dir)}/img_*.png {_q(fake_dir)}/",
                         f"mbldm fid --real {_q(real_dir)} --fake {_q(fake_dir)} --json {_q(out / 'fid.json')} "
                         "--overwrite"]
        from mbldm.io.atomic import write_json

        write_json(out / "fid.json", numbers)
        line = f"FID {', '.join(parts)} ({n} real vs {cfg.num_samples} generated; biased upwards at N < 2048)"
        return line, commands, numbers

    rec.run("fid", "fid: Fréchet Inception Distance (Eq. 1) against real images", step_fid)

    # ---- 10. report ----------------------------------------------------------------------------------------
    def step_report():
        from mbldm.demo.figures import plot_loss_curves, read_metrics
        from mbldm.demo.report import write_report

        curves = [("continuous diffusion (Eq. 4, min-SNR)", read_metrics(out / "run" / "metrics.jsonl"),
                   ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"))]
        if "categorical" in variants:
            curves.append(("categorical diffusion (Eq. 24)", read_metrics(out / "run_categorical" / "metrics.jsonl"),
                           ("loss", "loss_img", "loss_eps")))
        curves.append(("refiner (L1 + SSIM)", read_metrics(out / "refiner" / "metrics.jsonl"), ("loss",)))
        try:
            plot_loss_curves(curves, files / "loss.png")
            summary["figures"]["loss"] = "report_files/loss.png"
        except ValueError:
            pass  # no metrics rows at all (a tiny test run)
        summary["total_seconds"] = round(time.monotonic() - t0, 1)
        summary["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        summary["rerun"] = (f"mbldm sample --run {_q(out / 'run')} --num 16 --out {_q(out / 'samples_again')} "
                            f"--refiner {_q(out / 'refiner')}")
        path = write_report(summary, out)
        return f"{path}", [], {"path": "report.html"}

    rec.run("report", "report: report.html with tables, figures and the commands", step_report)
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    rec.save()
    from mbldm.demo.report import write_report

    path = write_report(summary, out)  # again, with the report step's own time in the table
    print(f"done in {_fmt_s(summary['total_seconds'])}: {path}", flush=True)
    return path
