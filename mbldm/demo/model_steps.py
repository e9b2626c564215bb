"""Steps 6 to 9 of ``mbldm demo``, the generative half of the paper: train the latent diffusion model(s) (§4.2.2,
§4.2.3) and the image-space refiner (§4.2.2) within the time budget, sample them (DDIM, with one trajectory
t = 1000..0 as Fig. 7) and score the samples with FID (Eq. 1) when there are enough of them.

Each step takes the :class:`~mbldm.demo.context.DemoContext` and returns ``(one-line summary, commands, numbers)``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mbldm.demo.budget import MIN_REFINER_S, MIN_TRAIN_S, seconds_per_step, steps_for
from mbldm.demo.context import DemoContext, format_seconds, quote

__all__ = ["step_train", "step_refiner", "step_sample", "step_fid", "collect_samples"]


def _run_dir(ctx: DemoContext, variant: str) -> Path:
    return ctx.out / ("run" if variant == "continuous" else "run_categorical")


def _train_budget(ctx: DemoContext, variant: str, c: int, out_ch: int) -> tuple[float, int, float | None]:
    """(seconds planned, step count, max_minutes) of training ``variant``; an earlier overrun shrinks it."""
    cfg, plan, variants = ctx.cfg, ctx.plan, ctx.variants
    later = sum(plan["train_s"][v] for v in variants[variants.index(variant) + 1:])
    left = ctx.deadline - time.monotonic() - plan["reserve_s"] - plan["refiner_s"] - later
    seconds = max(MIN_TRAIN_S, min(plan["train_s"][variant], left))  # an earlier overrun shrinks it
    if cfg.train_steps is not None:
        return seconds, cfg.train_steps, None
    per_step = seconds_per_step(cfg.preset, 2 * c, out_ch, ctx.latent_side, cfg.batch_size, forwards=2)
    return seconds, steps_for(seconds, per_step), seconds / 60.0


def step_train(ctx: DemoContext, variant: str) -> tuple[str, list[str], dict]:
    """``train`` one variant into OUT/run (or OUT/run_categorical) for its share of the time budget."""
    from mbldm.demo.figures import read_metrics
    from mbldm.diffusion.checkpoint import latest_checkpoint
    from mbldm.diffusion.train_config import TrainConfig
    from mbldm.diffusion.training import train

    cfg, out = ctx.cfg, ctx.out
    run_dir = _run_dir(ctx, variant)
    c, K = ctx.summary["latents"]["latent_shape"][2], ctx.codec.num_codewords
    seconds, steps, max_minutes = _train_budget(ctx, variant, c, c if variant == "continuous" else c * K)
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
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    done = int(ckpt.name.split("_")[-1]) if ckpt is not None else (rows[-1]["step"] if rows else 0)
    first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (float("nan"), float("nan"))
    params = run_cfg.get("num_parameters")
    line = (f"{variant} {cfg.preset} U-Net ({params:,} parameters): {done:,} steps of batch "
            f"{cfg.batch_size} in {format_seconds(seconds_used)}, loss {first:.4f} -> {last:.4f}")
    cmd = (f"mbldm train --latents {quote(out / 'latents')} --out {quote(run_dir)} --steps {done} --preset "
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


def step_refiner(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """``refiner train`` into OUT/refiner for the refiner's share of the time budget."""
    from mbldm.diffusion.refiner import RefinerConfig, train_refiner

    cfg, out, R = ctx.cfg, ctx.out, ctx.resolution
    crop = max(16, R // 2)  # the refiner is convolutional: small crops train it ~4x faster per image
    if cfg.refiner_steps is not None:
        steps, max_minutes = cfg.refiner_steps, None
    else:
        remaining = ctx.deadline - time.monotonic() - ctx.plan["reserve_s"]
        seconds = max(MIN_REFINER_S, min(ctx.plan["refiner_s"], remaining))
        per_step = 1.5 * seconds_per_step("refiner", 3, 3, crop, cfg.refiner_batch_size, forwards=1)  # + data
        steps, max_minutes = steps_for(seconds, per_step), seconds / 60.0
    eval_images = 4 if cfg.train_steps is None else 2
    rc = RefinerConfig(codec=str(out / "codec"), data=str(ctx.train_data), out=str(out / "refiner"),
                       resolution=R, crop_size=crop, steps=steps, batch_size=cfg.refiner_batch_size,
                       seed=cfg.seed, eval_images=eval_images, max_minutes=max_minutes, log_every=10)
    ref_dir = train_refiner(rc, progress=cfg.progress)
    facts = json.loads((ref_dir / "config.json").read_text(encoding="utf-8"))
    ev = json.loads((ref_dir / "eval.json").read_text(encoding="utf-8"))
    worst, clean = ev["results"][-1], ev["results"][0]
    line = (f"{facts['steps_done']:,} steps ({facts['parameters']:,} parameters); held-out PSNR at index noise "
            f"{worst['noise_std']:g}: {worst['psnr_before']:.2f} -> {worst['psnr_after']:.2f} dB, clean decodes: "
            f"{clean['psnr_before']:.2f} -> {clean['psnr_after']:.2f} dB")
    cmd = (f"mbldm refiner train --codec {quote(out / 'codec')} --data {quote(ctx.train_data)} --out "
           f"{quote(out / 'refiner')} --resolution {R} --crop-size {crop} --steps {facts['steps_done']} "
           f"--batch-size {cfg.refiner_batch_size} --seed {cfg.seed} --eval-images {eval_images} --log-every 10")
    return line, [cmd], {"dir": "refiner", "steps_done": facts["steps_done"], "steps_planned": steps,
                         "parameters": facts["parameters"], "eval": ev["results"],
                         "seconds_training": ev.get("seconds_training")}


def step_sample(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """DDIM samples of every variant (refined for the continuous one), their grids and one trajectory each."""
    numbers, commands, parts = {}, [], []
    for variant in ctx.variants:
        numbers[variant], command = _sample_variant(ctx, variant)
        commands.append(command)
        s = numbers[variant]
        parts.append(f"{variant}: {s['count']} images {s['image_size'][0]}x{s['image_size'][1]} in "
                     f"{s['seconds']:.1f} s")
    line = "; ".join(parts) + f" (DDIM {ctx.cfg.sample_steps} steps)"
    return line, commands, numbers


def _sample_variant(ctx: DemoContext, variant: str) -> tuple[dict, str]:
    """``sample`` one variant into OUT/samples (or OUT/samples_categorical); its numbers and command."""
    from mbldm.demo.figures import plot_trajectory, save_grid
    from mbldm.diffusion.reverse_process import TRAJECTORY_T
    from mbldm.diffusion.sampling import sample
    from mbldm.io.images import load_image

    cfg, out, files = ctx.cfg, ctx.out, ctx.files
    run_dir = _run_dir(ctx, variant)
    sample_dir = out / ("samples" if variant == "continuous" else "samples_categorical")
    refiner = out / "refiner" if variant == "continuous" else None
    res = sample(run_dir, cfg.num_samples, out_dir=sample_dir, sampler="ddim", steps=cfg.sample_steps,
                 seed=cfg.seed, batch_size=min(64, cfg.num_samples), refiner=refiner,
                 progress=cfg.progress, trajectory=list(TRAJECTORY_T))
    s = res["summary"]
    grid_name = f"grid_{variant}.png"
    shutil.copyfile(res["grid"], files / grid_name)
    ctx.add_figure(f"grid_{variant}", grid_name)
    if refiner is not None:
        raw = np.stack([load_image(sample_dir / "raw" / f"img_{i:06d}.png")
                        for i in range(min(cfg.num_samples, 64))])
        save_grid(raw, files / f"grid_{variant}_raw.png")
        ctx.add_figure(f"grid_{variant}_raw", f"grid_{variant}_raw.png")
    traj = res["trajectory"]  # decoded frames of every image, before the refiner
    plot_trajectory(traj["t"], traj["x_t"][0], traj["x0"][0], files / f"trajectory_{variant}.png",
                    title=f"{variant} variant, DDIM {cfg.sample_steps} steps, image 0 (seed {cfg.seed}), "
                          "before the refiner")
    ctx.add_figure(f"trajectory_{variant}", f"trajectory_{variant}.png")
    numbers = {"dir": sample_dir.name, "count": s["count"], "image_size": s["image_size"],
               "sampler": s["sampler"], "steps": s["steps"], "seconds": s["seconds"],
               "refiner": refiner is not None, "trajectory_t": traj["t"], "seed": cfg.seed}
    command = (f"mbldm sample --run {quote(run_dir)} --num {cfg.num_samples} --out {quote(sample_dir)} "
               f"--sampler ddim --steps {cfg.sample_steps} --seed {cfg.seed} --batch-size "
               f"{min(64, cfg.num_samples)} --trajectory"
               + (f" --refiner {quote(refiner)}" if refiner is not None else ""))
    return numbers, command


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


def step_fid(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """FID of every variant's samples against N real images at R x R (OUT/fid.json), or why it is skipped."""
    cfg, out = ctx.cfg, ctx.out
    n_real = len(ctx.real_pool)
    if not ctx.do_fid:
        reason = (f"skipped: {cfg.num_samples} samples and {n_real} real images; FID needs at least "
                  f"{cfg.fid_min_samples} of each (fid_min_samples; more --minutes give more samples)")
        return reason, [], {"skipped": reason}
    from mbldm.io.atomic import write_json

    real_dir = out / "fid_real"
    n = min(cfg.num_samples, n_real)
    _write_real_images(ctx, real_dir, n)
    numbers, commands, parts = {}, [], []
    commands.append(f"# fid_real: {n} {'crops' if cfg.data is None else 'random images of ' + str(cfg.data)} "
                    f"at {ctx.resolution}x{ctx.resolution} (written by `mbldm demo`)")
    for variant in ctx.variants:
        numbers[variant], variant_commands = _fid_variant(ctx, variant, real_dir, n)
        parts.append(f"{variant} {numbers[variant]['fid']:.2f}")
        commands += variant_commands
    write_json(out / "fid.json", numbers)
    line = f"FID {', '.join(parts)} ({n} real vs {cfg.num_samples} generated; biased upwards at N < 2048)"
    return line, commands, numbers


def _write_real_images(ctx: DemoContext, real_dir: Path, n: int) -> None:
    """The first ``n`` images of the real pool at R x R (short side resized, centre crop) as PNGs."""
    from mbldm.data.datasets import resize_center_crop
    from mbldm.io.images import load_image, save_png

    for i, p in enumerate(ctx.real_pool[:n]):
        save_png(real_dir / f"real_{i:06d}.png", resize_center_crop(load_image(p), ctx.resolution), overwrite=True)


def _fid_variant(ctx: DemoContext, variant: str, real_dir: Path, n: int) -> tuple[dict, list[str]]:
    """FID of one variant's samples (the real statistics are computed once and reused); numbers and commands."""
    import warnings

    from mbldm.eval.fid import fid

    cfg, out = ctx.cfg, ctx.out
    stats = out / "fid_real_stats.npz"
    sample_dir = out / ctx.summary["samples"][variant]["dir"]
    fake_dir = out / ("fid_fake" if variant == "continuous" else "fid_fake_categorical")
    collect_samples(sample_dir, fake_dir)
    real = stats if stats.exists() else real_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fid(real, fake_dir, save_stats=None if stats.exists() else stats,
                  batch_size=cfg.fid_batch_size, progress=cfg.progress)
    numbers = {**res, "n_real": res["n_real"] if res["n_real"] is not None else n}
    commands = [f"mkdir -p {quote(fake_dir)} && cp {quote(sample_dir)}/img_*.png {quote(fake_dir)}/",
                f"mbldm fid --real {quote(real_dir)} --fake {quote(fake_dir)} --json {quote(out / 'fid.json')} "
                "--overwrite"]
    return numbers, commands
