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

Modules: settings :mod:`mbldm.demo.config`, time budget :mod:`mbldm.demo.budget`, step 1
:mod:`mbldm.demo.data`, steps 2-5 :mod:`mbldm.demo.codec_steps`, steps 6-9 :mod:`mbldm.demo.model_steps`, the
state they share :mod:`mbldm.demo.context`; this module runs them in order, times them and writes the report.

CPU threads: ``threads=None`` uses the free cores, ``cpus - round(1-min load average)``, at least 1 (on a shared,
busy machine one thread per process is several times faster than oversubscribed threads: measured 13x for the
tiny U-Net's training step, 4x for the FID's 2048 x 2048 eigendecompositions). The limit applies to torch, to the
OpenMP runtime it shares with faiss and to numpy's OpenBLAS (``threadpoolctl``); it is lifted at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mbldm.demo.budget import MIN_REFINER_S, MIN_TRAIN_S, plan_budget  # noqa: F401 (MIN_*: re-exported)
from mbldm.demo.codec_steps import step_bench, step_codec, step_latents, step_ordering
from mbldm.demo.config import FID_MIN_SAMPLES, DemoConfig, demo_command, hidden_settings
from mbldm.demo.context import PATCH_SIZE, DemoContext, format_seconds, quote
from mbldm.demo.data import copy_files as _copy_files  # noqa: F401 (re-exported under its name before the split)
from mbldm.demo.data import step_data
from mbldm.demo.model_steps import collect_samples, step_fid, step_refiner, step_sample, step_train

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
#: Entries of OUT that the demo writes; ``overwrite=True`` removes exactly these (nothing else in OUT).
DEMO_ENTRIES = ("data", "crops", "codec", "bench.json", "latents", "run", "run_categorical", "refiner", "samples",
                "samples_categorical", "fid_real", "fid_fake", "fid_fake_categorical", "fid_real_stats.npz",
                "fid.json", "report_files", "report.html", "demo.json")


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
        print(f"    -> {line} ({format_seconds(seconds)}, CPU {format_seconds(cpu)})", flush=True)
        self.summary["steps"].append({"name": name, "title": title, "seconds": round(seconds, 2),
                                      "cpu_seconds": round(cpu, 2), "summary": line, "commands": commands})
        self.summary[name] = numbers
        self.save()
        return numbers

    def save(self) -> None:
        from mbldm.io.atomic import write_json

        write_json(self.out / "demo.json", self.summary)



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
    variants = ("continuous", "categorical") if cfg.variant == "both" else ("continuous",)
    summary = _initial_summary(cfg, out, threads, load_start, variants)
    rec = _Recorder(out, summary, 9 + len(variants))
    ctx = DemoContext(cfg=cfg, out=out, summary=summary, t0=t0, deadline=deadline, variants=variants,
                      rng=np.random.default_rng(cfg.seed))
    ctx.files.mkdir(parents=True, exist_ok=True)
    R = cfg.resolution

    rec.run("data", "data: images for the codec, the benchmark and generative training", lambda: step_data(ctx))
    rec.run("codec", f"codec: fit {cfg.spec} (§3.1, one FAISS quantizer per YCbCr channel)", lambda: step_codec(ctx))
    rec.run("bench", "bench: Table 1 on held-out images, JPEG at the same bits per pixel", lambda: step_bench(ctx))
    rec.run("ordering", "ordering: Fig. 3, the effect of index + 1 before and after the PCA ordering (§3.2.1)",
            lambda: step_ordering(ctx))
    rec.run("latents", f"latents: encode the training images at {R}x{R} into a latent store",
            lambda: step_latents(ctx))
    _plan(ctx)
    for variant in variants:
        source = "Eq. 4, §4.2.2" if variant == "continuous" else "Eq. 24, §4.2.3"
        rec.run(f"train_{variant}", f"train: {variant} variant ({source})", functools.partial(step_train, ctx, variant))
    rec.run("refiner", "refiner: image-space refiner on D(E(x) + noise) (§4.2.2)", lambda: step_refiner(ctx))
    rec.run("samples", f"sample: {cfg.num_samples} images per variant, DDIM {cfg.sample_steps} steps, refiner "
            "on the continuous ones; trajectory t = 1000..0 (Fig. 7)", lambda: step_sample(ctx))
    rec.run("fid", "fid: Fréchet Inception Distance (Eq. 1) against real images", lambda: step_fid(ctx))
    rec.run("report", "report: report.html with tables, figures and the commands", lambda: _step_report(ctx))
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    rec.save()
    from mbldm.demo.report import write_report

    path = write_report(summary, out)  # again, with the report step's own time in the table
    print(f"done in {format_seconds(summary['total_seconds'])}: {path}", flush=True)
    return path


def _initial_summary(cfg: DemoConfig, out: Path, threads: int, load_start: float | None,
                     variants: tuple[str, ...]) -> dict[str, Any]:
    """demo.json before the first step: the command, settings, machine and automatic choices."""
    import torch

    return {
        "format": FORMAT, "version": VERSION,
        "command": cfg.command or demo_command(cfg),
        "hidden_settings": hidden_settings(cfg),
        "config": dataclasses.asdict(cfg),
        "out": str(out.resolve()),
        "machine": {"cpus": os.cpu_count(), "threads": threads, "load_average_start": load_start,
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]},
        "choices": {"resolution": cfg.resolution, "latent_shape": None, "preset": cfg.preset,
                    "num_samples": cfg.num_samples, "sample_steps": cfg.sample_steps,
                    "fid_min_samples": cfg.fid_min_samples, "variants": list(variants)},
        "steps": [], "figures": {},
    }


def _plan(ctx: DemoContext) -> None:
    """Split the time left after the codec steps (:func:`plan_budget`); decide whether FID is computed."""
    cfg = ctx.cfg
    n_real = len(ctx.real_pool)
    ctx.do_fid = cfg.num_samples >= cfg.fid_min_samples and n_real >= cfg.fid_min_samples
    ctx.plan = plan_budget(ctx.deadline - time.monotonic(), variants=ctx.variants, num_samples=cfg.num_samples,
                           preset=cfg.preset, latent_side=ctx.latent_side, sample_steps=cfg.sample_steps,
                           fid=ctx.do_fid, patch_size=PATCH_SIZE)
    ctx.summary["budget"] = {**ctx.plan, "elapsed_before_training_s": round(time.monotonic() - ctx.t0, 1)}
    if ctx.plan["over_budget"] and cfg.train_steps is None:
        print(f"    note: {format_seconds(time.monotonic() - ctx.t0)} used before training; the demo will run over "
              f"--minutes {cfg.minutes:g} (minimum training times)", flush=True)


def _step_report(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """Step 10: the loss curves figure, then OUT/report.html."""
    from mbldm.demo.figures import plot_loss_curves, read_metrics
    from mbldm.demo.report import write_report

    out, summary = ctx.out, ctx.summary
    curves = [("continuous diffusion (Eq. 4, min-SNR)", read_metrics(out / "run" / "metrics.jsonl"),
               ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"))]
    if "categorical" in ctx.variants:
        curves.append(("categorical diffusion (Eq. 24)", read_metrics(out / "run_categorical" / "metrics.jsonl"),
                       ("loss", "loss_img", "loss_eps")))
    curves.append(("refiner (L1 + SSIM)", read_metrics(out / "refiner" / "metrics.jsonl"), ("loss",)))
    try:
        plot_loss_curves(curves, ctx.files / "loss.png")
        ctx.add_figure("loss", "loss.png")
    except ValueError:
        pass  # no metrics rows at all (a tiny test run)
    summary["total_seconds"] = round(time.monotonic() - ctx.t0, 1)
    summary["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    summary["rerun"] = (f"mbldm sample --run {quote(out / 'run')} --num 16 --out {quote(out / 'samples_again')} "
                        f"--refiner {quote(out / 'refiner')}")
    path = write_report(summary, out)
    return f"{path}", [], {"path": "report.html"}
