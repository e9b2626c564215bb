"""The run directory of a training run (shared contract 6): where to resume, the exported EMA model and the
metrics log, each written atomically::

    RUN/config.json   resolved TrainConfig + derived fields (latent_shape, num_codewords, ...)
    RUN/codec/        copy of the store's codec
    RUN/metrics.jsonl one JSON object per logged step
    RUN/checkpoints/step_XXXXXXX/  full resume state (:mod:`mbldm.diffusion.checkpoint`)
    RUN/model/        EMA weights only, ``UNet2DModel.save_pretrained`` (refreshed at every checkpoint)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mbldm.diffusion.train_config import TrainConfig

__all__ = [
    "find_resume_checkpoint",
    "write_run_config",
    "export_ema_model",
    "truncate_metrics",
    "append_metrics",
    "metrics_row",
]


def find_resume_checkpoint(config: TrainConfig, run: Path) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), refusing to start over an existing run."""
    from mbldm.diffusion import checkpoint as ckpt

    ckpt_root = run / "checkpoints"
    if config.resume is None:
        if (run / "config.json").exists() or ckpt.list_checkpoints(ckpt_root):
            raise FileExistsError(f"{run}: already holds a training run; pass --resume latest to continue it, "
                                  f"or choose another --out")
        return None
    if config.resume == "latest":
        return ckpt.latest_checkpoint(ckpt_root)
    path = Path(config.resume)
    ckpt.read_checkpoint_state(path)  # raises if not a complete checkpoint
    return path


def copy_dir_atomic(src: Path, dest: Path) -> None:
    """Copy folder ``src`` to ``dest`` (absent) through a temporary sibling and one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` onto ``dest`` (replacing it) with renames only."""
    old = None
    if dest.exists():
        old = dest.parent / f".tmp-old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_run_config(run: Path, config: TrainConfig, derived: dict, codec_dir: Path) -> None:
    """Create ``run``, write RUN/config.json (config + derived fields) and copy the codec (once) to RUN/codec."""
    from mbldm.io.atomic import write_json

    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", {**config.to_dict(), **derived})
    if not (run / "codec").exists():
        copy_dir_atomic(codec_dir, run / "codec")


def export_ema_model(model, ema, dest: Path) -> Path:
    """Write the EMA weights as ``UNet2DModel.save_pretrained(dest, safe_serialization=True)`` atomically.

    A fresh model is built from ``model.config`` and receives the EMA weights, so the live model is untouched.
    """
    fresh = type(model).from_config(model.config)
    ema.copy_to(fresh.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def truncate_metrics(file: Path, step: int) -> None:
    """Keep only the metrics lines with ``step <= step`` (after resuming from a checkpoint at ``step``)."""
    from mbldm.io.atomic import write_text

    if not file.exists():
        return
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    write_text(file, "".join(s + "\n" for s in kept))


def append_metrics(file: Path, row: dict) -> None:
    """Append one line to metrics.jsonl and flush it to disk (a killed run loses at most a torn last line)."""
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def metrics_row(step: int, stats: list, T: int, lr: float, steps_per_s: float, elapsed: float,
                 categorical: bool) -> dict:
    """Aggregate gathered per-image rows [loss, t, img, eps(, nll)] of the last steps into one metrics.jsonl line
    (categorical runs: ``loss_img`` and ``loss_eps``, the weighted Eq. 24 terms, and ``loss_nll``, the weighted
    negative log-likelihood, when the rows have it)."""
    import torch

    from mbldm.diffusion import schedule

    s = torch.cat(stats)  # (N, 4) or (N, 5)
    loss, t = s[:, 0], s[:, 1].long()
    q = torch.as_tensor(schedule.timestep_quartile(t, T)).long()
    row: dict[str, Any] = {"step": step, "loss": float(loss.mean())}
    for k in range(4):
        sel = q == k
        row[f"loss_q{k}"] = float(loss[sel].mean()) if bool(sel.any()) else None
    if categorical:
        row["loss_img"] = float(s[:, 2].mean())
        row["loss_eps"] = float(s[:, 3].mean())
        if s.shape[1] > 4:
            row["loss_nll"] = float(s[:, 4].mean())
    row.update(lr=lr, steps_per_s=steps_per_s, elapsed_s=round(elapsed, 3))
    return row
