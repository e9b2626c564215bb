"""Training losses of both variants as pure functions (no I/O, no model calls).

* Continuous variant (§4.2.2): the epsilon objective of Eq. 4 on z_t = q_sample(x0, t, eps) in index space
  mapped to [-1, 1], weighted per image by min-SNR-gamma (Hang et al. 2023, ref. [35]).
* Categorical variant (§3.2.2, §4.2.3): Eq. 24, an image-space term ||x0 - x0_hat||^2 on the differentiable
  decode (Eq. 21) of Gumbel-softmax weights (Eq. 20), plus a latent term ||eps - eps_z||^2 with
  eps_z = (a_t z_t - z0_hat) / b_t and z0_hat the expected index (in [-1, 1]) under the same weights.

Reduction: squared errors are averaged over all non-batch elements (as ``F.mse_loss``), giving one value per
image; the min-SNR weight multiplies each image's value; ``LossOutput.loss`` is the batch mean.

Min-SNR weighting for the categorical variant (our choice, documented): with SNR_t = abar_t / (1 - abar_t),
the epsilon-type weight min(SNR_t, gamma) / SNR_t goes on the eps term and the x0-type weight
min(SNR_t, gamma) on the image term. Since eps - eps_z = sqrt(SNR_t) (z0_hat - z0) (substitute
z_t = sqrt(abar) z0 + sqrt(1 - abar) eps into eps_z), the weighted eps term equals
min(SNR_t, gamma) ||z0 - z0_hat||^2: both terms are then x0 errors with the same min-SNR-gamma weight, one in
image space and one in index space, which is exactly min-SNR-gamma applied to an x0 objective.

Image target of the categorical loss: the latent store keeps only the indices z, so the target x0 is the codec
decode D(z) (``codec.decode_torch``), the best any prediction over the codebooks can reproduce; both images are
scaled from [0, 255] to [-1, 1] (x / 127.5 - 1) before the squared error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Callable

import torch

from mbldm.diffusion import categorical, schedule

__all__ = ["LossOutput", "per_sample_mse", "loss_weights", "continuous_loss", "categorical_loss", "image_to_unit",
           "SOFT_SAMPLES", "soft_weights", "nll_loss", "categorical_objective"]


@dataclass
class LossOutput:
    """Result of a loss function.

    Attributes:
        per_sample: (B,) float32, the weighted loss of each image (what is averaged into ``loss``).
        parts: named weighted terms, each (B,), summing to ``per_sample`` (categorical: "img", "eps").
        z0_hat: categorical only: (B, c, h, w) expected index in [-1, 1] under the Gumbel-softmax weights
            (still attached to the graph; detach before reusing it, e.g. for self-conditioning).
    """

    per_sample: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    z0_hat: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        """Scalar batch mean of ``per_sample`` (the quantity to minimise)."""
        return self.per_sample.mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch item: (B, ...) x (B, ...) -> (B,) float32, averaged over non-batch dims."""
    if a.shape != b.shape:
        raise ValueError(f"per_sample_mse: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None, objective: str) -> torch.Tensor:
    """Min-SNR-gamma weight per image, (B,) float32; all ones when ``gamma`` is None (no weighting).

    ``objective`` "epsilon": min(SNR_t, gamma) / SNR_t; "x0": min(SNR_t, gamma) (ref. [35],
    ``schedule.min_snr_weight``).
    """
    if gamma is None:
        return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
    w = schedule.min_snr_weight(alphas_cumprod, t, gamma=gamma, objective=objective)
    return torch.as_tensor(w, device=t.device).float().reshape(t.shape[0])


def continuous_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr_gamma: float | None = 5.0,
    objective: str = "epsilon",
) -> LossOutput:
    """Regression loss of the continuous variant: w_t * mean ||target - pred||^2 per image.

    ``objective`` "epsilon" is the paper's Eq. 4 (pred = eps_theta(z_t, t), target = eps) with the min-SNR weight
    min(SNR_t, gamma) / SNR_t; "x0" and "v" take min-SNR's weights for those targets (min(SNR, gamma) and
    min(SNR, gamma) / (SNR + 1), Hang et al. 2023, Eq. 9-11); "edm" is EDM's F-target
    (:mod:`mbldm.diffusion.preconditioning`), whose effective weight lambda(sigma) c_out^2 is 1 at every t, so
    no min-SNR weight is applied.

    Args:
        pred: (B, c, h, w) float, the model output.
        target: (B, c, h, w) float, what it regresses onto (``Parameterization.regression_target``).
        t: (B,) long timesteps in [0, T).
        alphas_cumprod: (T,) cumulative products of (1 - beta).
        min_snr_gamma: gamma of the min-SNR weight; None disables weighting.
        objective: "epsilon", "x0", "v" or "edm".
    Returns:
        LossOutput with ``per_sample`` (B,) and ``parts == {}``.
    Raises:
        ValueError: shapes of ``pred`` and ``target`` differ, or an unknown objective.
    """
    if objective not in ("epsilon", "x0", "v", "edm"):
        raise ValueError(f"continuous_loss: unknown objective {objective!r}")
    gamma = None if objective == "edm" else min_snr_gamma
    w = loss_weights(alphas_cumprod, t, gamma, "epsilon" if objective == "edm" else objective)  # (B,)
    return LossOutput(per_sample=w * per_sample_mse(pred, target))


def image_to_unit(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] -> [-1, 1]: x / 127.5 - 1 (any shape, float)."""
    return x / 127.5 - 1.0


def categorical_loss(
    logits: torch.Tensor,
    x0_image: torch.Tensor,
    z_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    decode_soft: Callable[[torch.Tensor], torch.Tensor],
    *,
    tau: float = 1.0,
    min_snr_gamma: float | None = 5.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    soft_sample: str = "gumbel",
    sizes: Sequence[int] | None = None,
) -> LossOutput:
    """Eq. 24: w_x0 ||x0 - x0_hat||^2 + w_eps ||eps - eps_z||^2 per image (see the module docstring).

    Memory: one (B, c, K, h, w) tensor of Gumbel-softmax weights is created (Eq. 20) and shared by the soft
    decode (Eq. 21) and the expectation; no other copy of the logits' size is made here.

    Args:
        logits: (B, c, K, h, w) float, the model's logits (``logits_from_model_output``).
        x0_image: (B, 3, H, W) float in [0, 255], the target image D(z0) (``codec.decode_torch``).
        z_t: (B, c, h, w) float, the noisy latent in [-1, 1]-index units fed to the model.
        noise: (B, c, h, w) float, the epsilon used to build z_t.
        t: (B,) long timesteps.
        alphas_cumprod: (T,) cumulative products of (1 - beta).
        decode_soft: weights (B, c, K, h, w) -> RGB (B, 3, H, W) in [0, 255] (``codec.decode_soft``, Eq. 21).
        tau: Gumbel-softmax temperature (Eq. 20), > 0.
        min_snr_gamma: gamma of the min-SNR weights; None disables weighting.
        generator: the Gumbel noise's generator(s) (``categorical.gumbel_softmax``): None, one generator or a
            list of B per-image generators, on the logits' device.
        soft_sample: how the weights fed to the decode are made from the logits: "gumbel" (Eq. 20, the paper),
            "straight-through" (the one-hot of the Gumbel-max sample forward, Eq. 20's gradient backward; Jang et
            al. 2017 §2.2) or "softmax" (softmax(logits / tau), no noise).
        sizes: (c,) codebook sizes K_j for the expected index (None: every channel has K).
    Returns:
        LossOutput with ``parts = {"img": (B,), "eps": (B,)}`` (weighted) and ``z0_hat`` (B, c, h, w).
    Raises:
        ValueError: inconsistent shapes.
    """
    if logits.ndim != 5:
        raise ValueError(f"categorical_loss: logits must be (B, c, K, h, w), got {tuple(logits.shape)}")
    B, c, K, h, w = logits.shape
    if z_t.shape != (B, c, h, w) or noise.shape != (B, c, h, w):
        raise ValueError(f"categorical_loss: z_t {tuple(z_t.shape)} and noise {tuple(noise.shape)} must be "
                         f"{(B, c, h, w)}")
    weights = soft_weights(logits.float(), soft_sample, tau, generator)  # (B, c, K, h, w), Eq. 20
    x0_hat = image_to_unit(decode_soft(weights))  # (B, 3, H, W) in [-1, 1], Eq. 21
    z0_hat = categorical.expected_unit(weights, sizes)  # (B, c, h, w) in [-1, 1]
    eps_hat = categorical.eps_z(z_t.float(), t, z0_hat, alphas_cumprod)  # (B, c, h, w), Eq. 24
    img = loss_weights(alphas_cumprod, t, min_snr_gamma, "x0") * per_sample_mse(x0_hat, image_to_unit(x0_image))
    eps = loss_weights(alphas_cumprod, t, min_snr_gamma, "epsilon") * per_sample_mse(eps_hat, noise)
    return LossOutput(per_sample=img + eps, parts={"img": img, "eps": eps}, z0_hat=z0_hat)


SOFT_SAMPLES = ("gumbel", "straight-through", "softmax")


def soft_weights(logits: torch.Tensor, soft_sample: str, tau: float,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Differentiable weights (B, c, K, h, w) over each codebook from logits, for the decode of Eq. 21.

    "gumbel": softmax((logits + G) / tau) (Eq. 20); "straight-through": its hard one-hot forward with the soft
    gradient; "softmax": softmax(logits / tau) without noise.

    Raises:
        ValueError: an unknown ``soft_sample`` or tau <= 0.
    """
    if soft_sample == "gumbel":
        return categorical.gumbel_softmax(logits, tau, generator=generator)
    if soft_sample == "straight-through":
        return categorical.gumbel_softmax(logits, tau, generator=generator, hard=True)
    if soft_sample == "softmax":
        if not tau > 0:
            raise ValueError(f"soft_weights: tau must be > 0, got {tau}")
        return torch.softmax(logits / tau, dim=2)
    raise ValueError(f"soft_sample must be one of {SOFT_SAMPLES}, got {soft_sample!r}")


def nll_loss(log_prob: torch.Tensor) -> LossOutput:
    """Negative log-likelihood of the true indices: -mean log P(z0) per image, in nats per index.

    The auxiliary cross-entropy of D3PM's hybrid loss (Austin et al. 2021, Eq. 5) and VQ-Diffusion (Gu et al. 2022,
    Eq. 8): it asks the categorical head for the exact index, which Eq. 24 alone barely does (an optimised free
    logit tensor reaches 3.5 % argmax accuracy under Eq. 24, 100 % under this term). Unweighted over t.

    Args:
        log_prob: (B, c, h, w) float, log P(z0) of the head at the true indices (``.log_prob(z0)`` of
            ``CategoricalLogits`` or ``LogisticMixture``).
    Returns:
        LossOutput with ``per_sample`` (B,) and ``parts = {"nll": (B,)}``.
    """
    nll = -log_prob.float().flatten(1).mean(dim=1)  # (B,)
    return LossOutput(per_sample=nll, parts={"nll": nll})


def categorical_objective(
    dist,
    z0: torch.Tensor,
    x0_image: torch.Tensor | None,
    z_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    decode_soft: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    nll_weight: float = 1.0,
    eq24_weight: float = 0.0,
    tau: float = 1.0,
    min_snr_gamma: float | None = None,
    soft_sample: str = "gumbel",
    sizes: Sequence[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> LossOutput:
    """The categorical variant's loss: ``nll_weight`` * NLL of the true index + ``eq24_weight`` * Eq. 24.

    ``eq24_weight = 1, nll_weight = 0`` is the paper's objective (its min-SNR weighting per term with
    ``min_snr_gamma``; None is the unweighted Eq. 24 as printed); ``nll_weight > 0`` adds the auxiliary
    cross-entropy. The Eq. 24 terms need the full (B, c, K, h, w) weights (``dist.logits(K)``) and the decode;
    the NLL alone needs neither.

    Args:
        dist: ``CategoricalLogits`` or ``LogisticMixture`` of this batch.
        z0: (B, c, h, w) long true indices; x0_image: (B, 3, H, W) in [0, 255] target of Eq. 24 (only used with
            ``eq24_weight > 0``); z_t, noise, t, alphas_cumprod, decode_soft, tau, generator: as
            :func:`categorical_loss`.
        soft_sample: see :func:`soft_weights`. sizes: (c,) codebook sizes.
    Returns:
        LossOutput with ``parts`` "nll", "img", "eps" (weighted; zeros where a term is off) and ``z0_hat``.
    Raises:
        ValueError: both weights 0, or a negative weight.
    """
    if nll_weight < 0 or eq24_weight < 0 or nll_weight + eq24_weight <= 0:
        raise ValueError(f"categorical_objective: weights must be >= 0 and not both 0, got nll={nll_weight}, "
                         f"eq24={eq24_weight}")
    zeros = torch.zeros(z0.shape[0], dtype=torch.float32, device=z0.device)
    nll = nll_weight * nll_loss(dist.log_prob(z0)).per_sample if nll_weight > 0 else zeros
    img = eps = zeros
    z0_hat = None
    if eq24_weight > 0:
        K = max(sizes) if sizes is not None else dist.logits().shape[2]
        paper = categorical_loss(dist.logits(K), x0_image, z_t, noise, t, alphas_cumprod, decode_soft, tau=tau,
                                 min_snr_gamma=min_snr_gamma, generator=generator, soft_sample=soft_sample,
                                 sizes=sizes)
        img, eps, z0_hat = eq24_weight * paper.parts["img"], eq24_weight * paper.parts["eps"], paper.z0_hat
    return LossOutput(per_sample=nll + img + eps, parts={"nll": nll, "img": img, "eps": eps}, z0_hat=z0_hat)
