"""Sampling a trained latent diffusion model (§3.2, §4.2): DDPM / DDIM, both parameterisations, per-image seeds.

Two variants, read from ``RUN/config.json`` (``"variant"``):

* **continuous** (§4.2.2, Eq. 4): the U-Net predicts the noise eps; the diffusers scheduler (``prediction_type
  ="epsilon"``) computes ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` and steps the reverse process.
* **categorical** (§3.2.2, Algorithm 2): the U-Net gives logits ``(B, c*K, h, w)`` -> ``(B, c, K, h, w)``; at every
  step an index latent is *sampled*, ``z0 ~ softmax(logits / gamma)`` (Eq. 25, ``gamma = 0`` is the argmax),
  mapped to [-1, 1] (``indices_to_unit``) and the reverse process is stepped *from that z0*. Choice made here: the
  diffusers scheduler with ``prediction_type="sample"`` (it derives ``eps_z = (x_t - sqrt(abar_t) z0) /
  sqrt(1 - abar_t)``, Eq. 24, internally), so both variants share one loop and one scheduler implementation.

Self-conditioning (Chen et al. 2022, §4.2.1): when ``self_condition`` is true the U-Net input is
``cat([x_t, x0_prev])`` where ``x0_prev`` is the previous step's x0 estimate in [-1, 1] (zeros at the first step),
made exactly as the trainer (``mbldm.diffusion.training``) makes it, so sampling inputs look like training inputs:
continuous: the clipped ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (the scheduler's
``pred_original_sample``); categorical: the expected index under Gumbel-softmax weights,
``expected_index_unit(gumbel_softmax(logits, tau))`` with the run's training ``tau`` (Eq. 20), not the Eq. 25 sample.

Timesteps follow diffusers: the model and scheduler see k in {0, ..., T-1}; k corresponds to the paper's t = k + 1
(the step taking x_{k+1} to x_k). DDPM runs all T steps (ancestral); DDIM runs S <= T steps ("trailing" spacing:
the first step is k = T-1), eta = 0 deterministic, eta = 1 DDPM-like.

Per-image seeds: image ``i`` (global index) owns ``torch.Generator("cpu").manual_seed(seed + i)``, which draws, in
order, its initial noise, then at every step its temperature sample and its self-conditioning Gumbel noise
(categorical) and its scheduler noise. Images
therefore depend only on ``seed + i``, never on the batch size or on which other images share the batch (diffusers'
``randn_tensor`` draws one tensor per generator), so a sharded run writes exactly the images an unsharded run does.

Outputs of :func:`sample`: ``img_{i:06d}.png`` per global index i, ``grid.png`` (at most ``GRID_MAX_IMAGES`` images,
``ceil(sqrt(n))`` per row) and ``samples.json``; with a refiner (§4.2.2) the refined images are the ``img_*`` files
and the unrefined decodes go to ``raw/``; with a trajectory request, ``trajectory/img_{i:06d}_xt.png`` and
``_x0.png`` strips (one frame per recorded t, Fig. 7).
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SAMPLERS",
    "VARIANTS",
    "TRAJECTORY_T",
    "GRID_MAX_IMAGES",
    "Trajectory",
    "RunModel",
    "load_run",
    "resolve_steps",
    "default_trajectory_t",
    "generate_latents",
    "make_grid",
    "sample",
    "sample_sharded",
    "merge_sample_shards",
]

SAMPLERS = ("ddpm", "ddim")
VARIANTS = ("continuous", "categorical")
#: Paper timesteps shown in Fig. 7 (t = 1000, 900, ..., 0) for T = 1000.
TRAJECTORY_T = tuple(range(1000, -1, -100))
#: grid.png shows at most this many images (the first ones produced); it is a preview, not an archive.
GRID_MAX_IMAGES = 64
DEFAULT_DDIM_STEPS = 50
IMAGE_NAME = "img_{:06d}.png"
SUMMARY_FILE = "samples.json"
#: Summary of process r of n in a sharded job (:func:`sample_sharded`); merged into samples.json, then removed.
SHARD_SUMMARY_FILE = "samples.shard-{:03d}-of-{:03d}.json"
GRID_FILE = "grid.png"
_RUN_KEYS = ("variant", "latent_shape", "num_codewords", "timesteps", "beta_schedule", "self_condition")


# ---------------------------------------------------------------------------------------------------- trajectory
def default_trajectory_t(T: int) -> list[int]:
    """Eleven evenly spaced paper times T, 0.9 T, ..., 0 (rounded): Fig. 7's t = 1000, 900, ..., 0 for T = 1000."""
    return [round(T * i / 10) for i in range(10, -1, -1)]


@dataclass
class Trajectory:
    """Recorder of intermediate states, filled by :func:`generate_latents` (Fig. 7 of the paper).

    Args:
        t: requested paper timesteps in [0, T] (T = initial noise x_T, 0 = final sample). Each request is snapped to
            the nearest t the sampler visits (every t for DDPM, ``T, T - T/S, ..., T/S, 0`` for DDIM with S steps).

    After the call, for the ``n`` distinct snapped times (descending):
        recorded_t: list of n ints.
        x_t: LongTensor (B, n, h, w, c) index latents of the noisy state x_t (``unit_to_indices``, so clamped).
        x0: LongTensor (B, n, h, w, c) index latents of the x0 estimate made from x_t (at t = 0: the sample).
    """

    t: Sequence[int] = TRAJECTORY_T
    recorded_t: list[int] = field(default_factory=list)
    x_t: torch.Tensor | None = None
    x0: torch.Tensor | None = None

    def snapped(self, visited: Sequence[int]) -> list[int]:
        """The visited paper times nearest to each requested t (ties -> the larger t), distinct, descending.

        Raises:
            ValueError: a requested t outside [0, T] (T = max(visited)).
        """
        T = max(visited)
        bad = [t for t in self.t if not 0 <= int(t) <= T]
        if bad:
            raise ValueError(f"trajectory times must lie in [0, {T}], got {bad}")
        chosen = {min(visited, key=lambda v: (abs(v - int(t)), -v)) for t in self.t}
        return sorted(chosen, reverse=True)


# ---------------------------------------------------------------------------------------------------- run loading
@dataclass
class RunModel:
    """A trained run ready to sample: its resolved config (dict of ``RUN/config.json``), U-Net and codec."""

    run_dir: Path
    config: dict
    model: Any  # diffusers.UNet2DModel, eval mode
    codec: Any  # mbldm.codec.Codec

    @property
    def variant(self) -> str:
        return self.config["variant"]


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {run_dir} is not an mbldm training run (see `mbldm train`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [k for k in _RUN_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (expected a resolved TrainConfig)")
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"{path}: variant is {cfg['variant']!r}, expected one of {VARIANTS}")
    if len(cfg["latent_shape"]) != 3:
        raise ValueError(f"{path}: latent_shape must be [h, w, c], got {cfg['latent_shape']}")
    return cfg


def _load_raw_weights(run_dir: Path, model) -> None:
    """Replace ``model``'s (EMA) weights by the raw training weights of the latest checkpoint."""
    from safetensors.torch import load_file

    from mbldm.diffusion.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete step_* checkpoint holding non-EMA weights "
                                "(use the EMA weights in RUN/model, the default)")
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; cannot load the non-EMA weights of {ckpt}")
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match RUN/model's architecture ({exc})") from None


def load_run(run_dir: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> RunModel:
    """Load ``RUN/config.json``, the U-Net (``RUN/model``, EMA weights) and the codec (``RUN/codec``).

    Args:
        run_dir: a training run directory (contract: config.json, codec/, model/, checkpoints/).
        use_ema: True -> EMA weights from ``RUN/model``; False -> raw weights of the latest checkpoint
            (``RUN/checkpoints/step_*/model.safetensors``).
        device: where the U-Net goes.

    Raises:
        FileNotFoundError: missing run directory, config, model or codec.
        ValueError: a config that is not a resolved TrainConfig, or a model whose shape disagrees with it.
    """
    from diffusers import UNet2DModel

    from mbldm.codec import Codec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    cfg = _read_run_config(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no exported model (config.json + safetensors); has training saved?")
    model = UNet2DModel.from_pretrained(str(model_dir))
    if not use_ema:
        _load_raw_weights(run_dir, model)
    codec = Codec.load(run_dir / "codec")
    h, w, c = cfg["latent_shape"]
    K = int(cfg["num_codewords"])
    if codec.latent_channels != c or codec.num_codewords != K:
        raise ValueError(f"{run_dir}: codec has c={codec.latent_channels}, K={codec.num_codewords} but config says "
                         f"c={c}, K={K}")
    want_in = 2 * c if cfg["self_condition"] else c
    want_out = c if cfg["variant"] == "continuous" else c * K
    if model.config.in_channels != want_in or model.config.out_channels != want_out:
        raise ValueError(f"{model_dir}: U-Net has {model.config.in_channels} -> {model.config.out_channels} channels, "
                         f"the {cfg['variant']} config (self_condition={cfg['self_condition']}) needs "
                         f"{want_in} -> {want_out}")
    model.to(device).eval()
    return RunModel(run_dir, cfg, model, codec)


# ---------------------------------------------------------------------------------------------------- sampling core
def resolve_steps(sampler: str, steps: int | None, T: int) -> int:
    """Number of reverse steps: DDPM always T (ancestral, every step); DDIM S with 1 <= S <= T (default 50, or T
    when T < 50).

    Raises:
        ValueError: unknown sampler; DDPM with ``steps`` other than None or T; DDIM with S < 1 or S > T.
    """
    from mbldm.diffusion.schedule import ddim_timesteps

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "ddpm":
        if steps is not None and int(steps) != T:
            raise ValueError(f"the ddpm sampler runs all T={T} steps (ancestral); got steps={steps}. "
                             "Use sampler='ddim' (--sampler ddim) for fewer steps")
        return T
    S = min(DEFAULT_DDIM_STEPS, T) if steps is None else int(steps)
    if S < 1 or S > T:
        raise ValueError(f"ddim steps must satisfy 1 <= S <= T={T}, got S={S} (a DDIM schedule cannot have more "
                         "steps than the model was trained with)")
    ddim_timesteps(T, S)  # the schedule module's own check
    return S


def _per_image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed (seed + global index)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_latents(
    model,
    scheduler,
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    num_codewords: int,
    *,
    variant: str = "continuous",
    self_condition: bool = False,
    steps: int | None = None,
    eta: float = 0.0,
    temperature: float = 1.0,
    tau: float = 1.0,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process for one batch in memory and return integer latents (no decoding, no I/O).

    Args:
        model: U-Net ``(B, c or 2c, h, w), timesteps (B,) -> .sample`` (B, c, h, w) eps (continuous) or
            (B, c*K, h, w) logits (categorical); run on its own device.
        scheduler: a diffusers DDPMScheduler or DDIMScheduler (``make_scheduler``) whose ``prediction_type`` is
            "epsilon" (continuous) or "sample" (categorical); ``set_timesteps`` is called here.
        seeds: one seed per image (B of them); image b uses ``torch.Generator().manual_seed(seeds[b])`` for its
            initial noise, its temperature samples and its scheduler noise, in that order.
        latent_shape: (h, w, c).
        num_codewords: K, the index range [0, K-1] mapped to [-1, 1] (``indices_to_unit``).
        variant: "continuous" or "categorical".
        self_condition: feed ``cat([x_t, x0_prev])`` (x0_prev = zeros at the first step).
        steps: reverse steps (default: all T for DDPM, 50 for DDIM); checked by :func:`resolve_steps`.
        eta: DDIM noise scale >= 0 (must be 0 for DDPM).
        temperature: gamma of Eq. 25 for the categorical variant, >= 0 (0 = argmax); must stay 1.0 otherwise.
        tau: Gumbel-softmax temperature (Eq. 20) of the categorical self-conditioning estimate: the run's training
            ``tau`` (ignored for continuous models or without self-conditioning).
        trajectory: optional :class:`Trajectory` to fill with x_t and x0 estimates at chosen times.
        progress: show a tqdm bar over the steps.

    Returns:
        LongTensor (B, h, w, c) on the CPU, values in [0, K-1].

    Raises:
        ValueError: bad variant / steps / eta / temperature, or a scheduler whose prediction type does not match.
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    from mbldm.diffusion.categorical import (
        expected_index_unit,
        gumbel_softmax,
        logits_from_model_output,
        temperature_sample,
    )
    from mbldm.diffusion.schedule import indices_to_unit, self_condition_input, unit_to_indices

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    want_pred = "epsilon" if variant == "continuous" else "sample"
    if scheduler.config.prediction_type != want_pred:
        raise ValueError(f"the {variant} variant needs a scheduler with prediction_type={want_pred!r}, got "
                         f"{scheduler.config.prediction_type!r}")
    if isinstance(scheduler, DDIMScheduler):
        sampler = "ddim"
    elif isinstance(scheduler, DDPMScheduler):
        sampler = "ddpm"
    else:
        raise ValueError(f"unsupported scheduler {type(scheduler).__name__}; use make_scheduler('ddpm'|'ddim')")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} applies to the ddim sampler only (ddpm is always fully stochastic)")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if variant == "continuous" and temperature != 1.0:
        raise ValueError("temperature (Eq. 25) applies to the categorical variant only; this run is continuous")
    if len(seeds) < 1:
        raise ValueError("generate_latents needs at least one seed")
    T = int(scheduler.config.num_train_timesteps)
    S = resolve_steps(sampler, steps, T)
    scheduler.set_timesteps(S)

    h, w, c = (int(v) for v in latent_shape)
    K = int(num_codewords)
    B = len(seeds)
    device = next(model.parameters()).device
    gens = _per_image_generators(seeds)
    step_kwargs = {"eta": float(eta)} if sampler == "ddim" else {}

    x = randn_tensor((B, c, h, w), generator=gens, device=device, dtype=torch.float32)  # (B, c, h, w) x_T
    x = x * scheduler.init_noise_sigma
    x0_prev = torch.zeros_like(x)  # (B, c, h, w) self-conditioning input at the first step

    timesteps = [int(k) for k in scheduler.timesteps]
    visited = [k + 1 for k in timesteps] + [0]  # paper times of the states x_t met along the way
    keep = set(trajectory.snapped(visited)) if trajectory is not None else set()
    frames_xt, frames_x0, recorded = [], [], []

    for k in tqdm(timesteps, desc=f"{sampler} {S} steps", disable=not progress, leave=False):
        x_in = self_condition_input(x, x0_prev) if self_condition else x  # (B, 2c or c, h, w)
        t_batch = torch.full((B,), k, device=device, dtype=torch.long)
        out = model(x_in, t_batch).sample  # (B, c, h, w) eps  or  (B, c*K, h, w) logits
        x0_cond = None  # self-conditioning estimate for the next step when it is not the scheduler's x0
        if variant == "continuous":
            model_output = out
        else:
            logits = logits_from_model_output(out, c, K)  # (B, c, K, h, w)
            z0 = temperature_sample(logits, temperature, generator=gens)  # (B, c, h, w) long, Eq. 25
            model_output = indices_to_unit(z0, K).to(x.dtype)  # (B, c, h, w) in [-1, 1]
            if self_condition:  # the trainer's estimate: expected index under Gumbel-softmax weights (Eq. 20)
                x0_cond = expected_index_unit(gumbel_softmax(logits, tau, generator=gens), K)  # (B, c, h, w)
        step = scheduler.step(model_output, k, x, generator=gens, **step_kwargs)
        if k + 1 in keep:
            recorded.append(k + 1)
            frames_xt.append(unit_to_indices(x, K).cpu())
            frames_x0.append(unit_to_indices(step.pred_original_sample, K).cpu())
        x0_prev = step.pred_original_sample if x0_cond is None else x0_cond  # (B, c, h, w)
        x = step.prev_sample  # (B, c, h, w) x_{t-1}

    z = unit_to_indices(x, K).cpu()  # (B, c, h, w) long in [0, K-1]
    if trajectory is not None:
        if 0 in keep:
            recorded.append(0)
            frames_xt.append(z)
            frames_x0.append(z)
        trajectory.recorded_t = recorded
        trajectory.x_t = torch.stack(frames_xt, dim=1).permute(0, 1, 3, 4, 2)  # (B, n, h, w, c)
        trajectory.x0 = torch.stack(frames_x0, dim=1).permute(0, 1, 3, 4, 2)  # (B, n, h, w, c)
    return z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, c)


# ---------------------------------------------------------------------------------------------------- images
def make_grid(images: np.ndarray, ncol: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images row-major into one image (numpy version of torchvision's ``make_grid``).

    Args:
        images: uint8 (N, H, W, 3), N >= 1.
        ncol: images per row (default ``ceil(sqrt(N))``).
        padding: pixels between images and around the border.
        pad_value: grey level of the padding.

    Returns:
        uint8 (rows*(H+p)+p, ncol*(W+p)+p, 3), rows = ceil(N / ncol); empty cells hold ``pad_value``.

    Raises:
        ValueError: not a non-empty uint8 (N, H, W, 3) array, or ncol < 1 / padding < 0.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"make_grid expects non-empty uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    N, H, W, _ = images.shape
    ncol = math.ceil(math.sqrt(N)) if ncol is None else int(ncol)
    if ncol < 1 or padding < 0:
        raise ValueError(f"make_grid needs ncol >= 1 and padding >= 0, got ncol={ncol}, padding={padding}")
    rows = math.ceil(N / ncol)
    p = padding
    grid = np.full((rows * (H + p) + p, ncol * (W + p) + p, 3), pad_value, np.uint8)
    for n, img in enumerate(images):
        r, col = divmod(n, ncol)
        top, left = p + r * (H + p), p + col * (W + p)
        grid[top:top + H, left:left + W] = img
    return grid


def _decode_frames(codec, frames: torch.Tensor) -> np.ndarray:
    """Decode trajectory frames: LongTensor (B, m, h, w, c) -> uint8 (B, m, H, W, 3)."""
    B, m = frames.shape[:2]
    flat = frames.reshape(B * m, *frames.shape[2:]).numpy().astype(codec.index_dtype)  # (B*m, h, w, c)
    dec = codec.decode(flat)  # (B*m, H, W, 3)
    return dec.reshape(B, m, *dec.shape[1:])


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True (--overwrite) to write "
                              "into it")
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_indices(num: int, indices: Sequence[int] | None) -> list[int]:
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    if indices is None:
        return list(range(int(num)))
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty: nothing to sample")
    bad = [i for i in idx if not 0 <= i < num]
    if bad:
        raise ValueError(f"indices must lie in [0, {num - 1}] (num={num}), got {bad[:10]}")
    if len(set(idx)) != len(idx):
        raise ValueError("indices holds duplicates; each global image index may be produced once")
    return idx


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when available, else cpu; anything else -> ``torch.device(device)``.

    Raises:
        ValueError: a CUDA device when torch has no CUDA here (instead of torch's "not compiled with CUDA"
            AssertionError deep inside ``load_run``).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available in this torch build/machine "
                         f"(torch {torch.__version__}); use 'cpu'")
    return torch.device(device)


def sample(
    run_dir: str | Path,
    num: int,
    out_dir: str | Path | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    temperature: float = 1.0,
    refiner: str | Path | None = None,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    trajectory: Sequence[int] | bool | None = None,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Generate images from a training run, decode them with the run's codec and (optionally) write PNGs.

    Image ``i`` (a global index in [0, num)) is a function of ``seed + i`` alone (see the module docstring).

    Args:
        run_dir: training run directory (contract 6).
        num: total number of images N of the (possibly sharded) job.
        out_dir: folder for ``img_{i:06d}.png``, ``grid.png``, ``samples.json`` (+ ``raw/``, ``trajectory/``);
            None -> nothing is written and the images are returned in memory.
        sampler: "ddpm" (all T steps, ancestral) or "ddim".
        steps: DDIM steps S <= T (default 50); for DDPM None or T.
        eta: DDIM eta >= 0 (0 for DDPM).
        seed: base seed; image i uses seed + i.
        batch_size: images per forward pass (does not change the images).
        temperature: gamma of Eq. 25 (categorical runs only; 0 = argmax).
        refiner: optional refiner directory (``mbldm refiner train``), applied after decoding (§4.2.2).
        use_ema: EMA weights (``RUN/model``, default) or the latest checkpoint's raw weights.
        device: torch device (default cuda if available, else cpu).
        indices: global indices to produce (default ``range(num)``); a shard passes its subset.
        progress: show progress bars.
        overwrite: allow writing into a non-empty ``out_dir``.
        trajectory: paper times in [0, T] at which to record x_t and x0 estimates (Fig. 7), or True for
            ``default_trajectory_t(T)`` (T, 0.9 T, ..., 0).
        shard: ``(process_index, num_processes)`` when this call is one process of :func:`sample_sharded`: the
            caller has checked ``out_dir`` (it may already hold other shards' images), the summary goes to
            ``SHARD_SUMMARY_FILE`` and no grid is written (:func:`merge_sample_shards` writes both).

    Returns:
        dict with ``"summary"`` (what ``samples.json`` holds), ``"indices"`` (list), ``"latents"`` (index dtype
        (n, h, w, c)), and: with ``out_dir``: ``"files"`` (list of Path), ``"grid"`` (Path); without:
        ``"images"`` uint8 (n, H, W, 3) (+ ``"raw_images"`` with a refiner); with ``trajectory``: ``"trajectory"``
        = {"t": list, "x_t": uint8 (n, m, H, W, 3), "x0": uint8 (n, m, H, W, 3)}.

    Raises:
        FileNotFoundError / ValueError: see :func:`load_run`, :func:`resolve_steps`, :func:`generate_latents`;
        ValueError for bad num / indices / batch_size; FileExistsError: non-empty ``out_dir`` without overwrite.
    """
    from tqdm.auto import tqdm

    from mbldm.diffusion.schedule import make_scheduler
    from mbldm.io.atomic import write_json
    from mbldm.io.images import save_png

    idx = _check_indices(num, indices)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if Path(run_dir).is_dir():  # cheap checks before loading the model
        resolve_steps(sampler, steps, int(_read_run_config(Path(run_dir))["timesteps"]))
    dev = _resolve_device(device)
    run = load_run(run_dir, use_ema=use_ema, device=dev)
    cfg = run.config
    T = int(cfg["timesteps"])
    S = resolve_steps(sampler, steps, T)
    if trajectory is True:
        trajectory = default_trajectory_t(T)
    elif trajectory is False:
        trajectory = None
    if run.variant == "continuous" and temperature != 1.0:
        raise ValueError("temperature (Eq. 25) applies to categorical runs only; "
                         f"{run.run_dir} is a continuous run")
    pred = "epsilon" if run.variant == "continuous" else "sample"
    scheduler = make_scheduler(sampler, T=T, schedule=cfg["beta_schedule"], prediction_type=pred)
    ref = None
    if refiner is not None:
        from mbldm.diffusion.refiner import Refiner

        ref = Refiner.load(refiner, device=dev)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if shard is None:
            _prepare_out_dir(out, overwrite)
        else:  # sample_sharded checked the folder on every process before any of them wrote into it
            _check_shard(shard)
            out.mkdir(parents=True, exist_ok=True)

    h, w, c = (int(v) for v in cfg["latent_shape"])
    all_latents, images_mem, raw_mem, files, grid_imgs = [], [], [], [], []
    traj_t, traj_xt, traj_x0 = None, [], []
    start = time.time()
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for chunk in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        rec = Trajectory(t=trajectory) if trajectory is not None else None
        z = generate_latents(run.model, scheduler, [seed + i for i in chunk], (h, w, c), cfg["num_codewords"],
                             variant=run.variant, self_condition=bool(cfg["self_condition"]), steps=S, eta=eta,
                             temperature=temperature, tau=float(cfg.get("tau", 1.0)), trajectory=rec,
                             progress=False)
        z_np = z.numpy().astype(run.codec.index_dtype)  # (b, h, w, c)
        all_latents.append(z_np)
        raw = run.codec.decode(z_np)  # (b, H, W, 3) uint8
        imgs = ref.apply(raw) if ref is not None else raw
        if rec is not None:
            traj_t = rec.recorded_t
            traj_xt.append(_decode_frames(run.codec, rec.x_t))  # (b, m, H, W, 3)
            traj_x0.append(_decode_frames(run.codec, rec.x0))
        if len(grid_imgs) < GRID_MAX_IMAGES:
            grid_imgs.extend(imgs[: GRID_MAX_IMAGES - len(grid_imgs)])
        if out is None:
            images_mem.append(imgs)
            if ref is not None:
                raw_mem.append(raw)
            continue
        for j, i in enumerate(chunk):
            path = out / IMAGE_NAME.format(i)
            save_png(path, imgs[j], overwrite=True)
            files.append(path)
            if ref is not None:
                save_png(out / "raw" / IMAGE_NAME.format(i), raw[j], overwrite=True)
            if rec is not None:
                stem = IMAGE_NAME.format(i)[:-4]
                save_png(out / "trajectory" / f"{stem}_xt.png", make_grid(traj_xt[-1][j], ncol=len(traj_t)),
                         overwrite=True)
                save_png(out / "trajectory" / f"{stem}_x0.png", make_grid(traj_x0[-1][j], ncol=len(traj_t)),
                         overwrite=True)
    seconds = time.time() - start

    H, W = h * run.codec.patch_size, w * run.codec.patch_size
    summary = {
        "format": "mbldm-samples",
        "run": str(Path(run_dir).resolve()),
        "variant": run.variant,
        "sampler": sampler,
        "steps": S,
        "timesteps": T,
        "eta": float(eta) if sampler == "ddim" else None,
        "temperature": float(temperature) if run.variant == "categorical" else None,
        "seed": int(seed),
        "seed_rule": "image i uses torch.Generator('cpu').manual_seed(seed + i)",
        "use_ema": bool(use_ema),
        "refiner": str(Path(refiner).resolve()) if refiner is not None else None,
        "num": int(num),
        "count": len(idx),
        "indices": idx,
        "image_size": [H, W],
        "latent_shape": [h, w, c],
        "num_codewords": int(cfg["num_codewords"]),
        "files": IMAGE_NAME.replace("{:06d}", "{index:06d}"),
        "grid": GRID_FILE,
        "grid_images": len(grid_imgs),
        "trajectory_t": traj_t,
        "batch_size": int(batch_size),
        "device": str(dev),
        "seconds": round(seconds, 3),
    }
    result: dict = {"summary": summary, "indices": idx, "latents": np.concatenate(all_latents)}
    if out is not None and shard is not None:
        summary["shard"] = [int(shard[0]), int(shard[1])]
        write_json(out / SHARD_SUMMARY_FILE.format(*shard), summary)
        result.update(files=files, grid=None)
    elif out is not None:
        grid_path = out / GRID_FILE
        save_png(grid_path, make_grid(np.stack(grid_imgs)), overwrite=True)
        write_json(out / SUMMARY_FILE, summary)
        result.update(files=files, grid=grid_path)
    else:
        result["images"] = np.concatenate(images_mem)
        if ref is not None:
            result["raw_images"] = np.concatenate(raw_mem)
    if trajectory is not None:
        result["trajectory"] = {"t": traj_t, "x_t": np.concatenate(traj_xt), "x0": np.concatenate(traj_x0)}
    return result


# ---------------------------------------------------------------------------------------------------- several processes
def _check_shard(shard: tuple[int, int]) -> None:
    r, n = shard
    if not (isinstance(r, int) and isinstance(n, int) and 0 <= r < n):
        raise ValueError(f"shard must be (process_index, num_processes) with 0 <= process_index < num_processes, "
                         f"got {shard!r}")


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
    _check_indices(num, None)
    if Path(run_dir).is_dir():  # cheap checks before anything is written
        resolve_steps(kwargs.get("sampler", "ddim"), kwargs.get("steps"),
                      int(_read_run_config(Path(run_dir))["timesteps"]))
    r, out = dist.process_index(), Path(out_dir)
    _prepare_out_dir(out, overwrite)  # on every process, before any process writes
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
