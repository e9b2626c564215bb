"""The reverse process of a latent diffusion model, in memory (§3.2, §4.2): DDPM / DDIM steps from noise to an index
latent, both parameterisations, per-image seeds, optional trajectory recording. No decoding, no file I/O (that is
:mod:`mbldm.diffusion.sampling`).

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

Per-image seeds: image ``b`` of a batch owns ``torch.Generator("cpu").manual_seed(seeds[b])``, which draws, in
order, its initial noise, then at every step its temperature sample and its self-conditioning Gumbel noise
(categorical) and its scheduler noise. Images therefore depend only on their seed, never on the batch size or on
which other images share the batch (diffusers' ``randn_tensor`` draws one tensor per generator).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "SAMPLERS",
    "VARIANTS",
    "TRAJECTORY_T",
    "DEFAULT_DDIM_STEPS",
    "Trajectory",
    "resolve_steps",
    "default_trajectory_t",
    "generate_latents",
    "ESTIMATES",
    "FinalDistribution",
]

SAMPLERS = ("ddpm", "ddim")
VARIANTS = ("continuous", "categorical")
#: Paper timesteps shown in Fig. 7 (t = 1000, 900, ..., 0) for T = 1000.
TRAJECTORY_T = tuple(range(1000, -1, -100))
DEFAULT_DDIM_STEPS = 50


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
    parameterization=None,
    estimate: str = "sample",
    self_condition_estimate: str = "gumbel",
    alphas_cumprod: torch.Tensor | None = None,
    final: FinalDistribution | None = None,
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
        parameterization: the run's :class:`mbldm.diffusion.parameterization.Parameterization` (what the output
            means, and the per-channel codebook sizes); None: the paper's (epsilon / free logits, every K_j = K).
            Continuous runs with an x0 or v output, or with preconditioning, need a scheduler with
            ``prediction_type="sample"`` (they are stepped from their z_0 estimate).
        estimate: categorical: the z_0 each intermediate step is taken from: "sample" (Eq. 25 at
            ``temperature``, Algorithm 2) or "mean" (the expected index under the predicted distribution). The last
            step always returns a sample at ``temperature`` (0: the mode).
        self_condition_estimate: categorical self-conditioning input: "gumbel" (expected index under Eq. 20
            weights at ``tau``, the version-1 runs) or "mean" (expected index, no noise); as the run was trained.
        alphas_cumprod: (T,) float64 abar of the run (default: from the scheduler's betas in float64), used by
            preconditioned parameterisations.
        final: categorical runs: a :class:`FinalDistribution` to receive the probabilities of the last step's
            predicted distribution (for the soft decode, Eq. 21 with probabilities).

    Returns:
        LongTensor (B, h, w, c) on the CPU, values in [0, K_j - 1].

    Raises:
        ValueError: bad variant / steps / eta / temperature, or a scheduler whose prediction type does not match.
    """
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    from mbldm.diffusion.parameterization import Parameterization
    from mbldm.diffusion.schedule import self_condition_input, unit_to_indices

    h, w, c = (int(v) for v in latent_shape)
    K = int(num_codewords)
    param = parameterization if parameterization is not None else Parameterization(variant, (K,) * c)
    sampler = _check_generate_args(scheduler, param, eta, temperature, tau, seeds, estimate, self_condition_estimate)
    T = int(scheduler.config.num_train_timesteps)
    S = resolve_steps(sampler, steps, T)
    scheduler.set_timesteps(S)
    if alphas_cumprod is None:
        alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.to(torch.float64), dim=0)

    B = len(seeds)
    device = next(model.parameters()).device
    alphas_cumprod = alphas_cumprod.to(device)
    gens = _per_image_generators(seeds)
    step_kwargs = {"eta": float(eta)} if sampler == "ddim" else {}
    sizes = param.sizes

    x = randn_tensor((B, c, h, w), generator=gens, device=device, dtype=torch.float32)  # (B, c, h, w) x_T
    x = x * scheduler.init_noise_sigma
    x0_prev = torch.zeros_like(x)  # (B, c, h, w) self-conditioning input at the first step

    timesteps = [int(k) for k in scheduler.timesteps]
    visited = [k + 1 for k in timesteps] + [0]  # paper times of the states x_t met along the way
    keep = set(trajectory.snapped(visited)) if trajectory is not None else set()
    frames_xt, frames_x0, recorded = [], [], []
    choice = _StepChoice(param, temperature, tau, estimate, self_condition_estimate, self_condition, alphas_cumprod)

    for n, k in enumerate(tqdm(timesteps, desc=f"{sampler} {S} steps", disable=not progress, leave=False)):
        x_in = self_condition_input(x, x0_prev) if self_condition else x  # (B, 2c or c, h, w)
        t_batch = torch.full((B,), k, device=device, dtype=torch.long)
        out = model(x_in, t_batch).sample  # (B, c, h, w) or (B, c*K, h, w) or (B, c*3L, h, w)
        model_output, x0_cond = choice(out, x, t_batch, gens, last=n == len(timesteps) - 1)
        step = scheduler.step(model_output, k, x, generator=gens, **step_kwargs)
        if k + 1 in keep:
            recorded.append(k + 1)
            frames_xt.append(unit_to_indices(x, sizes).cpu())
            frames_x0.append(unit_to_indices(step.pred_original_sample, sizes).cpu())
        x0_prev = step.pred_original_sample if x0_cond is None else x0_cond  # (B, c, h, w)
        x = step.prev_sample  # (B, c, h, w) x_{t-1}

    z = unit_to_indices(x, sizes).cpu()  # (B, c, h, w) long in [0, K_j - 1]
    if final is not None:
        if not param.categorical:
            raise ValueError("a final distribution exists for categorical runs only")
        final.probabilities = torch.softmax(choice.last_distribution.logits(param.K), dim=2)  # (B, c, K, h, w)
    if trajectory is not None:
        _fill_trajectory(trajectory, recorded, frames_xt, frames_x0, z, final=0 in keep)
    return z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, c)


ESTIMATES = ("sample", "mean")


def _check_generate_args(scheduler, param, eta: float, temperature: float, tau: float, seeds: Sequence[int],
                         estimate: str, self_condition_estimate: str) -> str:
    """Validate :func:`generate_latents`' settings against each other and the scheduler; return the sampler name."""
    from diffusers import DDIMScheduler, DDPMScheduler

    want_pred = "epsilon" if not param.categorical and param.prediction == "epsilon" else "sample"
    if scheduler.config.prediction_type != want_pred:
        what = "categorical" if param.categorical else f"continuous ({param.prediction} output)"
        raise ValueError(f"the {what} variant needs a scheduler with prediction_type={want_pred!r}, got "
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
    if not param.categorical and temperature != 1.0:
        raise ValueError("temperature (Eq. 25) applies to the categorical variant only; this run is continuous")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if self_condition_estimate not in ("gumbel", "mean"):
        raise ValueError(f"self_condition_estimate must be 'gumbel' or 'mean', got {self_condition_estimate!r}")
    if len(seeds) < 1:
        raise ValueError("generate_latents needs at least one seed")
    return sampler


@dataclass
class FinalDistribution:
    """Receives, from :func:`generate_latents`, the categorical distribution of the last reverse step.

    Attributes:
        probabilities: (B, c, K, h, w) float32, summing to 1 over dim 2 (indices k >= K_j have probability 0);
            ``codec.decode_soft(probabilities)`` is the expected image E[D(z_0)] under it (Eq. 21 with the
            probabilities instead of Gumbel-softmax weights).
    """

    probabilities: torch.Tensor | None = None


@dataclass
class _StepChoice:
    """What the scheduler steps from at each step, and the next self-conditioning estimate when it is not the
    scheduler's x0 (``__call__`` returns both).

    Continuous: the eps output itself (epsilon runs), else the z_0 estimate of the parameterisation; None.
    Categorical: z_0 ~ the predicted distribution at ``temperature`` (Eq. 25) mapped to [-1, 1] -- or, with
    ``estimate="mean"`` on all but the last step, the expected index -- and with self-conditioning the trainer's
    estimate (the mean, or the expected index under Gumbel-softmax weights, Eq. 20).
    """

    param: object
    temperature: float
    tau: float
    estimate: str
    self_condition_estimate: str
    self_condition: bool
    alphas_cumprod: torch.Tensor
    last_distribution: object = None  # the categorical distribution of the latest step

    def __call__(self, out, x, t, gens, last: bool):
        from mbldm.diffusion.categorical import expected_unit, gumbel_softmax
        from mbldm.diffusion.schedule import indices_to_unit

        param = self.param
        if not param.categorical:
            if param.prediction == "epsilon":
                return out, None
            return param.x0(out, x, t, self.alphas_cumprod).to(x.dtype), None
        dist = self.last_distribution = param.distribution(out, x, t, self.alphas_cumprod)
        if self.estimate == "mean" and not last:
            model_output = dist.mean_unit().to(x.dtype)  # (B, c, h, w) in [-1, 1]
        else:
            z0 = dist.sample(self.temperature, generator=gens)  # (B, c, h, w) long, Eq. 25
            model_output = indices_to_unit(z0, param.sizes).to(x.dtype)  # (B, c, h, w) in [-1, 1]
        x0_cond = None
        if self.self_condition and self.self_condition_estimate == "gumbel":
            weights = gumbel_softmax(dist.logits(param.K), self.tau, generator=gens)  # Eq. 20
            x0_cond = expected_unit(weights, param.sizes)  # (B, c, h, w)
        elif self.self_condition:
            x0_cond = model_output if self.estimate == "mean" and not last else dist.mean_unit()
        return model_output, x0_cond


def _fill_trajectory(trajectory: Trajectory, recorded: list[int], frames_xt: list, frames_x0: list,
                     z: torch.Tensor, final: bool) -> None:
    """Store the recorded frames (B, c, h, w) in ``trajectory`` as (B, n, h, w, c); ``final`` adds t = 0 (z)."""
    if final:
        recorded.append(0)
        frames_xt.append(z)
        frames_x0.append(z)
    trajectory.recorded_t = recorded
    trajectory.x_t = torch.stack(frames_xt, dim=1).permute(0, 1, 3, 4, 2)  # (B, n, h, w, c)
    trajectory.x0 = torch.stack(frames_x0, dim=1).permute(0, 1, 3, 4, 2)  # (B, n, h, w, c)
