"""Training of the latent diffusion U-Net, both variants, through HF Accelerate: :func:`train`.

* ``continuous`` (§4.2.2): DDPM on the ordered indices mapped to [-1, 1] (§3.2.1), epsilon objective (Eq. 4).
* ``categorical`` (§3.2.2, §4.2.3): same forward process; the U-Net outputs c*K logits, loss Eq. 24.

Both use min-SNR-gamma weighting and self-conditioning (§4.2.1, refs. [35, 36]); see
:mod:`mbldm.diffusion.losses` for the losses. The run directory follows shared contract 6::

    RUN/config.json   resolved TrainConfig + derived fields (latent_shape, num_codewords, ...)
    RUN/codec/        copy of the store's codec
    RUN/metrics.jsonl one JSON object per logged step
    RUN/checkpoints/step_XXXXXXX/  full resume state (:mod:`mbldm.diffusion.checkpoint`)
    RUN/model/        EMA weights only, ``UNet2DModel.save_pretrained`` (refreshed at every checkpoint)

The configuration lives in :mod:`mbldm.diffusion.train_config`, the deterministic data stream in
:mod:`mbldm.diffusion.batch_stream` and the run directory's files in :mod:`mbldm.diffusion.run_dir`; this module
keeps the loop and re-exports their public names.

Determinism and resuming. Every random draw of step ``n`` is derived from ``(seed, n, ...)``, never from a
running RNG: the global batch of step n is positions ``[n*B, (n+1)*B)`` of a sequence of per-epoch random
permutations of the store; the timestep and noise of global batch position j come from a generator seeded
with ``(seed, n, j)``; the self-conditioning coin from ``(seed, n)``. Process r of n takes positions
``[r*B/n, (r+1)*B/n)``, i.e. the same images, timesteps and noise as a single process at those positions
(the categorical Gumbel noise of position j also has its own generator, ``(seed, n, "gumbel", j)``).
Hence a checkpoint needs no data-loader state, and resuming gives the same weights as not stopping.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbldm.diffusion.batch_stream import (
    BatchLoader,
    global_batch_indices,
    gumbel_generators,
    noise_and_timesteps,
    step_seed,
    use_self_condition,
)
from mbldm.diffusion.run_dir import (
    append_metrics,
    export_ema_model,
    find_resume_checkpoint,
    metrics_row,
    truncate_metrics,
    write_run_config,
)
from mbldm.diffusion.train_config import (
    RUN_FORMAT,
    RUN_VERSION,
    SHAPE_FIELDS,
    VARIANTS,
    TrainConfig,
    check_resumed_run,
    read_run_config,
    resolve_config,
)

__all__ = [
    "TrainConfig",
    "VARIANTS",
    "SHAPE_FIELDS",
    "resolve_config",
    "read_run_config",
    "train",
    "export_ema_model",
    "global_batch_indices",
    "step_seed",
]

# The names of these two before they moved to batch_stream (tests and older callers use them).
_noise_and_timesteps = noise_and_timesteps
_use_self_condition = use_self_condition


# ----------------------------------------------------------------------------------------------- set-up

def _resolve_mixed_precision(requested: str, cuda: bool) -> str:
    import torch

    if not cuda:
        if requested in ("fp16", "bf16"):
            print(f"mbldm train: no CUDA device, ignoring --mixed-precision {requested}", file=sys.stderr)
        return "no"
    if requested == "auto":
        # native bf16 only: V100s report bf16 "supported" through slow emulation
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return requested


def _make_accelerator(config: TrainConfig):
    """The Accelerator of this run and its resolved mixed precision; the batch must split evenly."""
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mixed_precision = _resolve_mixed_precision(config.mixed_precision, cuda)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    n_proc = accelerator.num_processes
    if config.batch_size % n_proc:
        raise ValueError(f"train: --batch-size {config.batch_size} is not divisible by the {n_proc} processes")
    return accelerator, mixed_precision


def _derived_fields(config: TrainConfig, store: Any, mixed_precision: str, n_proc: int) -> dict:
    """The RUN/config.json keys computed from the store and the variant (``num_parameters`` is added later)."""
    h, w, c = store.latent_shape
    K = store.num_codewords
    in_channels = 2 * c if config.self_condition else c
    out_channels = c * K if config.variant == "categorical" else c
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "latent_shape": [h, w, c], "num_codewords": K,
            "codec_spec": store.spec, "resolution": store.resolution, "in_channels": in_channels,
            "out_channels": out_channels, "mixed_precision_resolved": mixed_precision, "num_processes": n_proc}


def _build_model(config: TrainConfig, derived: dict):
    """The U-Net of the preset for the derived shapes and its EMA; records ``num_parameters`` in ``derived``."""
    from diffusers.training_utils import EMAModel

    from mbldm.diffusion import models

    h, w, _ = derived["latent_shape"]
    model = models.build_unet(config.preset, derived["in_channels"], derived["out_channels"],
                              sample_size=h if h == w else (h, w))
    derived["num_parameters"] = models.count_parameters(model)
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power,
                   foreach=True)
    return model, ema


@dataclass
class _Trainee:
    """What the loop updates: the prepared model, its unwrapped module, the EMA, optimiser and LR schedule."""

    model: Any
    raw: Any
    ema: Any
    optimizer: Any
    lr_scheduler: Any


def _prepare_training(config: TrainConfig, accelerator, model, ema) -> _Trainee:
    """AdamW and the LR schedule, prepared by Accelerate (the scheduler is stepped by hand, once per step)."""
    import torch
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ema.to(accelerator.device)
    return _Trainee(model, raw_model, ema, optimizer, lr_scheduler)


def _resume(resume_from: Path | None, trainee: _Trainee, accelerator, run: Path) -> int:
    """Load the checkpoint to resume from (if any), cut metrics.jsonl after its step; return the start step."""
    from mbldm.diffusion import checkpoint as ckpt

    start_step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=trainee.raw, optimizer=trainee.optimizer,
                                     lr_scheduler=trainee.lr_scheduler, ema=trainee.ema, scaler=accelerator.scaler)
        start_step = state["step"]
        if accelerator.is_main_process:
            print(f"mbldm train: resumed from {resume_from} (step {start_step})", file=sys.stderr)
    if accelerator.is_main_process:
        truncate_metrics(run / "metrics.jsonl", start_step)
    accelerator.wait_for_everyone()
    return start_step


def _save(config: TrainConfig, run: Path, step: int, trainee: _Trainee, accelerator) -> None:
    """Checkpoint + EMA export (main process only; the others wait)."""
    from mbldm.diffusion import checkpoint as ckpt

    if accelerator.is_main_process:
        ckpt.save_checkpoint(run / "checkpoints", step, model=trainee.raw, optimizer=trainee.optimizer,
                             lr_scheduler=trainee.lr_scheduler, ema=trainee.ema, scaler=accelerator.scaler,
                             keep=config.keep_checkpoints,
                             extra={"seed": config.seed, "batch_size": config.batch_size,
                                    "samples_seen": step * config.batch_size, "variant": config.variant})
        export_ema_model(trainee.raw, trainee.ema, run / "model")
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------- one step

@dataclass
class _Objective:
    """The variant's maths of one step: the self-conditioning estimate and the loss (Eq. 4 or Eq. 24)."""

    categorical: bool
    c: int
    K: int
    tau: float
    min_snr_gamma: float | None
    alphas_cumprod: Any  # (T,) float64 on the device: exact SNR near t = 0
    codec: Any  # the run's Codec on the device (categorical only)

    def x0_estimate(self, out, z_t, t, gen):
        """Self-conditioning estimate from a model output: continuous x0 = x0_from_eps, clamped to [-1, 1];
        categorical z0_hat = expected index under Gumbel-softmax weights (as in the loss)."""
        from mbldm.diffusion import categorical, schedule

        if self.categorical:
            logits = categorical.logits_from_model_output(out, self.c, self.K)  # (b, c, K, h, w)
            weights = categorical.gumbel_softmax(logits, self.tau, generator=gen)
            return categorical.expected_index_unit(weights, self.K)
        return schedule.x0_from_eps(z_t, t, out, self.alphas_cumprod).clamp(-1.0, 1.0)  # (b, c, h, w)

    def loss(self, out, z0, z_t, noise, t, gen):
        """(LossResult, per-image img part, per-image eps part); the parts are zeros for the continuous variant."""
        import torch

        from mbldm.diffusion import categorical, losses

        if not self.categorical:
            result = losses.continuous_loss(out, noise, t, self.alphas_cumprod, min_snr_gamma=self.min_snr_gamma)
            img = eps = torch.zeros_like(result.per_sample)
            return result, img, eps
        logits = categorical.logits_from_model_output(out, self.c, self.K)  # (b, c, K, h, w)
        with torch.no_grad():
            x0_image = self.codec.decode_torch(z0)  # (b, 3, H, W) in [0, 255], target of Eq. 24
        result = losses.categorical_loss(logits, x0_image, z_t, noise, t, self.alphas_cumprod, self.codec.decode_soft,
                                         tau=self.tau, min_snr_gamma=self.min_snr_gamma, generator=gen)
        return result, result.parts["img"].detach(), result.parts["eps"].detach()


def _forward(model, z_t, t, objective: _Objective, self_condition: bool, first_pass: bool, gen):
    """The model output (b, c, h, w) or (b, c*K, h, w). With ``self_condition`` the input is cat([z_t, cond]):
    cond is zeros, or with ``first_pass`` (half of the steps) the detached estimate of a first no-grad pass;
    without it the input is z_t."""
    import torch

    from mbldm.diffusion import schedule

    if not self_condition:
        return model(z_t, t).sample.float()  # input (b, c, h, w)
    cond = torch.zeros_like(z_t)
    if first_pass:
        with torch.no_grad():
            first = model(schedule.self_condition_input(z_t, cond), t).sample.float()
            cond = objective.x0_estimate(first, z_t, t, gen).detach()
        del first
    return model(schedule.self_condition_input(z_t, cond), t).sample.float()  # input (b, 2c, h, w)


def _gather(accelerator, result, t, img, eps, over_time: bool):
    """One gather per step: per-image [loss, t, img, eps, over-time flag] of every process, (B, 5) on the CPU."""
    import torch

    row = torch.stack([result.per_sample.detach(), t.float(), img, eps,
                       torch.full_like(img, float(over_time))], dim=1)  # (b, 5)
    return accelerator.gather(row).float().cpu()  # (B, 5)


def _check_finite_loss(gathered, step: int, ckpt_root: Path) -> None:
    import torch

    from mbldm.diffusion import checkpoint as ckpt

    if not bool(torch.isfinite(gathered[:, 0]).all()):
        latest = ckpt.latest_checkpoint(ckpt_root)
        raise RuntimeError(
            f"non-finite loss at step {step + 1} (mean {gathered[:, 0].mean().item()}); stopping without "
            f"updating the weights or writing a checkpoint for this step. Last checkpoint: {latest}. Try a "
            f"lower --lr, --mixed-precision bf16/no, or resume with --resume latest.")


def _optimizer_step(accelerator, trainee: _Trainee, grad_clip: float, step: int) -> None:
    """Clip the gradients (refusing a non-finite norm), step AdamW, the LR schedule and the EMA."""
    import torch

    grad_norm = accelerator.clip_grad_norm_(trainee.model.parameters(), grad_clip)
    if accelerator.scaler is None and not bool(torch.isfinite(torch.as_tensor(grad_norm))):
        # (with fp16 the GradScaler skips such steps itself)
        raise RuntimeError(f"non-finite gradient norm at step {step + 1} (the loss was finite); stopping "
                           f"without updating the weights or writing a checkpoint for this step")
    trainee.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        trainee.lr_scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.ema.step(trainee.raw.parameters())


class _MetricsLog:
    """Collects the gathered rows of the steps since the last log line; writes one line every ``log_every``."""

    def __init__(self, config: TrainConfig, file: Path, start_step: int, t_start: float, is_main: bool, pbar):
        self.config, self.file, self.t_start, self.is_main, self.pbar = config, file, t_start, is_main, pbar
        self.stats: list = []
        self.last_time, self.last_step = time.monotonic(), start_step

    def add(self, gathered, done: int, lr_scheduler) -> None:
        """Record step ``done``'s rows; at a log step write metrics.jsonl (main process) and the bar's postfix."""
        self.stats.append(gathered[:, :4])
        self.pbar.update(1)
        if not (done % self.config.log_every == 0 or done == self.config.steps):
            return
        now = time.monotonic()
        rate = (done - self.last_step) / max(now - self.last_time, 1e-9)
        metrics = metrics_row(done, self.stats, self.config.timesteps, float(lr_scheduler.get_last_lr()[0]), rate,
                              now - self.t_start, self.config.variant == "categorical")
        if self.is_main:
            append_metrics(self.file, metrics)
        self.pbar.set_postfix({"loss": f"{metrics['loss']:.4f}", "steps/s": f"{rate:.2f}"})
        self.stats, self.last_time, self.last_step = [], now, done


# ----------------------------------------------------------------------------------------------- training

def train(config: TrainConfig, *, store: Any = None, on_step: Any = None) -> Path:
    """Train a latent diffusion U-Net on a latent store; write the run directory (contract 6); return it.

    Works as one CPU process, one GPU, or several GPUs under ``accelerate launch`` (global batch split evenly;
    only the main process writes). Each step: sample the batch, timesteps and noise deterministically
    (module docstring); z_t = q_sample(x0, t, eps); with self-conditioning, on half of the steps a first no-grad
    forward with zeros as conditioning gives a detached x0 estimate that conditions the second forward (the
    other half gets zeros); loss (continuous: Eq. 4; categorical: Eq. 24) with min-SNR-gamma; AdamW with
    gradient clipping; LR schedule; EMA.

    Args:
        config: a TrainConfig (see :func:`resolve_config` for merging flags and files).
        store: an opened latent store to use instead of ``LatentStore(config.latents)``, or any object with its
            ``latent_shape``, ``num_codewords``, ``spec``, ``resolution``, ``codec_dir``, ``len()`` and
            ``batch(indices)`` (the dry run, :mod:`mbldm.dry_run`, passes a synthetic one).
        on_step: optional ``on_step(steps_done)`` called at the end of every step (after logging and
            checkpointing); an exception it raises ends the run at once, without the final checkpoint.
    Returns:
        The run directory ``Path(config.out)``.
    Raises:
        ValueError: invalid settings, a store/run mismatch, or a batch size not divisible by the processes.
        FileExistsError: ``out`` already holds a run and ``resume`` is None.
        FileNotFoundError: missing store or checkpoint.
        RuntimeError: a non-finite loss ("non-finite loss at step N"); no checkpoint is written for that step.
    """
    import numpy as np
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mbldm.codec import Codec
    from mbldm.data.latent_store import LatentStore
    from mbldm.diffusion import checkpoint as ckpt
    from mbldm.diffusion import schedule

    t_start = time.monotonic()
    config = config.validate()
    run = Path(config.out)
    ckpt_root = run / "checkpoints"
    is_categorical = config.variant == "categorical"

    # ---- setup: accelerator, processes, resume point -------------------------------------------------------
    accelerator, mixed_precision = _make_accelerator(config)
    device, rank, n_proc = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    local_bs = config.batch_size // n_proc
    resume_from = find_resume_checkpoint(config, run)
    set_seed(config.seed)  # identical model initialisation on every process

    # ---- data: latent store, codec, run directory; model, EMA, optimiser, LR schedule ------------------------
    store = LatentStore(config.latents) if store is None else store
    h, w, c = store.latent_shape
    K = store.num_codewords
    codec = Codec.load(store.codec_dir).to(device) if is_categorical else None
    derived = _derived_fields(config, store, mixed_precision, n_proc)
    check_resumed_run(config, run, derived)  # resuming: the model's shape must not change
    model, ema = _build_model(config, derived)
    accelerator.wait_for_everyone()  # every process has read the run directory before the main one writes it
    if is_main:
        write_run_config(run, config, derived, store.codec_dir)
    trainee = _prepare_training(config, accelerator, model, ema)
    start_step = _resume(resume_from, trainee, accelerator, run)

    betas = schedule.make_betas(config.beta_schedule, config.timesteps)
    alphas_cumprod = schedule.alphas_cumprod_from_betas(betas).to(device)  # (T,) float64: exact SNR near t = 0
    T = config.timesteps
    objective = _Objective(is_categorical, c, K, config.tau, config.min_snr_gamma, alphas_cumprod, codec)

    # ---- batch loading (optionally prefetched by threads: the batch depends only on the step) ---------------
    my_positions = range(rank * local_bs, (rank + 1) * local_bs)
    batches = BatchLoader(store, config.seed, config.batch_size, my_positions, config.steps, config.num_workers)

    # ---- loop ----------------------------------------------------------------------------------------------
    pbar = tqdm(total=config.steps, initial=start_step, unit="step", dynamic_ncols=True,
                disable=not (is_main and config.progress))
    log = _MetricsLog(config, run / "metrics.jsonl", start_step, t_start, is_main, pbar)
    done = last_saved = start_step
    try:
        trainee.model.train()
        for step in range(start_step, config.steps):
            torch.manual_seed(step_seed(config.seed, step, "global", rank))  # dropout etc.: f(seed, step, rank)
            gumbel_gen = gumbel_generators(config.seed, step, my_positions, device) if is_categorical else None
            z0 = torch.from_numpy(batches.get(step).astype(np.int64)).permute(0, 3, 1, 2).to(device)  # (b, c, h, w)
            t, noise = noise_and_timesteps(config.seed, step, my_positions, (c, h, w), T)
            t, noise = t.to(device), noise.to(device)  # (b,), (b, c, h, w)
            x0 = schedule.indices_to_unit(z0, K).float()  # (b, c, h, w) in [-1, 1]
            z_t = schedule.q_sample(x0, t, noise, alphas_cumprod).float()  # (b, c, h, w)

            # self-conditioning: zeros, or (half of the steps) the detached estimate of a first no-grad pass
            first_pass = config.self_condition and use_self_condition(config.seed, step)
            out = _forward(trainee.model, z_t, t, objective, config.self_condition, first_pass, gumbel_gen)
            result, img, eps = objective.loss(out, z0, z_t, noise, t, gumbel_gen)
            accelerator.backward(result.loss)

            over_time = config.max_minutes is not None and time.monotonic() - t_start > 60 * config.max_minutes
            gathered = _gather(accelerator, result, t, img, eps, over_time)  # (B, 5)
            _check_finite_loss(gathered, step, ckpt_root)
            _optimizer_step(accelerator, trainee, config.grad_clip, step)
            done = step + 1

            # ---- log, checkpoint -----------------------------------------------------------------------------
            log.add(gathered, done, trainee.lr_scheduler)
            if done % config.checkpoint_every == 0:
                _save(config, run, done, trainee, accelerator)
                last_saved = done
            if on_step is not None:
                on_step(done)
            if bool(gathered[:, 4].any()):
                if is_main:
                    print(f"\nmbldm train: --max-minutes {config.max_minutes} reached at step {done}; stopping",
                          file=sys.stderr)
                break
    finally:
        pbar.close()
        batches.close()

    # ---- export: final checkpoint (unless just written) and EMA weights -----------------------------------------
    if done != last_saved or ckpt.latest_checkpoint(ckpt_root) is None:
        _save(config, run, done, trainee, accelerator)
    elif is_main and not (run / "model").exists():
        export_ema_model(trainee.raw, trainee.ema, run / "model")
    accelerator.wait_for_everyone()
    return run
