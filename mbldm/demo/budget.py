"""The time budget of ``mbldm demo``: how the wall time left after the codec steps is split between training, the
refiner and the reserved final steps (:func:`plan_budget`), and the step counts that cap a timed training run.

The constants are seconds, measured on one busy CPU core with DDIM 50 steps at 8x8 latents; generous on purpose:
on a faster machine the demo ends early rather than late.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["plan_budget", "seconds_per_step", "steps_for", "MIN_TRAIN_S", "MIN_REFINER_S"]

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


def seconds_per_step(preset: str, in_ch: int, out_ch: int, side: int, batch: int, forwards: int) -> float:
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


def steps_for(seconds: float, per_step: float) -> int:
    """The step cap of a training run of ``seconds`` at ``per_step`` seconds a step (x STEP_MARGIN, at least 10)."""
    return max(10, int(math.ceil(seconds / max(per_step, 1e-3) * STEP_MARGIN)))
