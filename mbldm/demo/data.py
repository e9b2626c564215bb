"""Step 1 of ``mbldm demo``, the data: the images that fit the codec, those held out for the benchmark, and the
generative training set.

Without ``--data``, the real colour photographs bundled in scikit-image / scikit-learn / matplotlib
(:mod:`mbldm.demo.sample_images`) are written to ``OUT/data/{fit,heldout}`` and ``num_crops`` random square crops
(side 1.5R..2.5R, random left-right flip, resized to R x R with ``resize_center_crop``) to ``OUT/crops``, the
generative training set. With ``--data DIR``, a seeded random subset of DIR (``codec_images`` files) is copied to
``OUT/data/fit`` and ``bench_images`` other files to ``OUT/data/heldout``; the generative model trains on every
image of DIR.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mbldm.demo.context import DemoContext

__all__ = ["step_data", "copy_files", "random_crops"]


def step_data(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """Prepare the data (module docstring); set ``ctx.train_data``, ``ctx.real_pool`` and ``ctx.bench_dir``."""
    if ctx.cfg.data is None:
        return _bundled_data(ctx)
    return _folder_data(ctx)


def _bundled_data(ctx: DemoContext) -> tuple[str, list[str], dict]:
    from mbldm.demo.sample_images import write_bundled_photos
    from mbldm.io.images import load_image

    cfg, out, R = ctx.cfg, ctx.out, ctx.resolution
    fit_dir, held_dir = out / "data" / "fit", out / "data" / "heldout"
    written = write_bundled_photos(out / "data", max_side=cfg.photo_max_side)
    photos = [{"name": p.name, "package": p.package, "source": str(p.path), "role": p.role,
               "file": str(path.relative_to(out)), "size": list(load_image(path).shape[:2])}
              for p, path in written]
    images = [load_image(path) for _, path in written]
    crops = random_crops(images, cfg.num_crops, R, ctx.rng, out / "crops", cfg.progress)
    ctx.train_data, ctx.real_pool = out / "crops", crops
    ctx.bench_dir = held_dir if held_dir.is_dir() else fit_dir
    n_fit = sum(p["role"] == "fit" for p in photos)
    line = (f"{len(photos)} bundled photos ({n_fit} fit the codec, {len(photos) - n_fit} held out) -> "
            f"{len(crops)} random crops {R}x{R} in {out / 'crops'}")
    numbers = {"mode": "bundled", "photos": photos, "crops": len(crops), "training_images": len(crops),
               "crop_rule": "side ~ U[1.5R, 2.5R] (<= short side), random position, 50% left-right flip, "
                            "resized to R x R"}
    commands = ["# data: bundled photos -> OUT/data/{fit,heldout}/*.png and random crops -> OUT/crops "
                "(done by `mbldm demo` itself)"]
    return line, commands, numbers


def _folder_data(ctx: DemoContext) -> tuple[str, list[str], dict]:
    from mbldm.io.images import scan_images

    cfg, out, R, rng = ctx.cfg, ctx.out, ctx.resolution, ctx.rng
    fit_dir, held_dir = out / "data" / "fit", out / "data" / "heldout"
    root = Path(cfg.data)
    paths = scan_images(root)
    if len(paths) < 3:
        raise ValueError(f"{root}: the demo needs at least 3 images (codec, benchmark, training), found "
                         f"{len(paths)}")
    perm = [paths[i] for i in rng.permutation(len(paths))]
    n_fit = min(cfg.codec_images, len(paths) - 1)
    n_bench = max(1, min(cfg.bench_images, len(paths) - n_fit))
    fit = copy_files(sorted(perm[:n_fit]), root, fit_dir)
    held = copy_files(sorted(perm[n_fit:n_fit + n_bench]), root, held_dir)
    ctx.train_data, ctx.real_pool, ctx.bench_dir = root, perm, held_dir
    line = (f"{len(paths)} images in {root}: {len(fit)} copied to fit the codec, {len(held)} held out for "
            f"the benchmark; all {len(paths)} train the diffusion model at {R}x{R}")
    numbers = {"mode": "folder", "folder": str(root.resolve()), "images": len(paths), "fit": len(fit),
               "heldout": len(held), "training_images": len(paths)}
    commands = [f"# data: {n_fit} random files of {root} -> OUT/data/fit, {len(held)} -> OUT/data/heldout "
                "(done by `mbldm demo` itself)"]
    return line, commands, numbers


def copy_files(paths: Sequence[Path], root: Path, dest: Path) -> list[Path]:
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


def random_crops(photos: Sequence[np.ndarray], n: int, resolution: int, rng: np.random.Generator,
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
