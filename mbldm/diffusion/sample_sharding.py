"""Sampling across the processes of an Accelerate / torchrun launch: :func:`sample_sharded` gives process r of n a
contiguous block of the global image indices (each image from its own seed, so the files are those of a
single-process run), and :func:`merge_sample_shards` joins the per-process summaries into ``samples.json`` and
``grid.png``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbldm.diffusion.reverse_process import resolve_steps
from mbldm.diffusion.run_loading import read_trained_config
from mbldm.diffusion.sampling import (
    GRID_FILE,
    GRID_MAX_IMAGES,
    IMAGE_NAME,
    SHARD_SUMMARY_FILE,
    SUMMARY_FILE,
    check_indices,
    prepare_out_dir,
    make_grid,
    sample,
)

__all__ = ["sample_sharded", "merge_sample_shards"]

# Summary keys that may differ between the shards of one job (everything else must agree).
_PER_SHARD_KEYS = ("count", "indices", "seconds", "device", "grid_images", "shard")


def merge_sample_shards(out_dir: str | Path, num: int, num_processes: int) -> dict:
    """Join the shard summaries of a sharded job into ``samples.json`` and ``grid.png`` (process 0 calls this).

    Checks that the ``indices`` of the shard summaries ``SHARD_SUMMARY_FILE.format(r, num_processes)`` partition
    ``range(num)`` (no index missing or repeated), that every ``img_{i:06d}.png`` exists and that the shards used
    the same settings; then writes ``samples.json`` (the single-process summary with ``count = num``, plus
    ``num_processes`` and per-process ``shards`` entries: process index, count, first/last index, device,
    seconds), the grid of the first ``GRID_MAX_IMAGES`` images (read back from the PNGs) and removes the shard
    summaries.

    Returns:
        The merged summary (what ``samples.json`` holds).
    Raises:
        FileNotFoundError: no shard summary, or a missing image.  ValueError: indices missing / repeated, or
        shards whose settings differ (the message names the folder).
    """
    from mbldm.io.atomic import write_json
    from mbldm.io.images import load_image, save_png

    out = Path(out_dir)
    files = [out / SHARD_SUMMARY_FILE.format(r, num_processes) for r in range(num_processes)]
    shards = [json.loads(f.read_text(encoding="utf-8")) for f in files if f.is_file()]
    if not shards:
        raise FileNotFoundError(f"{out}: no shard summaries {SHARD_SUMMARY_FILE.format(0, num_processes)} ...; "
                                "did the sampling processes run?")
    seen = [int(i) for s in shards for i in s["indices"]]
    missing = sorted(set(range(num)) - set(seen))
    repeated = sorted(i for i, k in Counter(seen).items() if k > 1)
    extra = sorted(set(seen) - set(range(num)))
    if missing or repeated or extra:
        raise ValueError(f"{out}: the shards do not cover range({num}) exactly once: missing {missing[:10]}, "
                         f"repeated {repeated[:10]}, out of range {extra[:10]}")
    common = [{k: v for k, v in s.items() if k not in _PER_SHARD_KEYS} for s in shards]
    if any(c != common[0] for c in common[1:]):
        raise ValueError(f"{out}: the shard summaries disagree on the sampling settings; re-run the job")
    absent = [IMAGE_NAME.format(i) for i in range(num) if not (out / IMAGE_NAME.format(i)).is_file()]
    if absent:
        raise FileNotFoundError(f"{out}: {len(absent)} image(s) missing after sampling, e.g. {absent[:5]}")
    grid_imgs = [load_image(out / IMAGE_NAME.format(i)) for i in range(min(num, GRID_MAX_IMAGES))]
    save_png(out / GRID_FILE, make_grid(np.stack(grid_imgs)), overwrite=True)
    ordered = sorted(shards, key=lambda s: s["shard"][0])
    summary = {
        **{k: v for k, v in ordered[0].items() if k != "shard"},
        "count": int(num),
        "indices": list(range(num)),
        "grid_images": len(grid_imgs),
        "seconds": max(float(s["seconds"]) for s in shards),
        "num_processes": int(num_processes),
        "shards": [{"process_index": s["shard"][0], "count": s["count"], "first": min(s["indices"]),
                    "last": max(s["indices"]), "device": s["device"], "seconds": s["seconds"]} for s in ordered],
    }
    write_json(out / SUMMARY_FILE, summary)
    for f in files:
        f.unlink(missing_ok=True)
    return summary


def sample_sharded(run_dir: str | Path, num: int, out_dir: str | Path, *, overwrite: bool = False,
                   device: str | torch.device | None = None, progress: bool = True, **kwargs: Any) -> dict | None:
    """:func:`sample` split across the processes of an Accelerate / torchrun launch (``mbldm sample``).

    Process r of n produces the contiguous block ``mbldm.distributed.local_indices(num)`` of the global indices
    (no padding: exactly ``num`` images in all, none repeated, whatever n; a process may get none), each image
    from its own seed ``seed + i``, so the files are those of a single-process run. Every process checks
    ``out_dir`` before any of them writes into it; process 0 then merges the summaries
    (:func:`merge_sample_shards`). With one process this is exactly :func:`sample`.

    Args:
        run_dir, num, out_dir, overwrite, progress, **kwargs: as :func:`sample` (``indices`` and ``shard`` are
            chosen here). ``out_dir`` is required with several processes.
        device: torch device; default: this process's Accelerate device (``cuda:LOCAL_RANK``, or the CPU).

    Returns:
        On process 0: :func:`sample`'s result with the merged ``"summary"`` and ``"grid"``; on the other
        processes None (with several processes).
    Raises:
        As :func:`sample` and :func:`merge_sample_shards`; ValueError: ``out_dir`` None with several processes.
    """
    from mbldm import distributed as dist

    for key in ("indices", "shard"):
        if key in kwargs:
            raise ValueError(f"sample_sharded chooses {key!r} itself")
    n = dist.num_processes()
    if n == 1:
        return sample(run_dir, num, out_dir, overwrite=overwrite, device=device, progress=progress, **kwargs)
    if out_dir is None:
        raise ValueError("sampling with several processes needs an output folder (out_dir / --out)")
    check_indices(num, None)
    if Path(run_dir).is_dir():  # cheap checks before anything is written
        resolve_steps(kwargs.get("sampler", "ddim"), kwargs.get("steps"),
                      int(read_trained_config(Path(run_dir))["timesteps"]))
    r, out = dist.process_index(), Path(out_dir)
    prepare_out_dir(out, overwrite)  # on every process, before any process writes
    (out / SHARD_SUMMARY_FILE.format(r, n)).unlink(missing_ok=True)  # a stale summary of an earlier job
    dist.wait_for_everyone()
    mine = dist.local_indices(int(num))
    result = None
    if mine:
        result = sample(run_dir, num, out, indices=mine, device=device if device is not None else
                        dist.get_state().device, progress=progress and r == 0, overwrite=True, shard=(r, n), **kwargs)
    dist.wait_for_everyone()
    if r == 0:
        result["summary"] = merge_sample_shards(out, num, n)
        result["grid"] = out / GRID_FILE
    dist.wait_for_everyone()
    return result if r == 0 else None
