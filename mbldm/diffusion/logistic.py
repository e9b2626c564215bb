"""Discretised logistic mixture over an ordered codebook: a categorical head that uses the codeword order.

The categorical reverse process (§3.2.2) predicts, at every latent position and channel j, a distribution over the
K_j codeword indices. The paper's head outputs K_j free logits per channel (c*K output channels, 1,536 for
OPQ-32-8-8). Because the §3.2.1 ordering makes index i and i+1 similar codewords, the distribution can instead be
a *discretised logistic mixture* over the ordered indices (PixelCNN++, Salimans et al. 2017, Eq. 2; D3PM, Austin
et al. 2021, App. A): L components with weights pi_l, means mu_l and scales s_l in the unit space of
``schedule.indices_to_unit`` (index k of a K-entry codebook sits at u_k = 2k / (K - 1) - 1, bins 2 / (K - 1)
wide), and

    P(k) = sum_l pi_l [sigma((u_k + 1/(K-1) - mu_l) / s_l) - sigma((u_k - 1/(K-1) - mu_l) / s_l)],

with the first and last bins extended to -inf and +inf so that the K probabilities sum to one. The head needs
3L numbers per channel instead of K (30 instead of 256 for L = 10), and the training loss (the negative
log-likelihood of the true index) only evaluates the K-sized sum at that index, so no (B, c, K, h, w) tensor is
ever made in training or sampling.

Layout: the U-Net's output (B, c * 3L, h, w) is viewed as (B, c, 3L, h, w): channels [0, L) are the mixture
logits, [L, 2L) the means mu, [2L, 3L) the log-scales log s, for latent channel j = channel // (3L).
All functions here are pure (tensors in, tensors out).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mbldm.diffusion.schedule import unit_to_indices

__all__ = ["MIN_LOG_SCALE", "LogisticMixture", "split_output", "per_channel_sizes"]

#: Log-scales are clamped from below (s >= e^-9 ~ 1.2e-4 unit, 1/60 of an index step at K = 256), as in PixelCNN++.
MIN_LOG_SCALE = -9.0
# Where a bin's probability is below this, its log is taken from the density at the bin centre (PixelCNN++).
_TINY_BIN = 1e-5

Generators = torch.Generator | Sequence[torch.Generator] | None


def per_channel_sizes(sizes: int | Sequence[int], c: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Codebook sizes as a float tensor (1, c, 1, 1, 1) that broadcasts against (B, c, L, h, w).

    Raises:
        ValueError: a list whose length is not c, or a size < 2.
    """
    k = torch.as_tensor([sizes] * c if isinstance(sizes, int) else list(sizes), dtype=torch.float32, device=device)
    if k.numel() != c or bool((k < 2).any()):
        raise ValueError(f"need {c} codebook sizes >= 2, got {k.long().tolist()}")
    return k.view(1, c, 1, 1, 1)


def split_output(out: torch.Tensor, c: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View the U-Net output (B, c*3L, h, w) as (mixture logits, means, log-scales), each (B, c, L, h, w).

    Raises:
        ValueError: ``out`` is not (B, c*3L, h, w).
    """
    if out.ndim != 4 or out.shape[1] != 3 * L * c:
        raise ValueError(f"a logistic-mixture head with c={c}, L={L} outputs (B, {3 * L * c}, h, w), got "
                         f"{tuple(out.shape)}")
    b, _, h, w = out.shape
    o = out.reshape(b, c, 3 * L, h, w)
    return o[:, :, :L], o[:, :, L:2 * L], o[:, :, 2 * L:]


def _logistic_uniform(shape: tuple[int, ...], generator: Generators, device) -> torch.Tensor:
    """U ~ Uniform(0, 1) of ``shape`` (B, ...); with a list of B generators row b comes from generator[b] only."""
    if generator is None:
        return torch.rand(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images; need one per image")
    return torch.cat([torch.rand((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generator])


@dataclass
class LogisticMixture:
    """A discretised logistic mixture per latent position and channel (see the module docstring).

    Attributes:
        logit_pi: (B, c, L, h, w) unnormalised mixture log-weights.
        mu: (B, c, L, h, w) component means in unit space (nominally [-1, 1]).
        log_s: (B, c, L, h, w) component log-scales in unit space, clamped to >= ``MIN_LOG_SCALE``.
        sizes: (1, c, 1, 1, 1) float codebook sizes K_j (``per_channel_sizes``).
    """

    logit_pi: torch.Tensor
    mu: torch.Tensor
    log_s: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def from_output(cls, out: torch.Tensor, c: int, L: int, sizes: int | Sequence[int]) -> LogisticMixture:
        """The mixture of a raw U-Net output (B, c*3L, h, w) (no preconditioning; see ``Denoiser``)."""
        logit_pi, mu, log_s = split_output(out, c, L)
        return cls(logit_pi, mu, log_s.clamp(min=MIN_LOG_SCALE), per_channel_sizes(sizes, c, out.device))

    @property
    def num_components(self) -> int:
        return self.mu.shape[2]

    def _log_bin(self, k: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """log P_l(k) of each component for float indices ``k`` broadcast against ``mu`` (PixelCNN++'s stable
        form: log-sigmoids at the end bins, log-density x bin width where a bin's probability underflows)."""
        half = 1.0 / (sizes - 1.0)  # half the distance between neighbouring indices in unit space
        u = k * (2.0 * half) - 1.0  # unit value of the index
        inv_s = torch.exp(-log_s)
        plus = inv_s * (u + half - mu)
        minus = inv_s * (u - half - mu)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the first bin's probability
        log_sf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the last bin's probability
        bin_p = torch.sigmoid(plus) - torch.sigmoid(minus)
        centre = inv_s * (u - mu)
        log_density = centre - log_s - 2.0 * F.softplus(centre) + torch.log(2.0 * half)
        inner = torch.where(bin_p > _TINY_BIN, torch.log(bin_p.clamp(min=1e-12)), log_density)
        return torch.where(k <= 0, log_cdf_plus, torch.where(k >= sizes - 1, log_sf_minus, inner))

    def log_prob(self, z0: torch.Tensor) -> torch.Tensor:
        """log P(z0) of integer indices z0 (B, c, h, w) in [0, K_j - 1] -> (B, c, h, w) float32 (nats)."""
        k = z0.to(torch.float32).unsqueeze(2)  # (B, c, 1, h, w)
        log_p = self._log_bin(k, self.mu, self.log_s, self.sizes)  # (B, c, L, h, w)
        return torch.logsumexp(log_p + torch.log_softmax(self.logit_pi, dim=2), dim=2)

    def logits(self, K_max: int) -> torch.Tensor:
        """log P(k) for every index k < K_max: (B, c, K_max, h, w) float32; indices k >= K_j get -1e4.

        This makes the (B, c, L, K, h, w) intermediate that the head otherwise avoids, one channel at a time: it is
        for the paper's Eq. 24 terms (``--eq24-weight``), the soft decode of a final sample and tests.
        """
        if self.mu.shape[1] > 1:  # one latent channel at a time bounds the L*K-sized intermediate's memory
            parts = [LogisticMixture(self.logit_pi[:, j:j + 1], self.mu[:, j:j + 1], self.log_s[:, j:j + 1],
                                     self.sizes[:, j:j + 1]).logits(K_max) for j in range(self.mu.shape[1])]
            return torch.cat(parts, dim=1)
        k = torch.arange(K_max, device=self.mu.device, dtype=torch.float32).view(1, 1, 1, K_max, 1, 1)
        sizes = self.sizes.unsqueeze(3)  # (1, c, 1, 1, 1, 1)
        log_p = self._log_bin(k, self.mu.unsqueeze(3), self.log_s.unsqueeze(3), sizes)  # (B, c, L, K, h, w)
        lp = torch.logsumexp(log_p + torch.log_softmax(self.logit_pi, dim=2).unsqueeze(3), dim=2)  # (B, c, K, h, w)
        return torch.where(k.squeeze(2) < sizes.squeeze(2), lp, torch.full_like(lp, -1e4))

    def mean_unit(self) -> torch.Tensor:
        """E[u(z0)] ~ sum_l pi_l clamp(mu_l, -1, 1): (B, c, h, w) in [-1, 1] (the discretisation and the
        clamping of the tails to the end bins are ignored; exact when the scales are small against the bins)."""
        weights = torch.softmax(self.logit_pi, dim=2)
        return (weights * self.mu.clamp(-1.0, 1.0)).sum(dim=2).clamp(-1.0, 1.0)

    def sample(self, gamma: float, generator: Generators = None) -> torch.Tensor:
        """Indices (B, c, h, w) long: a component l ~ softmax(logit_pi / gamma), then x = mu_l + gamma s_l
        Logistic(0, 1), rounded to the nearest index of the channel's codebook.

        gamma = 1 is an exact draw from the mixture. gamma = 0 gives the mode of the most probable component
        (round(mu_l*), l* = argmax pi). Other gammas temper the mixture weights exactly as Eq. 25 tempers logits
        and scale the logistic noise by gamma: an approximation of softmax(log P / gamma) that needs no K-sized
        tensor (exact for the component choice; the tempered logistic p^(1/gamma) is close to, not exactly, a
        logistic of scale gamma s). With a list of B generators image b draws only from generator[b].

        Raises:
            ValueError: gamma < 0 or a generator list of the wrong length.
        """
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if gamma == 0:
            choice = self.logit_pi.argmax(dim=2, keepdim=True)  # (B, c, 1, h, w)
            x = self.mu.gather(2, choice).squeeze(2)
        else:
            B = self.mu.shape[0]
            u = _logistic_uniform((B, *self.logit_pi.shape[1:]), generator, self.mu.device)
            gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
            choice = (self.logit_pi / gamma + gumbel).argmax(dim=2, keepdim=True)  # (B, c, 1, h, w)
            v = _logistic_uniform((B, *choice.shape[1:]), generator, self.mu.device).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(v) - torch.log1p(-v)  # Logistic(0, 1)
            x = (self.mu.gather(2, choice) + gamma * torch.exp(self.log_s.gather(2, choice)) * noise).squeeze(2)
        return unit_to_indices(x.clamp(-1.0, 1.0), self.sizes.view(-1))
