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


def _codebook_sizes(store: Any) -> tuple[int, ...]:
    """K_j of every latent channel of the store's codec (its spec string), (c,)."""
    from mbldm.codec.spec import parse_spec

    h, w, c = store.latent_shape
    try:
        sizes = parse_spec(store.spec).codebook_sizes
    except ValueError:  # a synthetic store (dry run) with no real spec: every channel has K
        sizes = (int(store.num_codewords),) * c
    return sizes if len(sizes) == c else (int(store.num_codewords),) * c


def _derived_fields(config: TrainConfig, store: Any, mixed_precision: str, n_proc: int) -> dict:
    """The RUN/config.json keys computed from the store and the variant (``num_parameters`` is added later)."""
    from mbldm.diffusion.parameterization import parameterization_of

    h, w, c = store.latent_shape
    K = store.num_codewords
    sizes = _codebook_sizes(store)
    in_channels = 2 * c if config.self_condition else c
    out_channels = parameterization_of(config.to_dict(), sizes).out_channels()
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "latent_shape": [h, w, c], "num_codewords": K,
            "codebook_sizes": list(sizes), "codec_spec": store.spec, "resolution": store.resolution,
            "in_channels": in_channels, "out_channels": out_channels, "mixed_precision_resolved": mixed_precision,
            "num_processes": n_proc}


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
    """The variant's maths of one step: the self-conditioning estimate and the loss (Eq. 4 / its x0, v, EDM
    forms; the categorical NLL and / or Eq. 24), through the run's :class:`Parameterization`."""

    config: TrainConfig
    param: Any  # mbldm.diffusion.parameterization.Parameterization
    alphas_cumprod: Any  # (T,) float64 on the device: exact SNR near t = 0
    codec: Any  # the run's Codec on the device (categorical with Eq. 24 only)

    @property
    def needs_gumbel(self) -> bool:
        """Whether a step draws Gumbel noise (Eq. 24's Eq. 20 weights, or the paper-style self-conditioning)."""
        return self.param.categorical and (self.config.eq24_weight > 0
                                           or self.config.self_condition_estimate == "gumbel")

    def x0_estimate(self, out, z_t, t, gen):
        """Self-conditioning estimate in [-1, 1], (b, c, h, w): continuous x0 clamped; categorical: the mean
        index under the predicted distribution, or (``self_condition_estimate="gumbel"``, the version-1 runs) the
        expected index under Gumbel-softmax weights (Eq. 20)."""
        from mbldm.diffusion import categorical

        if self.param.categorical and self.config.self_condition_estimate == "gumbel":
            dist = self.param.distribution(out, z_t, t, self.alphas_cumprod)
            weights = categorical.gumbel_softmax(dist.logits(self.param.K), self.config.tau, generator=gen)
            return categorical.expected_unit(weights, self.param.sizes)
        return self.param.estimate(out, z_t, t, self.alphas_cumprod)

    def loss(self, out, z0, x0, z_t, noise, t, gen):
        """(LossOutput, per-image (img, eps, nll) parts); the parts are zeros for the continuous variant."""
        import torch

        from mbldm.diffusion import losses

        cfg = self.config
        if not self.param.categorical:
            target = self.param.regression_target(x0, noise, z_t, t, self.alphas_cumprod)
            objective = "edm" if cfg.precondition == "edm" else cfg.prediction
            result = losses.continuous_loss(out, target, t, self.alphas_cumprod, min_snr_gamma=cfg.min_snr_gamma,
                                            objective=objective)
            zeros = torch.zeros_like(result.per_sample)
            return result, (zeros, zeros, zeros)
        dist = self.param.distribution(out, z_t, t, self.alphas_cumprod)
        x0_image = None
        if cfg.eq24_weight > 0:
            with torch.no_grad():
                x0_image = self.codec.decode_torch(z0)  # (b, 3, H, W) in [0, 255], target of Eq. 24
        result = losses.categorical_objective(
            dist, z0, x0_image, z_t, noise, t, self.alphas_cumprod,
            self.codec.decode_soft if self.codec is not None else None, nll_weight=cfg.nll_weight,
            eq24_weight=cfg.eq24_weight, tau=cfg.tau, min_snr_gamma=cfg.min_snr_gamma, soft_sample=cfg.soft_sample,
            sizes=self.param.sizes, generator=gen)
        return result, tuple(result.parts[k].detach() for k in ("img", "eps", "nll"))


def _forward(model, z_t, t, objective: _Objective, self_condition: bool, first_pass: bool, gen):
    """The model output (b, c, h, w), (b, c*K, h, w) or (b, c*3L, h, w). With ``self_condition`` the input is
    cat([z_t, cond]): cond is zeros, or with ``first_pass`` (half of the steps) the detached estimate of a first
    no-grad pass; without it the input is z_t."""
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


def _over_budget(config: TrainConfig, t_start: float, cpu_start: float) -> bool:
    """Whether this invocation has used its wall-clock (``max_minutes``) or CPU-time (``max_cpu_minutes``: this
    process's user + system time, all its threads) budget."""
    if config.max_minutes is not None and time.monotonic() - t_start > 60 * config.max_minutes:
        return True
    return config.max_cpu_minutes is not None and time.process_time() - cpu_start > 60 * config.max_cpu_minutes


def _budget_text(config: TrainConfig) -> str:
    parts = [f"--max-minutes {config.max_minutes}" if config.max_minutes is not None else None,
             f"--max-cpu-minutes {config.max_cpu_minutes}" if config.max_cpu_minutes is not None else None]
    return " / ".join(p for p in parts if p)


def _gather(accelerator, result, t, parts, over_time: bool):
    """One gather per step: per-image [loss, t, img, eps, nll, over-time flag] of every process, (B, 6) on the
    CPU."""
    import torch

    img, eps, nll = parts
    row = torch.stack([result.per_sample.detach(), t.float(), img, eps, nll,
                       torch.full_like(img, float(over_time))], dim=1)  # (b, 6)
    return accelerator.gather(row).float().cpu()  # (B, 6)


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
        self.stats.append(gathered[:, :5])
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
    from mbldm.diffusion.parameterization import parameterization_of

    t_start, cpu_start = time.monotonic(), time.process_time()
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
    derived = _derived_fields(config, store, mixed_precision, n_proc)
    sizes = tuple(derived["codebook_sizes"])  # K_j of each latent channel
    param = parameterization_of(config.to_dict(), sizes)
    codec = Codec.load(store.codec_dir).to(device) if is_categorical and config.eq24_weight > 0 else None
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
    objective = _Objective(config, param, alphas_cumprod, codec)

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
            gumbel_gen = gumbel_generators(config.seed, step, my_positions, device) if objective.needs_gumbel else None
            z0 = torch.from_numpy(batches.get(step).astype(np.int64)).permute(0, 3, 1, 2).to(device)  # (b, c, h, w)
            t, noise = noise_and_timesteps(config.seed, step, my_positions, (c, h, w), T)
            t, noise = t.to(device), noise.to(device)  # (b,), (b, c, h, w)
            x0 = schedule.indices_to_unit(z0, sizes).float()  # (b, c, h, w) in [-1, 1], per-channel K_j
            z_t = schedule.q_sample(x0, t, noise, alphas_cumprod).float()  # (b, c, h, w)

            # self-conditioning: zeros, or (half of the steps) the detached estimate of a first no-grad pass
            first_pass = config.self_condition and use_self_condition(config.seed, step)
            out = _forward(trainee.model, z_t, t, objective, config.self_condition, first_pass, gumbel_gen)
            result, parts = objective.loss(out, z0, x0, z_t, noise, t, gumbel_gen)
            accelerator.backward(result.loss)

            over_time = _over_budget(config, t_start, cpu_start)
            gathered = _gather(accelerator, result, t, parts, over_time)  # (B, 6)
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
            if bool(gathered[:, 5].any()):
                if is_main:
                    print(f"\nmbldm train: {_budget_text(config)} reached at step {done}; stopping", file=sys.stderr)
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
