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

Determinism and resuming. Every random draw of step ``n`` is derived from ``(seed, n, ...)``, never from a
running RNG: the global batch of step n is positions ``[n*B, (n+1)*B)`` of a sequence of per-epoch random
permutations of the store; the timestep and noise of global batch position j come from a generator seeded
with ``(seed, n, j)``; the self-conditioning coin from ``(seed, n)``. Process r of n takes positions
``[r*B/n, (r+1)*B/n)``, i.e. the same images, timesteps and noise as a single process at those positions
(the categorical Gumbel noise of position j also has its own generator, ``(seed, n, "gumbel", j)``).
Hence a checkpoint needs no data-loader state, and resuming gives the same weights as not stopping.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

VARIANTS = ("continuous", "categorical")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
# Fields that define the model (its shapes or the meaning of its inputs): a resumed run must keep them.
SHAPE_FIELDS = ("variant", "preset", "self_condition", "timesteps", "beta_schedule")
# Fields that describe one invocation: never inherited from a run's saved config.json.
INVOCATION_FIELDS = ("resume", "config", "max_minutes", "progress")
# Keys written to RUN/config.json besides the TrainConfig fields (computed from the store and the model).
DERIVED_FIELDS = ("latent_shape", "num_codewords", "codec_spec", "resolution", "in_channels", "out_channels",
                  "num_parameters", "mixed_precision_resolved", "num_processes", "format", "version")
RUN_FORMAT = "mbldm-train-run"
RUN_VERSION = 1


# ----------------------------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Resolved configuration of a training run (all ``mbldm train`` flags; saved as RUN/config.json).

    Required: ``latents`` (a latent store, contract 5), ``out`` (the run directory), ``steps``.
    ``batch_size`` is global (split evenly across processes). ``lr`` is AdamW's peak rate, reached after
    ``lr_warmup_steps`` (``lr_schedule`` names a diffusers schedule). ``ema_decay`` is the EMA's final decay,
    approached with diffusers' warm-up ``1 - (1 + n)^-ema_power``. ``mixed_precision`` "auto" is bf16 (or fp16)
    on CUDA and "no" on CPU. ``max_minutes`` is a wall-clock budget for this invocation: when exceeded the run
    stops cleanly with a checkpoint and an export. ``resume`` is None, "latest" or a checkpoint folder;
    ``config`` a JSON file of field values loaded before the command-line flags (see :func:`resolve_config`).
    """

    latents: str | None = None
    out: str | None = None
    steps: int | None = None
    preset: str = "small"
    variant: str = "continuous"
    batch_size: int = 64
    lr: float = 1e-4
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_power: float = 0.75
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    mixed_precision: str = "auto"
    tau: float = 1.0
    min_snr_gamma: float | None = 5.0
    self_condition: bool = True
    timesteps: int = 1000
    beta_schedule: str = "linear"
    seed: int = 0
    max_minutes: float | None = None
    num_workers: int = 0
    resume: str | None = None
    config: str | None = None
    progress: bool = True

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check values; return self.

        Raises:
            ValueError: a missing required field or a value out of range (naming the flag).
        """
        for name in ("latents", "out", "steps"):
            if getattr(self, name) is None:
                raise ValueError(f"train: --{name.replace('_', '-')} is required (on the command line or in --config)")
        checks = [
            (self.variant in VARIANTS, f"--variant must be one of {VARIANTS}, got {self.variant!r}"),
            (self.mixed_precision in MIXED_PRECISION,
             f"--mixed-precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (isinstance(self.steps, int) and self.steps >= 1, f"--steps must be an integer >= 1, got {self.steps!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"--batch-size must be an integer >= 1, got {self.batch_size!r}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/--adam-beta2 must be in [0, 1)"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (0 <= self.ema_decay <= 1, f"--ema-decay must be in [0, 1], got {self.ema_decay}"),
            (self.ema_power > 0, f"--ema-power must be > 0, got {self.ema_power}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.tau > 0, f"--tau must be > 0, got {self.tau}"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0,
             f"--min-snr-gamma must be > 0, got {self.min_snr_gamma}"),
            (self.timesteps >= 2, f"--timesteps must be >= 2, got {self.timesteps}"),
            (self.max_minutes is None or self.max_minutes > 0, f"--max-minutes must be > 0, got {self.max_minutes}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train: {msg}")
        return self


def _config_values(raw: Any, file: Path) -> dict:
    """TrainConfig field values of a JSON dict (derived keys dropped; unknown keys raise)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object of training settings")
    known = set(TrainConfig.field_names())
    unknown = sorted(set(raw) - known - set(DERIVED_FIELDS))
    if unknown:
        raise ValueError(f"{file}: unknown training setting(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in raw.items() if k in known}


def _read_json_file(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def read_run_config(run: str | os.PathLike) -> dict:
    """The raw dict of ``RUN/config.json`` (TrainConfig fields + derived fields).

    Raises:
        FileNotFoundError: no config.json.  ValueError: invalid JSON or not a training run's config.
    """
    file = Path(run) / "config.json"
    raw = _read_json_file(file)
    _config_values(raw, file)
    return raw


def _check_shape_fields(given: dict, saved: dict, run_file: Path, source: str) -> None:
    for name in SHAPE_FIELDS:
        if name in given and name in saved and given[name] != saved[name]:
            raise ValueError(
                f"{run_file}: the run was trained with {name}={saved[name]!r} but {source} gives "
                f"{name}={given[name]!r}; a resumed run cannot change {name} (drop the flag or use a new --out)")


def resolve_config(flags: dict[str, Any]) -> TrainConfig:
    """Merge defaults, the run's own config.json (when resuming), a ``--config`` JSON file and explicit flags.

    Precedence, lowest first: TrainConfig defaults < RUN/config.json (only with ``resume`` set; fields in
    ``INVOCATION_FIELDS`` are not inherited) < the ``config`` file < ``flags``. ``flags`` must hold only the
    values the user gave explicitly (None values are ignored).

    Raises:
        ValueError: unknown keys, or a value from the file/flags that conflicts with the resumed run's
            ``SHAPE_FIELDS`` (e.g. another --preset), or invalid values (see :meth:`TrainConfig.validate`).
        FileNotFoundError: a missing ``config`` file.
    """
    known = set(TrainConfig.field_names())
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"train: unknown setting(s) {unknown}")
    explicit = {k: v for k, v in flags.items() if v is not None}
    if explicit.get("config"):
        file = Path(explicit["config"])
        explicit = {**_config_values(_read_json_file(file), file), **explicit}
    base: dict[str, Any] = {}
    out = explicit.get("out")
    if explicit.get("resume") and out and (Path(out) / "config.json").is_file():
        saved = _config_values(read_run_config(out), Path(out) / "config.json")
        _check_shape_fields(explicit, saved, Path(out) / "config.json", "the command line / --config")
        base = {k: v for k, v in saved.items() if k not in INVOCATION_FIELDS}
    return TrainConfig(**{**base, **explicit}).validate()


# ----------------------------------------------------------------------------------------------- determinism

def step_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``(seed, step, position)``) by SHA-256: stable across runs,
    platforms and processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, count: int):
    import torch

    g = torch.Generator().manual_seed(step_seed(seed, "epoch", epoch))
    return torch.randperm(count, generator=g).numpy()


def global_batch_indices(seed: int, step: int, batch_size: int, count: int, start: int = 0,
                         stop: int | None = None):
    """Store indices of global batch positions ``[start, stop)`` of step ``step`` (0-based).

    The data stream is the concatenation of per-epoch permutations of ``range(count)`` (epoch e permuted with
    seed ``(seed, "epoch", e)``); step n takes stream positions ``[n*B, (n+1)*B)``, so every image is seen
    once per epoch and the batch depends only on (seed, step, B).
    Returns:
        int64 numpy array of length ``stop - start`` with values in [0, count).
    """
    import numpy as np

    stop = batch_size if stop is None else stop
    if count < 1:
        raise ValueError("global_batch_indices: empty latent store")
    positions = step * batch_size + np.arange(start, stop, dtype=np.int64)
    epochs, offsets = np.divmod(positions, count)
    out = np.empty(len(positions), dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(seed, int(e), count)[offsets[sel]]
    return out


def _noise_and_timesteps(seed: int, step: int, positions: range, shape: tuple[int, int, int], T: int):
    """Per-image timestep t ~ U{0..T-1} and noise ~ N(0, I) of shape (c, h, w), from generator (seed, step, j)."""
    import torch

    ts, noises = [], []
    for j in positions:
        g = torch.Generator().manual_seed(step_seed(seed, step, "image", j))
        ts.append(torch.randint(0, T, (1,), generator=g))
        noises.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(noises)  # (b,) int64, (b, c, h, w) float32


def _use_self_condition(seed: int, step: int) -> bool:
    """The per-step coin of self-conditioning (p = 1/2), identical on every process."""
    import torch

    g = torch.Generator().manual_seed(step_seed(seed, step, "self-condition"))
    return bool(torch.rand((), generator=g) < 0.5)


# ----------------------------------------------------------------------------------------------- run directory

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


def _find_resume_checkpoint(config: TrainConfig, run: Path) -> Path | None:
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


def _copy_dir_atomic(src: Path, dest: Path) -> None:
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


def _truncate_metrics(file: Path, step: int) -> None:
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


def _append_metrics(file: Path, row: dict) -> None:
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _metrics_row(step: int, stats: list, T: int, lr: float, steps_per_s: float, elapsed: float,
                 categorical: bool) -> dict:
    """Aggregate gathered per-image rows [loss, t, img, eps] of the last steps into one metrics.jsonl line."""
    import torch

    from mbldm.diffusion import schedule

    s = torch.cat(stats)  # (N, 4)
    loss, t = s[:, 0], s[:, 1].long()
    q = torch.as_tensor(schedule.timestep_quartile(t, T)).long()
    row: dict[str, Any] = {"step": step, "loss": float(loss.mean())}
    for k in range(4):
        sel = q == k
        row[f"loss_q{k}"] = float(loss[sel].mean()) if bool(sel.any()) else None
    if categorical:
        row["loss_img"] = float(s[:, 2].mean())
        row["loss_eps"] = float(s[:, 3].mean())
    row.update(lr=lr, steps_per_s=steps_per_s, elapsed_s=round(elapsed, 3))
    return row


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from mbldm.codec import Codec
    from mbldm.data.latent_store import LatentStore
    from mbldm.diffusion import categorical, losses, models, schedule
    from mbldm.diffusion import checkpoint as ckpt
    from mbldm.io.atomic import write_json

    t_start = time.monotonic()
    config = config.validate()
    run = Path(config.out)
    ckpt_root = run / "checkpoints"
    is_categorical = config.variant == "categorical"

    # ---- setup: accelerator, processes, resume point -------------------------------------------------------
    cuda = torch.cuda.is_available()
    mixed_precision = _resolve_mixed_precision(config.mixed_precision, cuda)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    device, rank, n_proc = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    if config.batch_size % n_proc:
        raise ValueError(f"train: --batch-size {config.batch_size} is not divisible by the {n_proc} processes")
    local_bs = config.batch_size // n_proc
    resume_from = _find_resume_checkpoint(config, run)
    set_seed(config.seed)  # identical model initialisation on every process

    # ---- data: latent store, codec, run directory ----------------------------------------------------------
    store = LatentStore(config.latents) if store is None else store
    h, w, c = store.latent_shape
    K = store.num_codewords
    codec = Codec.load(store.codec_dir).to(device) if is_categorical else None
    in_channels = 2 * c if config.self_condition else c
    out_channels = c * K if is_categorical else c
    derived = {"format": RUN_FORMAT, "version": RUN_VERSION, "latent_shape": [h, w, c], "num_codewords": K,
               "codec_spec": store.spec, "resolution": store.resolution, "in_channels": in_channels,
               "out_channels": out_channels, "mixed_precision_resolved": mixed_precision, "num_processes": n_proc}
    if (run / "config.json").is_file():  # resuming: the model's shape must not change
        saved = read_run_config(run)
        _check_shape_fields(config.to_dict(), saved, run / "config.json", "this configuration")
        for key in ("latent_shape", "num_codewords"):
            if key in saved and saved[key] != derived[key]:
                raise ValueError(f"{run / 'config.json'}: the run was trained on latents with {key}={saved[key]}, "
                                 f"the store {config.latents} has {key}={derived[key]}")

    # ---- model and EMA -------------------------------------------------------------------------------------
    model = models.build_unet(config.preset, in_channels, out_channels, sample_size=h if h == w else (h, w))
    derived["num_parameters"] = models.count_parameters(model)
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power,
                   foreach=True)
    accelerator.wait_for_everyone()  # every process has read the run directory before the main one writes it
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "config.json", {**config.to_dict(), **derived})
        if not (run / "codec").exists():
            _copy_dir_atomic(store.codec_dir, run / "codec")

    # ---- optimiser and LR schedule -------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step
    raw_model = accelerator.unwrap_model(model)
    ema.to(device)

    # ---- resume --------------------------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=raw_model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                     ema=ema, scaler=accelerator.scaler)
        start_step = state["step"]
        if is_main:
            print(f"mbldm train: resumed from {resume_from} (step {start_step})", file=sys.stderr)
    if is_main:
        _truncate_metrics(run / "metrics.jsonl", start_step)
    accelerator.wait_for_everyone()

    betas = schedule.make_betas(config.beta_schedule, config.timesteps)
    alphas_cumprod = schedule.alphas_cumprod_from_betas(betas).to(device)  # (T,) float64: exact SNR near t = 0
    T = config.timesteps

    def save(step: int) -> None:
        """Checkpoint + EMA export (main process only; the others wait)."""
        if is_main:
            ckpt.save_checkpoint(ckpt_root, step, model=raw_model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                 ema=ema, scaler=accelerator.scaler, keep=config.keep_checkpoints,
                                 extra={"seed": config.seed, "batch_size": config.batch_size,
                                        "samples_seen": step * config.batch_size, "variant": config.variant})
            export_ema_model(raw_model, ema, run / "model")
        accelerator.wait_for_everyone()

    # ---- batch loading (optionally prefetched by threads: the batch depends only on the step) ---------------
    my_positions = range(rank * local_bs, (rank + 1) * local_bs)

    def load_batch(step: int):
        idx = global_batch_indices(config.seed, step, config.batch_size, len(store), my_positions.start,
                                   my_positions.stop)
        return store.batch(idx.tolist())  # (b, h, w, c) uint8/uint16

    pool = None
    pending: dict[int, Any] = {}
    if config.num_workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=config.num_workers)

    def next_batch(step: int):
        if pool is None:
            return load_batch(step)
        fut = pending.pop(step, None) or pool.submit(load_batch, step)
        for s in range(step + 1, min(step + 1 + config.num_workers, config.steps)):
            if s not in pending:
                pending[s] = pool.submit(load_batch, s)
        return fut.result()

    def x0_estimate(out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, gen) -> torch.Tensor:
        """Self-conditioning estimate from a model output: continuous x0 = x0_from_eps, clamped to [-1, 1];
        categorical z0_hat = expected index under Gumbel-softmax weights (as in the loss)."""
        if is_categorical:
            logits = categorical.logits_from_model_output(out, c, K)  # (b, c, K, h, w)
            return categorical.expected_index_unit(categorical.gumbel_softmax(logits, config.tau, generator=gen), K)
        return schedule.x0_from_eps(z_t, t, out, alphas_cumprod).clamp(-1.0, 1.0)  # (b, c, h, w)

    # ---- loop ----------------------------------------------------------------------------------------------
    pbar = tqdm(total=config.steps, initial=start_step, unit="step", dynamic_ncols=True,
                disable=not (is_main and config.progress))
    stats: list = []
    last_log_time, last_log_step, last_saved = time.monotonic(), start_step, start_step
    done = start_step
    try:
        model.train()
        for step in range(start_step, config.steps):
            torch.manual_seed(step_seed(config.seed, step, "global", rank))  # dropout etc.: f(seed, step, rank)
            gumbel_gen = ([torch.Generator(device=device).manual_seed(step_seed(config.seed, step, "gumbel", j))
                           for j in my_positions] if is_categorical else None)  # one per image
            z0 = torch.from_numpy(next_batch(step).astype(np.int64)).permute(0, 3, 1, 2).to(device)  # (b, c, h, w)
            t, noise = _noise_and_timesteps(config.seed, step, my_positions, (c, h, w), T)
            t, noise = t.to(device), noise.to(device)  # (b,), (b, c, h, w)
            x0 = schedule.indices_to_unit(z0, K).float()  # (b, c, h, w) in [-1, 1]
            z_t = schedule.q_sample(x0, t, noise, alphas_cumprod).float()  # (b, c, h, w)

            # self-conditioning: zeros, or (half of the steps) the detached estimate of a first no-grad pass
            if config.self_condition:
                cond = torch.zeros_like(z_t)
                if _use_self_condition(config.seed, step):
                    with torch.no_grad():
                        first = model(schedule.self_condition_input(z_t, cond), t).sample.float()
                        cond = x0_estimate(first, z_t, t, gumbel_gen).detach()
                    del first
                model_in = schedule.self_condition_input(z_t, cond)  # (b, 2c, h, w)
            else:
                model_in = z_t  # (b, c, h, w)
            out = model(model_in, t).sample.float()  # (b, c, h, w) or (b, c*K, h, w)

            if is_categorical:
                logits = categorical.logits_from_model_output(out, c, K)  # (b, c, K, h, w)
                with torch.no_grad():
                    x0_image = codec.decode_torch(z0)  # (b, 3, H, W) in [0, 255], target of Eq. 24
                result = losses.categorical_loss(logits, x0_image, z_t, noise, t, alphas_cumprod, codec.decode_soft,
                                                 tau=config.tau, min_snr_gamma=config.min_snr_gamma,
                                                 generator=gumbel_gen)
                img, eps = result.parts["img"].detach(), result.parts["eps"].detach()
            else:
                result = losses.continuous_loss(out, noise, t, alphas_cumprod, min_snr_gamma=config.min_snr_gamma)
                img = eps = torch.zeros_like(result.per_sample)
            accelerator.backward(result.loss)

            # one gather per step: per-image [loss, t, img, eps, over-time flag] of every process
            over_time = config.max_minutes is not None and time.monotonic() - t_start > 60 * config.max_minutes
            row = torch.stack([result.per_sample.detach(), t.float(), img, eps,
                               torch.full_like(img, float(over_time))], dim=1)  # (b, 5)
            gathered = accelerator.gather(row).float().cpu()  # (B, 5)
            if not bool(torch.isfinite(gathered[:, 0]).all()):
                latest = ckpt.latest_checkpoint(ckpt_root)
                raise RuntimeError(
                    f"non-finite loss at step {step + 1} (mean {gathered[:, 0].mean().item()}); stopping without "
                    f"updating the weights or writing a checkpoint for this step. Last checkpoint: {latest}. Try a "
                    f"lower --lr, --mixed-precision bf16/no, or resume with --resume latest.")

            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            if accelerator.scaler is None and not bool(torch.isfinite(torch.as_tensor(grad_norm))):
                # (with fp16 the GradScaler skips such steps itself)
                raise RuntimeError(f"non-finite gradient norm at step {step + 1} (the loss was finite); stopping "
                                   f"without updating the weights or writing a checkpoint for this step")
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(raw_model.parameters())
            done = step + 1
            stats.append(gathered[:, :4])
            pbar.update(1)

            # ---- log ------------------------------------------------------------------------------------------
            if done % config.log_every == 0 or done == config.steps:
                now = time.monotonic()
                rate = (done - last_log_step) / max(now - last_log_time, 1e-9)
                metrics = _metrics_row(done, stats, T, float(lr_scheduler.get_last_lr()[0]), rate,
                                       now - t_start, is_categorical)
                if is_main:
                    _append_metrics(run / "metrics.jsonl", metrics)
                pbar.set_postfix({"loss": f"{metrics['loss']:.4f}", "steps/s": f"{rate:.2f}"})
                stats, last_log_time, last_log_step = [], now, done

            # ---- checkpoint -----------------------------------------------------------------------------------
            if done % config.checkpoint_every == 0:
                save(done)
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
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- export: final checkpoint (unless just written) and EMA weights -----------------------------------------
    if done != last_saved or ckpt.latest_checkpoint(ckpt_root) is None:
        save(done)
    elif is_main and not (run / "model").exists():
        export_ema_model(raw_model, ema, run / "model")
    accelerator.wait_for_everyone()
    return run
