"""Gaussian diffusion math of DDPM (Ho et al. 2020), the paper's Eq. 2-5, plus the diffusers schedulers used to step.

Conventions
-----------
* Timesteps are 0-based, ``t in {0, ..., T-1}``; the paper's ``t = 1..T`` is our ``t = 0..T-1`` (as in diffusers
  and in Phil Wang's ``denoising-diffusion-pytorch``, the implementation the paper builds on, §4.2.1).
* ``betas[t]`` is the paper's beta_{t+1}; ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])`` (a_bar_t).
* Schedules are float64 (T,) tensors; coefficients gathered for a batch are computed in float64 and cast to the
  dtype of the tensor they multiply, on that tensor's device.
* ``t`` arguments are a LongTensor (B,) (one timestep per batch element), a 0-d tensor or a Python int (same t
  for the whole batch).
* Latent indices live in the "unit" space [-1, 1]: ``unit(k) = 2 k / (K - 1) - 1`` (``indices_to_unit``), the
  continuous-style model of §4.2.2 diffuses these values (index space of §3.2, ordered by §3.2.1).

Stepping (reverse process) is done by diffusers schedulers built with ``make_scheduler``; see its docstring for the
configuration choices and for how per-image seeds work.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler

PAPER_T = 1000
PAPER_BETA_START = 1e-4
PAPER_BETA_END = 2e-2

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MIN_SNR_OBJECTIVES = ("epsilon", "x0", "v")

# diffusers' name of the Nichol & Dhariwal cosine schedule.
_DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# ----------------------------------------------------------------------------------------------------------------
# Schedules (Eq. 2)
# ----------------------------------------------------------------------------------------------------------------
def make_betas(
    schedule: str = "linear", T: int = PAPER_T, beta_start: float = PAPER_BETA_START, beta_end: float = PAPER_BETA_END
) -> torch.Tensor:
    """Variance schedule beta_1..beta_T of the forward process q(x_t | x_{t-1}) (paper Eq. 2).

    Args:
        schedule: ``"linear"`` (the paper / Ho et al.: evenly spaced from ``beta_start`` to ``beta_end``) or
            ``"cosine"`` (Nichol & Dhariwal 2021, Eq. 17: a_bar(t) = cos((t/T + 0.008) / 1.008 * pi/2)^2,
            beta_t = min(1 - a_bar(t+1)/a_bar(t), 0.999); identical to diffusers' ``"squaredcos_cap_v2"``;
            ``beta_start``/``beta_end`` are ignored).
        T: number of timesteps (>= 1).
        beta_start, beta_end: first and last beta of the linear schedule, 0 < beta_start <= beta_end < 1.

    Returns:
        (T,) float64 tensor; ``betas[0] == beta_start`` and ``betas[-1] == beta_end`` for "linear".

    Raises:
        ValueError: unknown schedule, T < 1 or betas outside (0, 1).
    """
    if T < 1:
        raise ValueError(f"make_betas: T must be >= 1, got {T}")
    if schedule == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"make_betas: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) t/T
        a_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1.0 - a_bar[1:] / a_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"make_betas: unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """a_bar_t = prod_{s <= t} (1 - beta_s), so that q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) Id).

    Args:
        betas: (T,) tensor with values in (0, 1).

    Returns:
        (T,) float64 tensor, strictly decreasing, in (0, 1).

    Raises:
        ValueError: betas not 1-D or outside (0, 1).
    """
    if betas.ndim != 1:
        raise ValueError(f"alphas_cumprod_from_betas expects (T,) betas, got shape {tuple(betas.shape)}")
    betas = betas.to(torch.float64)
    if bool((betas <= 0).any()) or bool((betas >= 1).any()):
        raise ValueError("alphas_cumprod_from_betas: betas must lie in (0, 1)")
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """a_bar[t] as float64 shaped (B, 1, ..., 1) to broadcast against ``like`` (B, ...), on ``like``'s device."""
    t = torch.as_tensor(t, device=like.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be an int or have shape ({like.shape[0]},), got shape {tuple(t.shape)}")
    a_bar = alphas_cumprod.to(device=like.device, dtype=torch.float64)[t]  # (B,)
    return a_bar.view(-1, *([1] * (like.ndim - 1)))


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = a_bar_t / (1 - a_bar_t).

    Args:
        alphas_cumprod: (T,) tensor.
        t: LongTensor (B,) of timesteps in [0, T-1].

    Returns:
        (B,) float64 tensor on ``t``'s device.
    """
    t = torch.as_tensor(t).long()
    a_bar = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    return a_bar / (1.0 - a_bar)


def min_snr_weight(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0, objective: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"; §4.2.1).

    The weight multiplies the per-sample MSE of the given objective so that every objective is equivalent to
    weighting the x0-MSE by min(SNR, gamma):

    * ``"epsilon"`` (Eq. 4 loss): min(SNR, gamma) / SNR   (e.g. SNR 4 -> 1, SNR 0.5 -> 1, SNR 10 -> 0.5 for gamma 5)
    * ``"x0"``      (Eq. 5 loss): min(SNR, gamma)
    * ``"v"``       (v-prediction): min(SNR, gamma) / (SNR + 1)

    Args:
        alphas_cumprod: (T,) tensor.
        t: LongTensor (B,) of timesteps.
        gamma: the clamp value (paper's base implementation and Hang et al. use 5), > 0.
        objective: one of ``"epsilon"``, ``"x0"``, ``"v"``.

    Returns:
        (B,) float32 weights on ``t``'s device.

    Raises:
        ValueError: unknown objective or gamma <= 0.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_weight: gamma must be > 0, got {gamma}")
    s = snr(alphas_cumprod, t)  # (B,) float64
    clipped = s.clamp(max=gamma)
    if objective == "epsilon":
        w = clipped / s
    elif objective == "x0":
        w = clipped
    elif objective == "v":
        w = clipped / (s + 1.0)
    else:
        raise ValueError(f"min_snr_weight: unknown objective {objective!r}; expected one of {MIN_SNR_OBJECTIVES}")
    return w.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Forward process and reparameterisations (Eq. 4, 5, 24)
# ----------------------------------------------------------------------------------------------------------------
def q_sample(x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps (Ho et al. Eq. 4).

    Args:
        x0: (B, C, h, w) (any (B, ...) works) clean samples, e.g. latents in unit space [-1, 1].
        t: LongTensor (B,) timesteps in [0, T-1] (or an int).
        noise: eps ~ N(0, Id), same shape as ``x0``.
        alphas_cumprod: (T,) tensor.

    Returns:
        x_t with the shape and dtype of ``x0``.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    a_bar = _gather(alphas_cumprod, t, x0)
    return (a_bar.sqrt().to(x0.dtype) * x0 + (1.0 - a_bar).sqrt().to(x0.dtype) * noise).to(x0.dtype)


def _a_b(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 24 constants a_t = 1/sqrt(a_bar_t), b_t = sqrt(1/a_bar_t - 1), shaped to broadcast."""
    a_bar = _gather(alphas_cumprod, t, like)
    return (1.0 / a_bar).sqrt().to(like.dtype), (1.0 / a_bar - 1.0).sqrt().to(like.dtype)


def x0_from_eps(x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for x_0: x_0 = a_t x_t - b_t eps, a_t = 1/sqrt(a_bar_t), b_t = sqrt(1/a_bar_t - 1).

    Args:
        x_t: (B, C, h, w) noisy samples.
        t: LongTensor (B,) timesteps (or an int).
        eps: predicted noise, same shape as ``x_t``.
        alphas_cumprod: (T,) tensor.

    Returns:
        x_0 estimate with the shape and dtype of ``x_t`` (not clipped).
    """
    a, b = _a_b(alphas_cumprod, t, x_t)
    return a * x_t - b * eps


def eps_from_x0(x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise implied by an x_0 estimate: eps = (a_t x_t - x_0) / b_t (the paper's Eq. 24 with its a_t, b_t).

    Args:
        x_t: (B, C, h, w) noisy samples.
        t: LongTensor (B,) timesteps (or an int). b_t > 0 for every t since a_bar_t < 1.
        x0: x_0 estimate, same shape as ``x_t``.
        alphas_cumprod: (T,) tensor.

    Returns:
        eps with the shape and dtype of ``x_t``. Inverse of ``x0_from_eps``.
    """
    a, b = _a_b(alphas_cumprod, t, x_t)
    return (a * x_t - x0) / b


# ----------------------------------------------------------------------------------------------------------------
# Index space <-> unit space (§3.2, §4.2.2)
# ----------------------------------------------------------------------------------------------------------------
CodebookSizes = "int | Sequence[int] | torch.Tensor"


def _sizes(K, z: torch.Tensor, name: str) -> torch.Tensor | int:
    """K as an int, or per-channel sizes (c,) as a float tensor shaped (1, c, 1, ..., 1) to broadcast against
    ``z`` (B, c, ...)."""
    if isinstance(K, (int,)) and not isinstance(K, bool):
        if K < 2:
            raise ValueError(f"{name}: K must be >= 2, got {K}")
        return K
    k = torch.as_tensor(K, dtype=torch.float32, device=z.device).reshape(-1)
    if z.ndim < 2 or k.numel() != z.shape[1]:
        raise ValueError(f"{name}: {k.numel()} codebook sizes for a tensor with channels at dim 1 of shape "
                         f"{tuple(z.shape)}")
    if bool((k < 2).any()):
        raise ValueError(f"{name}: every K must be >= 2, got {k.long().tolist()}")
    return k.view(1, -1, *([1] * (z.ndim - 2)))


def indices_to_unit(z: torch.Tensor, K) -> torch.Tensor:
    """Map codebook indices to the diffusion space [-1, 1]: unit(k) = 2 k / (K - 1) - 1.

    Index 0 -> -1, index K-1 -> +1, neighbouring indices are 2/(K-1) apart; after the §3.2.1 PCA ordering,
    neighbouring indices are similar codewords, which is what makes Gaussian noise on this value meaningful.

    Args:
        z: integer tensor (B, c, h, w) (uint8 / uint16 / int64 ...), values in [0, K_j - 1].
        K: one codebook size (>= 2) for every channel, or the (c,) sizes K_j of each latent channel (a sequence
            or tensor; ``Codec.codebook_sizes``), so that a 16-entry chroma codebook spans [-1, 1] as well.

    Returns:
        float32 tensor of the same shape, values in [-1, 1].

    Raises:
        ValueError: K < 2, a size list that does not match dim 1, or a floating-point ``z``.
    """
    k = _sizes(K, z, "indices_to_unit")
    if z.is_floating_point() or z.is_complex():
        raise ValueError(f"indices_to_unit expects integer indices, got dtype {z.dtype}")
    return z.to(torch.float32) * (2.0 / (k - 1)) - 1.0


def unit_to_indices(x: torch.Tensor, K) -> torch.Tensor:
    """Inverse of ``indices_to_unit``: k = round((x + 1) / 2 * (K - 1)), clamped to [0, K-1].

    Rounding is torch.round (half to even); values outside [-1, 1] (a sampler's output need not be clipped) map to
    the nearest end index 0 or K-1. NaN inputs have no defined index.

    Args:
        x: float tensor (B, c, h, w), nominally in [-1, 1].
        K: one codebook size (>= 2) or the (c,) per-channel sizes, as in ``indices_to_unit``.

    Returns:
        int64 (LongTensor) indices of the same shape in [0, K_j - 1].
    """
    k = _sizes(K, x, "unit_to_indices")
    idx = torch.round((x.to(torch.float32) + 1.0) * (0.5 * (k - 1)))
    if isinstance(k, int):
        return idx.clamp_(0, k - 1).long()
    return torch.minimum(idx.clamp_(min=0), k - 1).long()


# ----------------------------------------------------------------------------------------------------------------
# Reverse-process stepping with diffusers
# ----------------------------------------------------------------------------------------------------------------
def trailing_timesteps(T: int, S: int) -> list[int]:
    """The S timesteps visited by a "trailing" sampler with T training steps, descending.

    t_k = round(T - k T / S) - 1 for k = 0..S-1 (round half to even, in exact integer arithmetic), i.e. the
    "trailing" spacing of Lin et al. 2023 (Table 2) that diffusers implements; it equals the DDIM times of Phil
    Wang's ``denoising-diffusion-pytorch`` (linspace(-1, T-1, S+1), up to rounding). The first step is always T-1
    (pure noise), the last is round(T/S) - 1 >= 0, and the values are distinct since T/S >= 1.

    diffusers 0.42 computes the same formula in floating point, ``np.round(np.arange(T, 0, -T/S)) - 1``, which
    for some S (T=1000: S = 61, 103, 121, ...) yields S+1 steps ending at t = -1, and where T - k T/S is exactly
    a half can round the other way (T=1000, S=48: 936 instead of our 937). This never leaves [0, T-1].

    Raises:
        ValueError: S < 1, or S > T ("cannot take S=... steps with T=... timesteps").
    """
    if S < 1:
        raise ValueError(f"cannot take S={S} steps: S must be >= 1")
    if S > T:
        raise ValueError(f"cannot take S={S} steps with T={T} timesteps")
    return [_round_half_even((S - k) * T, S) - 1 for k in range(S)]


def _round_half_even(n: int, d: int) -> int:
    """round(n / d) with ties to even, exactly in integers (n >= 0, d > 0)."""
    q, r = divmod(n, d)
    return q + (2 * r > d or (2 * r == d and q % 2 == 1))


def ddim_timesteps(T: int, S: int) -> list[int]:
    """Timesteps the DDIM scheduler of ``make_scheduler("ddim", T)`` visits after ``set_timesteps(S)``, descending.

    S == T gives T-1, ..., 0; S = 50, T = 1000 gives 999, 979, ..., 19. See ``trailing_timesteps``.

    Raises:
        ValueError: S < 1 or S > T.
    """
    return trailing_timesteps(T, S)


class _ExactTrailingMixin:
    """``set_timesteps(S)`` with exact integer trailing spacing (see ``trailing_timesteps``)."""

    def _exact_trailing(self, num_inference_steps: int, device) -> None:
        T = self.config.num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(trailing_timesteps(T, num_inference_steps), dtype=torch.int64, device=device)


class TrailingDDIMScheduler(_ExactTrailingMixin, DDIMScheduler):
    """diffusers ``DDIMScheduler`` whose ``set_timesteps(S)`` visits ``trailing_timesteps(T, S)``.

    Only ``set_timesteps`` differs from diffusers. ``step`` is diffusers' own and takes the previous timestep as
    t - T // S (diffusers issues #9261, #12633); when S does not divide T this is at most one index away from the
    next visited timestep (e.g. T=1000, S=3: visits 999, 666, 332, steps 666 -> 333), a negligible difference.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._exact_trailing(num_inference_steps, device)


SPACINGS = ("trailing", "quadratic")


def quadratic_timesteps(T: int, S: int) -> list[int]:
    """Timesteps t_i = round((T - 1) (i / S)^2), i = S, S-1, ..., 0, descending and distinct.

    The first step is T-1 (pure noise), the last t = 0; steps are dense at small t, where a categorical sampler's
    final codeword choices are made (the trailing spacing's last step is round(T / S) - 1, e.g. t = 19 for S = 50,
    where the index noise is still about 10 index steps for K = 256). Rounding can merge the smallest values, so
    there are at most S + 1 (for T = 1000, S = 50: 47) distinct timesteps.

    Raises:
        ValueError: S < 1 or S > T.
    """
    if S < 1 or S > T:
        raise ValueError(f"cannot take S={S} steps with T={T} timesteps")
    return sorted({round((T - 1) * (i / S) ** 2) for i in range(S + 1)}, reverse=True)


class QuadraticDDIMScheduler(DDIMScheduler):
    """DDIM (eta = 0 deterministic) over ``quadratic_timesteps(T, S)``, stepping to the *next visited* timestep.

    diffusers' ``DDIMScheduler.step`` takes the previous timestep as t - T // S, which only fits evenly spaced
    timesteps; this subclass replaces ``step`` with the same update (DDIM Eq. 12 and 16, diffusers' clip and
    prediction types) from x_t to x_{t'}, t' the next timestep of the list (x_0 after the last). Per-image
    generators work as in diffusers (``randn_tensor``).
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        T = self.config.num_train_timesteps
        visited = quadratic_timesteps(T, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(visited, dtype=torch.int64, device=device)
        self._next = {t: (visited[i + 1] if i + 1 < len(visited) else -1) for i, t in enumerate(visited)}

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             generator=None, return_dict: bool = True, **_: object):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        t, t_prev = int(timestep), self._next[int(timestep)]
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "epsilon":
            x0, eps = (sample - (1 - abar).sqrt() * model_output) / abar.sqrt(), model_output
        elif self.config.prediction_type == "sample":
            x0 = model_output
            eps = (sample - abar.sqrt() * x0) / (1 - abar).sqrt()
        else:  # v_prediction
            x0 = abar.sqrt() * sample - (1 - abar).sqrt() * model_output
            eps = abar.sqrt() * model_output + (1 - abar).sqrt() * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        prev = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            prev = prev + std * randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                             dtype=model_output.dtype)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


class TrailingDDPMScheduler(_ExactTrailingMixin, DDPMScheduler):
    """diffusers ``DDPMScheduler`` whose ``set_timesteps(S)`` visits ``trailing_timesteps(T, S)``.

    With S == T this is the plain ancestral sampler (T-1, ..., 0); with S < T diffusers steps between the visited
    timesteps with the exact posterior q(x_{t'} | x_t, x_0), looking the previous timestep up in ``timesteps``.
    Custom ``timesteps=`` lists are passed on to diffusers unchanged.
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        if timesteps is not None or num_inference_steps is None:
            super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
            return
        self.custom_timesteps = False
        self._exact_trailing(num_inference_steps, device)


def make_scheduler(
    sampler: str,
    T: int = PAPER_T,
    schedule: str = "linear",
    prediction_type: str = "epsilon",
    *,
    variance_type: str = "fixed_small",
    clip_sample: bool = True,
    beta_start: float = PAPER_BETA_START,
    beta_end: float = PAPER_BETA_END,
    spacing: str = "trailing",
) -> DDPMScheduler | DDIMScheduler:
    """A diffusers scheduler for the reverse process with the paper's schedule (linear betas 1e-4 .. 0.02, T=1000).

    Configuration (all visible in ``scheduler.config``):

    * ``clip_sample=True, clip_sample_range=1.0``: the x_0 estimate is clipped to [-1, 1], the range of
      ``indices_to_unit`` (as in DDPM and Phil Wang's implementation).
    * ``timestep_spacing="trailing"`` with exact integer steps (``TrailingDDIMScheduler`` /
      ``TrailingDDPMScheduler``): ``set_timesteps(S)`` visits ``trailing_timesteps(T, S)``, so the first step is
      always t = T-1 (the pure-noise end; diffusers' default "leading" would start DDIM at T - T/S).
    * DDIM: ``set_alpha_to_one=True``: the last step (prev timestep < 0) returns the clipped x_0 estimate, like the
      final DDPM step and Phil Wang's ``ddim_sample``. ``step(..., eta=0.0)`` is deterministic DDIM;
      pass ``use_clipped_model_output=True`` to re-derive eps from the clipped x_0 as Phil Wang does.
    * DDPM: ``variance_type="fixed_small"`` (posterior variance beta~_t, as in Phil Wang's code) by default;
      ``"fixed_large"`` is the paper's Eq. 3 variance beta_t. Ho et al. report similar results for both.
    * ``prediction_type``: ``"epsilon"`` (Eq. 4 models), ``"sample"`` (x_0 models, e.g. the categorical z~_0 of
      Eq. 25 fed to ``step``), or ``"v_prediction"``.

    Per-image seeds: ``step(..., generator=[g_0, ..., g_{B-1}])`` with one ``torch.Generator`` per image is
    supported by diffusers 0.42 (``diffusers.utils.torch_utils.randn_tensor`` draws image b's noise, shape
    (1, ...), from ``g_b``), so image b's noise does not depend on the batch it is in. Verified by
    ``tests/diffusion/test_schedule.py``. (A list of length 1 is treated like a single generator: same result.)

    Args:
        sampler: ``"ddpm"`` or ``"ddim"``.
        T: number of training timesteps.
        schedule: ``"linear"`` or ``"cosine"`` (see ``make_betas``).
        prediction_type: what the model's output is, see above.
        variance_type: DDPM only (ignored for DDIM).
        clip_sample: clip the x_0 estimate to [-1, 1].
        beta_start, beta_end: linear schedule ends.
        spacing: DDIM only: ``"trailing"`` (above) or ``"quadratic"`` (:class:`QuadraticDDIMScheduler`, steps
            dense at small t, ending at t = 0).

    Returns:
        a ``TrailingDDPMScheduler`` (a ``DDPMScheduler``) or ``TrailingDDIMScheduler`` (a ``DDIMScheduler``); call
        ``set_timesteps(S)`` before stepping.

    Raises:
        ValueError: unknown sampler, schedule or prediction type.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"make_scheduler: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"make_scheduler: unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
        )
    common = dict(
        num_train_timesteps=T,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=_DIFFUSERS_BETA_SCHEDULE[schedule],
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )
    if spacing not in SPACINGS:
        raise ValueError(f"make_scheduler: unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if sampler == "ddpm":
        if spacing != "trailing":
            raise ValueError("make_scheduler: the ddpm sampler visits every timestep; spacing applies to ddim only")
        return TrailingDDPMScheduler(variance_type=variance_type, **common)
    if sampler == "ddim":
        cls = TrailingDDIMScheduler if spacing == "trailing" else QuadraticDDIMScheduler
        return cls(set_alpha_to_one=True, **common)
    raise ValueError(f"make_scheduler: unknown sampler {sampler!r}; expected one of {SAMPLERS}")


# ----------------------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------------------
def timestep_quartile(t: torch.Tensor, T: int) -> torch.Tensor:
    """Quartile of each timestep, for per-quartile loss logging: floor(4 t / T) in {0, 1, 2, 3}.

    Quartile 0 is the least noisy quarter t in [0, T/4), quartile 3 the noisiest.

    Args:
        t: LongTensor (B,) with values in [0, T-1].
        T: number of timesteps.

    Returns:
        LongTensor (B,) on ``t``'s device.

    Raises:
        ValueError: a timestep outside [0, T-1].
    """
    t = torch.as_tensor(t).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"timestep_quartile: timesteps must lie in [0, {T - 1}], got [{int(t.min())}, {int(t.max())}]")
    return torch.div(4 * t, T, rounding_mode="floor")


def self_condition_input(x_t: torch.Tensor, x0_prev: torch.Tensor | None) -> torch.Tensor:
    """Model input with self-conditioning (Chen et al. 2022, "Analog Bits", §4.2.1 of the paper).

    The denoiser sees its previous estimate of x_0 concatenated to x_t along channels; ``None`` (first sampling
    step, or the half of training batches without self-conditioning) means zeros. The estimate should be detached
    by the caller during training.

    Args:
        x_t: (B, C, h, w) noisy sample.
        x0_prev: (B, C, h, w) previous x_0 estimate, or None.

    Returns:
        (B, 2C, h, w): ``torch.cat([x_t, x0_prev], dim=1)``.

    Raises:
        ValueError: shapes differ.
    """
    if x0_prev is None:
        x0_prev = torch.zeros_like(x_t)
    elif x0_prev.shape != x_t.shape:
        raise ValueError(f"self_condition_input: x0_prev shape {tuple(x0_prev.shape)} != x_t shape {tuple(x_t.shape)}")
    return torch.cat([x_t, x0_prev.to(x_t.dtype)], dim=1)  # (B, 2C, h, w)
