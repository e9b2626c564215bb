"""Categorical reverse process of §3.2.2 / §4.2.3: Gumbel-softmax (Eq. 20), eps_z (Eq. 24), temperature sampling (Eq. 25).

Layout: the denoiser outputs c*K channels, (B, c*K, h, w); channel ``ci * K + k`` is the logit of index k for
latent channel ci. ``logits_from_model_output`` views it as (B, c, K, h, w) and every function here takes the K
axis at dim 2.

Randomness: Gumbel noise is drawn here (not with ``torch.nn.functional.gumbel_softmax``, which takes no
generator) as G = -log(-log U), U ~ Uniform(0, 1), so that results are reproducible. ``generator`` may be None
(global RNG), one ``torch.Generator`` for the whole batch, or a list of B generators: image b then draws its noise,
shape (1, c, K, h, w), from ``generator[b]`` only, so its result does not depend on the batch it is in.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mbldm.diffusion.schedule import eps_from_x0, indices_to_unit

Generators = torch.Generator | Sequence[torch.Generator] | None


def logits_from_model_output(out: torch.Tensor, c: int, K: int) -> torch.Tensor:
    """View the model output (B, c*K, h, w) as logits (B, c, K, h, w); channel index = ci * K + k.

    Returns a view when ``out`` is contiguous (a copy otherwise).

    Raises:
        ValueError: ``out`` is not 4-D with c*K channels.
    """
    if out.ndim != 4 or out.shape[1] != c * K:
        raise ValueError(f"logits_from_model_output expects (B, {c}*{K}={c * K}, h, w), got shape {tuple(out.shape)}")
    b, _, h, w = out.shape
    return out.reshape(b, c, K, h, w)


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.ndim != 5:
        raise ValueError(f"{name} expects logits (B, c, K, h, w), got shape {tuple(logits.shape)}")


def _uniform(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """U ~ Uniform[0, 1) of ``shape`` (B, ...); with a list of generators, row b comes from generator[b] only."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images; need one per image")
    rows = [torch.rand((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.cat(rows, dim=0)


def gumbel_noise(
    shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise G = -log(-log U), U ~ Uniform(0, 1) (mean: Euler's gamma 0.5772, var pi^2/6).

    U is clamped to [tiny, 1) so G is finite (G in [-4.5, 16.6] for float32).

    Args:
        shape: (B, ...) output shape.
        generator: None, a generator, or a list of B generators (see the module docstring).
        device, dtype: of the result (float32 by default).

    Returns:
        tensor of ``shape``.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    u = _uniform(tuple(shape), generator, device, dtype)
    u = u.clamp_(min=torch.finfo(dtype).tiny)
    return -torch.log(-torch.log(u))


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision logits are processed in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def gumbel_softmax(
    logits: torch.Tensor, tau: float, generator: Generators = None, hard: bool = False
) -> torch.Tensor:
    """Gumbel-softmax relaxation of sampling index k (paper Eq. 20, Jang et al. 2017): softmax((z^ + G) / tau).

    softmax over K (dim 2). tau -> 0 approaches the one-hot of argmax(z^ + G) (an exact categorical sample,
    Gumbel-max); tau -> inf approaches the uniform distribution (Fig. 4). The noise is ``gumbel_noise`` (our own,
    for the ``generator`` argument) instead of ``torch.nn.functional.gumbel_softmax``; the math is the same.

    Args:
        logits: (B, c, K, h, w) unnormalised log-probabilities z^ (the model output, see
            ``logits_from_model_output``).
        tau: temperature > 0 (the paper reports tau = 1.0 and 2.2, Table 2).
        generator: None, a generator, or a list of B per-image generators.
        hard: straight-through estimator: return the one-hot of the argmax in the forward pass with the soft
            weights' gradient.

    Returns:
        weights (B, c, K, h, w) with the dtype of ``logits``, non-negative, summing to 1 over dim 2; differentiable
        with respect to ``logits``.

    Raises:
        ValueError: tau <= 0 or logits not 5-D.
    """
    _check_logits(logits, "gumbel_softmax")
    if not tau > 0:
        raise ValueError(f"gumbel_softmax: tau must be > 0, got {tau}")
    dtype = _work_dtype(logits)
    g = gumbel_noise(tuple(logits.shape), generator, logits.device, dtype)  # (B, c, K, h, w)
    y = torch.softmax((logits.to(dtype) + g) / tau, dim=2)  # (B, c, K, h, w)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(2, y.argmax(dim=2, keepdim=True), 1.0)
        y = one_hot - y.detach() + y
    return y.to(logits.dtype)


def expected_index_unit(weights: torch.Tensor, K: int) -> torch.Tensor:
    """Soft z_0 in unit space: sum_k w_k unit(k), unit(k) = 2 k / (K - 1) - 1 (the z~_0 of Eq. 24).

    For one-hot weights this equals ``indices_to_unit`` of the chosen index. Computed as a batched matrix product
    (1, K) @ (B*c, K, h*w) on a view of ``weights`` (equivalent to einsum("bckhw,k->bchw")), so no second
    (B, c, K, h, w) tensor is made.

    Args:
        weights: (B, c, K, h, w) non-negative weights summing to 1 over dim 2 (e.g. ``gumbel_softmax`` output).
        K: codebook size (>= 2), must equal weights.shape[2].

    Returns:
        (B, c, h, w) tensor in [-1, 1] with the dtype of ``weights``; differentiable.

    Raises:
        ValueError: shape mismatch.
    """
    _check_logits(weights, "expected_index_unit")
    b, c, k, h, w = weights.shape
    if k != K:
        raise ValueError(f"expected_index_unit: weights have {k} categories at dim 2, expected K={K}")
    values = indices_to_unit(torch.arange(K, device=weights.device), K).to(weights.dtype)  # (K,)
    flat = weights.reshape(b * c, K, h * w)  # view when contiguous
    out = torch.matmul(values.view(1, 1, K), flat)  # (B*c, 1, h*w)
    return out.view(b, c, h, w)


def eps_z(z_t: torch.Tensor, t: torch.Tensor | int, z0_hat: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Predicted latent noise of Eq. 24: eps_z = (a_t z_t - z~_0) / b_t, a_t = 1/sqrt(a_bar_t), b_t = sqrt(1/a_bar_t - 1).

    Args:
        z_t: (B, c, h, w) noisy latent in unit space.
        t: LongTensor (B,) timesteps (or an int).
        z0_hat: (B, c, h, w) z~_0 estimate in unit space (e.g. ``expected_index_unit`` of Gumbel-softmax weights).
        alphas_cumprod: (T,) tensor.

    Returns:
        (B, c, h, w) tensor, differentiable in ``z0_hat``; equals the true eps when z0_hat is the true z_0.
    """
    return eps_from_x0(z_t, t, z0_hat, alphas_cumprod)


def temperature_sample(logits: torch.Tensor, gamma: float, generator: Generators = None) -> torch.Tensor:
    """Sample z~_0 ~ softmax(z^_0 / gamma) over K at every (ci, i, j) (paper Eq. 25, Algorithm 2).

    gamma == 0 is exactly argmax (the mode, Fig. 9a); gamma -> inf tends to uniform. Sampling uses the Gumbel-max
    trick, argmax(z^ / gamma + G), which is an exact sample of the categorical distribution. With a list of
    generators the noise is drawn one image at a time (memory of one image's (c, K, h, w) noise).

    Args:
        logits: (B, c, K, h, w) unnormalised log-probabilities.
        gamma: temperature >= 0.
        generator: None, a generator, or a list of B per-image generators (image b uses generator[b] only).

    Returns:
        LongTensor (B, c, h, w) of indices in [0, K-1].

    Raises:
        ValueError: gamma < 0, logits not 5-D, or a generator list of the wrong length.
    """
    _check_logits(logits, "temperature_sample")
    if gamma < 0:
        raise ValueError(f"temperature_sample: gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return logits.argmax(dim=2)
    dtype = _work_dtype(logits)
    if generator is None or isinstance(generator, torch.Generator):
        g = gumbel_noise(tuple(logits.shape), generator, logits.device, dtype)  # (B, c, K, h, w)
        return (logits.to(dtype) / gamma + g).argmax(dim=2)
    if len(generator) != logits.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {logits.shape[0]} images; need one per image")
    out = []
    for b, gen in enumerate(generator):
        g = gumbel_noise((1, *logits.shape[1:]), gen, logits.device, dtype)  # (1, c, K, h, w)
        out.append((logits[b : b + 1].to(dtype) / gamma + g).argmax(dim=2))  # (1, c, h, w)
    return torch.cat(out, dim=0)


def mask_logits(logits: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
    """Logits (B, c, K_max, h, w) with every index k >= K_j of channel j set to -1e4 (probability ~ 0), for
    codecs whose channels have different codebook sizes (VQ-6-4-4: 64, 16, 16). Returns ``logits`` unchanged when
    every K_j == K_max (or ``sizes`` is None)."""
    if sizes is None:
        return logits
    K = logits.shape[2]
    sizes_t = torch.as_tensor(list(sizes), device=logits.device)
    if bool((sizes_t == K).all()):
        return logits
    k = torch.arange(K, device=logits.device).view(1, 1, K, 1, 1)
    return logits.masked_fill(k >= sizes_t.view(1, -1, 1, 1, 1), -1e4)


class CategoricalLogits:
    """Free logits over each codebook (the paper's head, §3.2.2): the same interface as
    :class:`mbldm.diffusion.logistic.LogisticMixture` (``log_prob``, ``mean_unit``, ``sample``, ``logits``).

    Args:
        logits: (B, c, K_max, h, w) unnormalised log-probabilities.
        sizes: the (c,) codebook sizes K_j (None: all K_max); indices k >= K_j are masked out.
    """

    def __init__(self, logits: torch.Tensor, sizes: Sequence[int] | None = None):
        _check_logits(logits, "CategoricalLogits")
        self._logits = mask_logits(logits, sizes)
        K = logits.shape[2]
        self._sizes = [K] * logits.shape[1] if sizes is None else [int(k) for k in sizes]

    def logits(self, K_max: int | None = None) -> torch.Tensor:
        """(B, c, K_max, h, w) masked logits."""
        return self._logits

    def log_prob(self, z0: torch.Tensor) -> torch.Tensor:
        """log softmax at the true indices: z0 (B, c, h, w) integers -> (B, c, h, w) float32 (nats)."""
        log_p = torch.log_softmax(self._logits.float(), dim=2)
        return log_p.gather(2, z0.long().unsqueeze(2)).squeeze(2)

    def mean_unit(self) -> torch.Tensor:
        """E[unit(z0)] under softmax(logits): (B, c, h, w) in [-1, 1], unit(k) = 2k / (K_j - 1) - 1 per channel."""
        return expected_unit(torch.softmax(self._logits.float(), dim=2), self._sizes)

    def sample(self, gamma: float, generator: Generators = None) -> torch.Tensor:
        """Eq. 25: z0 ~ softmax(logits / gamma) (gamma = 0: argmax): LongTensor (B, c, h, w)."""
        return temperature_sample(self._logits, gamma, generator=generator)


def expected_unit(weights: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Soft z_0 in unit space with per-channel codebook sizes: sum_k w_k (2k / (K_j - 1) - 1) over dim 2.

    ``sizes`` None (or all equal to the K axis) is exactly :func:`expected_index_unit`. Weights on k >= K_j
    contribute with value clamped to +1 (they should be ~0, see :func:`mask_logits`).

    Args:
        weights: (B, c, K, h, w) non-negative, summing to 1 over dim 2.
        sizes: (c,) codebook sizes K_j, or None.
    Returns:
        (B, c, h, w) in [-1, 1] with the dtype of ``weights``; differentiable.
    """
    _check_logits(weights, "expected_unit")
    K = weights.shape[2]
    if sizes is None or all(int(k) == K for k in sizes):
        return expected_index_unit(weights, K)
    k = torch.arange(K, device=weights.device, dtype=weights.dtype)
    sizes_t = torch.as_tensor(list(sizes), device=weights.device, dtype=weights.dtype)
    values = (2.0 * k.view(1, K) / (sizes_t.view(-1, 1) - 1.0) - 1.0).clamp(max=1.0)  # (c, K)
    return torch.einsum("bckhw,ck->bchw", weights, values)
