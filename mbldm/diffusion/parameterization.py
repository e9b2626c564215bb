"""What the U-Net's output means: the parameterisation shared by training (losses) and sampling.

* **continuous** (§4.2.2): the output is the noise eps (``prediction="epsilon"``, the paper's Eq. 4), z_0 directly
  (``"x0"``) or v = sqrt(abar) eps - sqrt(1 - abar) z_0 (``"v"``, Salimans & Ho 2022). With
  ``precondition="edm"`` and ``"x0"`` the output is EDM's F and z_0 = c_skip z~_t + c_out F
  (:mod:`mbldm.diffusion.preconditioning`).
* **categorical** (§3.2.2): the output is a distribution over each codebook, either free logits (``head="logits"``,
  c*K channels, the paper's head; :class:`mbldm.diffusion.categorical.CategoricalLogits`) or a discretised
  logistic mixture over the ordered indices (``head="logistic"``, c*3L channels;
  :class:`mbldm.diffusion.logistic.LogisticMixture`). With ``precondition="edm"`` the logistic means are
  c_skip z~_t + c_out F_mu and the log-scales log c_out + F_s, so at small t the head starts from the observed
  z_t and only learns the correction at the scale of the noise; for the logits head, the exact Gaussian
  log-likelihood of z_t given index k, -(z~_t - u_k)^2 / (2 sigma_t^2), is added to the logits (Bayes' rule: the
  network then only has to supply the prior from the context).

Everything here is pure: tensors in, tensors out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mbldm.diffusion import schedule
from mbldm.diffusion.categorical import CategoricalLogits, logits_from_model_output
from mbldm.diffusion.logistic import LogisticMixture, per_channel_sizes, split_output
from mbldm.diffusion.preconditioning import DEFAULT_SIGMA_DATA, edm_coefficients

__all__ = ["PREDICTIONS", "HEADS", "PRECONDITIONS", "Parameterization"]

PREDICTIONS = ("epsilon", "x0", "v")
HEADS = ("logits", "logistic")
PRECONDITIONS = ("none", "edm")


@dataclass(frozen=True)
class Parameterization:
    """The meaning of the denoiser output (the run's ``variant``, ``prediction``, ``head``, ``mixtures``,
    ``precondition`` and ``sigma_data`` settings) for latents with c channels of codebook sizes ``sizes``.

    Raises (at construction):
        ValueError: an unknown value, or ``precondition="edm"`` with a continuous epsilon / v prediction.
    """

    variant: str
    sizes: tuple[int, ...]
    prediction: str = "epsilon"
    head: str = "logits"
    mixtures: int = 10
    precondition: str = "none"
    sigma_data: float = DEFAULT_SIGMA_DATA

    def __post_init__(self) -> None:
        checks = [
            (self.variant in ("continuous", "categorical"), f"variant must be continuous or categorical, got "
                                                            f"{self.variant!r}"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}"),
            (self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}"),
            (self.precondition in PRECONDITIONS,
             f"precondition must be one of {PRECONDITIONS}, got {self.precondition!r}"),
            (isinstance(self.mixtures, int) and self.mixtures >= 1, f"mixtures must be >= 1, got {self.mixtures}"),
            (self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}"),
            (not (self.variant == "continuous" and self.precondition == "edm" and self.prediction != "x0"),
             "precondition 'edm' of the continuous variant needs prediction 'x0' (EDM's F gives z_0)"),
            (len(self.sizes) >= 1 and min(self.sizes) >= 2, f"codebook sizes must be >= 2, got {self.sizes}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def c(self) -> int:
        return len(self.sizes)

    @property
    def K(self) -> int:
        """The largest codebook size (the logits head's K axis)."""
        return max(self.sizes)

    @property
    def categorical(self) -> bool:
        return self.variant == "categorical"

    def out_channels(self) -> int:
        """U-Net output channels: c (continuous), c*K (logits head) or c*3L (logistic head)."""
        if not self.categorical:
            return self.c
        return self.c * self.K if self.head == "logits" else self.c * 3 * self.mixtures

    # ------------------------------------------------------------------------------------------ continuous
    def x0(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """Continuous z_0 estimate (B, c, h, w) in unit space (not clamped) from the output (B, c, h, w)."""
        if self.prediction == "epsilon":
            return schedule.x0_from_eps(z_t, t, out, alphas_cumprod)
        if self.prediction == "v":
            abar = alphas_cumprod.to(out.device, torch.float64)[t].reshape(-1, 1, 1, 1)
            return (abar.sqrt() * z_t - (1 - abar).sqrt() * out).to(out.dtype)
        if self.precondition == "edm":
            return edm_coefficients(alphas_cumprod, t, out, self.sigma_data).denoise(z_t, out)
        return out

    def regression_target(self, z0: torch.Tensor, noise: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                          alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """What the continuous output regresses onto: eps, z_0, v, or EDM's F* = (z_0 - c_skip z~_t) / c_out."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v":
            abar = alphas_cumprod.to(z0.device, torch.float64)[t].reshape(-1, 1, 1, 1)
            return (abar.sqrt() * noise - (1 - abar).sqrt() * z0).to(z0.dtype)
        if self.precondition == "edm":
            return edm_coefficients(alphas_cumprod, t, z0, self.sigma_data).target(z_t, z0)
        return z0

    # ------------------------------------------------------------------------------------------ categorical
    def distribution(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> LogisticMixture | CategoricalLogits:
        """The categorical distribution over each codebook at every position, from the output."""
        if self.head == "logistic":
            logit_pi, mu, log_s = split_output(out.float(), self.c, self.mixtures)
            if self.precondition == "edm":
                coef = edm_coefficients(alphas_cumprod, t, z_t.float(), self.sigma_data)
                scaled = (coef.inv_sqrt_abar * z_t.float()).unsqueeze(2)  # (B, c, 1, h, w)
                mu = coef.c_skip.unsqueeze(2) * scaled + coef.c_out.unsqueeze(2) * mu
                log_s = torch.log(coef.c_out).unsqueeze(2) + log_s
            sizes = per_channel_sizes(self.sizes, self.c, out.device)
            return LogisticMixture(logit_pi, mu, log_s.clamp(min=-9.0), sizes)
        logits = logits_from_model_output(out.float(), self.c, self.K)  # (B, c, K, h, w)
        if self.precondition == "edm":
            logits = logits + self._likelihood(z_t.float(), t, alphas_cumprod)
        return CategoricalLogits(logits, self.sizes)

    def _likelihood(self, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """log N(z~_t; u_k, sigma_t^2) up to a constant, (B, c, K, h, w): the evidence of z_t for index k."""
        coef = edm_coefficients(alphas_cumprod, t, z_t, self.sigma_data)
        k = torch.arange(self.K, device=z_t.device, dtype=torch.float32)
        sizes = torch.as_tensor(self.sizes, device=z_t.device, dtype=torch.float32)
        u = (2.0 * k.view(1, -1) / (sizes.view(-1, 1) - 1.0) - 1.0).view(1, self.c, self.K, 1, 1)
        scaled = (coef.inv_sqrt_abar * z_t).unsqueeze(2)  # (B, c, 1, h, w)
        return -((scaled - u) ** 2) / (2.0 * coef.sigma.unsqueeze(2) ** 2)

    # ------------------------------------------------------------------------------------------ both
    def estimate(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The deterministic z_0 estimate in [-1, 1], (B, c, h, w): continuous x0 clamped, categorical mean
        (self-conditioning input, trajectory frames, the ``mean`` sampling estimate)."""
        if self.categorical:
            return self.distribution(out, z_t, t, alphas_cumprod).mean_unit()
        return self.x0(out, z_t, t, alphas_cumprod).clamp(-1.0, 1.0)


def parameterization_of(config: dict, sizes: Sequence[int]) -> Parameterization:
    """The Parameterization of a resolved run config (``RUN/config.json`` dict or ``TrainConfig.to_dict()``);
    fields missing from runs written before these settings existed take the paper's values (epsilon, logits,
    no preconditioning)."""
    return Parameterization(variant=config["variant"], sizes=tuple(int(k) for k in sizes),
                            prediction=config.get("prediction", "epsilon"), head=config.get("head", "logits"),
                            mixtures=int(config.get("mixtures", 10)),
                            precondition=config.get("precondition", "none"),
                            sigma_data=float(config.get("sigma_data", DEFAULT_SIGMA_DATA)))
