"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Table 1 and Eq. 7) written for the variance-preserving forward process of DDPM (the paper's Eq. 2-4).

With z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, the rescaled state z~_t = z_t / sqrt(abar_t) = z_0 + sigma_t eps
has noise level sigma_t = sqrt((1 - abar_t) / abar_t). EDM writes the denoiser as

    D(z_t) = c_skip(sigma) z~_t + c_out(sigma) F(z_t),   c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
                                                          c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),

so that the network output F has unit variance at every noise level and the effective training target
F* = (z_0 - c_skip z~_t) / c_out is unit-variance too (loss weight lambda(sigma) c_out^2 = 1). The network
input stays z_t (already unit-variance under the VP process, EDM's c_in role). At small sigma, c_skip -> 1 and
c_out -> sigma: the estimate is the input plus a correction *scaled to the noise*, so a network of modest precision
can still place z_0 within a fraction of an index step, which a plain x_0 (or mean) output cannot at the end of
sampling (an index step is 2 / (K - 1) = 0.0078 of the unit range for K = 256).

Pure functions; every coefficient is computed in float64 from ``alphas_cumprod`` and cast to the dtype of the
tensor it multiplies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_SIGMA_DATA", "EDMCoefficients", "edm_coefficients"]

#: Standard deviation of OPQ-32-8-8 index latents of 128x128 faces in unit space (0.48-0.51 for the Y
#: sub-quantizers, 0.36-0.37 for Cb/Cr; 0.54 overall); EDM's image value is 0.5.
DEFAULT_SIGMA_DATA = 0.5


@dataclass
class EDMCoefficients:
    """Per-image coefficients, each shaped (B, 1, ..., 1) to broadcast against (B, c, h, w).

    Attributes:
        inv_sqrt_abar: 1 / sqrt(abar_t), so that z~_t = inv_sqrt_abar * z_t.
        sigma: sqrt((1 - abar_t) / abar_t), the noise level of z~_t.
        c_skip: sigma_data^2 / (sigma^2 + sigma_data^2).
        c_out: sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
    """

    inv_sqrt_abar: torch.Tensor
    sigma: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    def denoise(self, z_t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """D = c_skip z~_t + c_out F (the z_0 estimate), same shape as ``z_t``."""
        return self.c_skip * (self.inv_sqrt_abar * z_t) + self.c_out * F

    def target(self, z_t: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """F* = (z_0 - c_skip z~_t) / c_out, the unit-variance regression target of F."""
        return (z0 - self.c_skip * (self.inv_sqrt_abar * z_t)) / self.c_out


def edm_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor,
                     sigma_data: float = DEFAULT_SIGMA_DATA) -> EDMCoefficients:
    """The EDM coefficients of timesteps ``t`` for tensors shaped like ``like`` (B, ...).

    Args:
        alphas_cumprod: (T,) abar_t, float64 preferred (exact SNR near t = 0).
        t: LongTensor (B,) timesteps in [0, T) or an int (same t for the whole batch).
        like: tensor whose batch size, rank, device and dtype the coefficients take.
        sigma_data: standard deviation of the clean latents in unit space (> 0).

    Returns:
        EDMCoefficients with fields shaped (B, 1, ..., 1) (or (1, 1, ..., 1) for an int t).

    Raises:
        ValueError: sigma_data <= 0.
    """
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    abar = alphas_cumprod.to(device=like.device, dtype=torch.float64)[torch.as_tensor(t, device=like.device)]
    abar = abar.reshape(-1, *([1] * (like.ndim - 1)))
    sigma = torch.sqrt((1.0 - abar) / abar)
    sd2 = float(sigma_data) ** 2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * float(sigma_data) / torch.sqrt(sigma**2 + sd2)
    cast = dict(dtype=like.dtype)
    return EDMCoefficients(torch.rsqrt(abar).to(**cast), sigma.to(**cast), c_skip.to(**cast), c_out.to(**cast))
