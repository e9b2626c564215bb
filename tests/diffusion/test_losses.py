"""Tests of mbldm/diffusion/losses.py against hand-computed values (min-SNR weights, Eq. 4, Eq. 24)."""
from __future__ import annotations

import math

import pytest
import torch

from mbldm.diffusion import losses
from mbldm.diffusion.schedule import indices_to_unit, q_sample


def test_per_sample_mse_hand_values():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[1.0, -1.0], [2.0, 0.0]]])
    # item 0: (0 + 4 + 0 + 16) / 4 = 5 ; item 1: (1 + 1 + 4 + 0) / 4 = 1.5
    assert losses.per_sample_mse(a, b).tolist() == [5.0, 1.5]
    with pytest.raises(ValueError, match="shapes differ"):
        losses.per_sample_mse(a, b[:, :1])


def test_continuous_loss_min_snr_weighted_hand_values():
    # a_bar = 0.5, 0.9, 0.1 -> SNR = 1, 9, 1/9; gamma = 5 -> eps weights min(SNR, 5)/SNR = 1, 5/9, 1
    alphas_cumprod = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1])
    noise = torch.zeros(4, 2, 3, 3)
    offsets = torch.tensor([1.0, 2.0, 0.5, -3.0])
    eps_pred = noise + offsets.view(4, 1, 1, 1)  # squared error per element = offset^2
    out = losses.continuous_loss(eps_pred, noise, t, alphas_cumprod, min_snr_gamma=5.0)
    expected = [1.0 * 1.0, 5 / 9 * 4.0, 1.0 * 0.25, 5 / 9 * 9.0]
    assert out.per_sample.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(out.loss) == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert out.parts == {} and out.z0_hat is None
    unweighted = losses.continuous_loss(eps_pred, noise, t, alphas_cumprod, min_snr_gamma=None)
    assert unweighted.per_sample.tolist() == pytest.approx([1.0, 4.0, 0.25, 9.0])


def _one_hot_logits(index: torch.Tensor, K: int, scale: float = 100.0) -> torch.Tensor:
    """Logits (B, c, K, h, w) so peaked that Gumbel noise (|G| < 17 in float32) cannot change the argmax and the
    softmax is one-hot to float32 precision."""
    one_hot = torch.nn.functional.one_hot(index, K).permute(0, 1, 4, 2, 3).float()  # (B, c, K, h, w)
    return scale * (2 * one_hot - 1)


def _decode_soft_linear(weights: torch.Tensor) -> torch.Tensor:
    """A toy Eq. 21 decoder: codeword k of the single channel is the grey level 100 k, (B,1,K,h,w) -> (B,3,h,w)."""
    K = weights.shape[2]
    grey = torch.einsum("bckhw,k->bhw", weights, 100.0 * torch.arange(K, dtype=weights.dtype))
    return grey.unsqueeze(1).expand(-1, 3, -1, -1)


def test_categorical_loss_hand_values():
    K = 3  # unit(k) = -1, 0, 1
    alphas_cumprod = torch.tensor([0.8, 0.5], dtype=torch.float64)  # SNR 4 and 1
    t = torch.tensor([0, 1])
    index = torch.tensor([2, 0]).view(2, 1, 1, 1)  # predicted index per image (c = h = w = 1)
    logits = _one_hot_logits(index, K)
    x0_image = torch.tensor([127.5, 255.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)  # unit 0 and 1
    z_t = torch.tensor([0.3, -0.2]).view(2, 1, 1, 1)
    noise = torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    out = losses.categorical_loss(logits, x0_image, z_t, noise, t, alphas_cumprod, _decode_soft_linear,
                                  tau=1.0, min_snr_gamma=2.0, generator=torch.Generator().manual_seed(0))
    # image 0: x0_hat = 200/127.5 - 1, target 0, w_x0 = min(4, 2) = 2
    # image 1: x0_hat = 0/127.5 - 1 = -1, target 1, w_x0 = min(1, 2) = 1
    img = [2 * (200 / 127.5 - 1) ** 2, 1 * (-1 - 1) ** 2]
    # eps_z = (z_t / sqrt(ab) - z0_hat) / sqrt(1/ab - 1), z0_hat = +1 and -1; w_eps = min(SNR, 2) / SNR = 0.5, 1
    e0 = (0.3 / math.sqrt(0.8) - 1.0) / math.sqrt(1 / 0.8 - 1)
    e1 = (-0.2 / math.sqrt(0.5) + 1.0) / math.sqrt(1 / 0.5 - 1)
    eps = [0.5 * (e0 - 0.1) ** 2, 1.0 * (e1 - 0.5) ** 2]
    assert out.parts["img"].tolist() == pytest.approx(img, rel=1e-5)
    assert out.parts["eps"].tolist() == pytest.approx(eps, rel=1e-5)
    assert out.per_sample.tolist() == pytest.approx([img[0] + eps[0], img[1] + eps[1]], rel=1e-5)
    assert out.z0_hat.flatten().tolist() == pytest.approx([1.0, -1.0])


def test_categorical_eps_term_equals_min_snr_x0_error_in_index_space():
    """With z_t = q_sample(z0, t, eps), w_eps ||eps - eps_z||^2 = min(SNR, gamma) ||z0 - z0_hat||^2 (docstring)."""
    K, gamma = 16, 5.0
    alphas_cumprod = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    B, c, h, w = 6, 2, 3, 3
    z0 = torch.randint(0, K, (B, c, h, w), generator=gen)
    pred = torch.randint(0, K, (B, c, h, w), generator=gen)
    t = torch.tensor([0, 5, 12, 25, 40, 49])
    noise = torch.randn(B, c, h, w, generator=gen)
    z_t = q_sample(indices_to_unit(z0, K), t, noise, alphas_cumprod)
    x0_image = torch.zeros(B, 3, h, w)
    out = losses.categorical_loss(_one_hot_logits(pred, K), x0_image, z_t, noise, t, alphas_cumprod,
                                  lambda wts: torch.zeros(wts.shape[0], 3, h, w), min_snr_gamma=gamma, generator=gen)
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    expected = snr.clamp(max=gamma) * (indices_to_unit(z0, K) - indices_to_unit(pred, K)).pow(2).flatten(1).mean(1)
    assert out.parts["eps"].tolist() == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)


def test_categorical_loss_is_differentiable_and_zero_at_the_target():
    K = 4
    alphas_cumprod = torch.tensor([0.9, 0.6, 0.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randint(0, K, (3, 1, 2, 2), generator=gen)
    t = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 1, 2, 2, generator=gen)
    z_t = q_sample(indices_to_unit(z0, K), t, noise, alphas_cumprod)
    target = _decode_soft_linear(torch.nn.functional.one_hot(z0, K).permute(0, 1, 4, 2, 3).float())
    exact = losses.categorical_loss(_one_hot_logits(z0, K), target, z_t, noise, t, alphas_cumprod,
                                    _decode_soft_linear, generator=gen)
    assert exact.per_sample.abs().max() < 1e-5
    logits = torch.randn(3, 1, K, 2, 2, generator=gen, requires_grad=True)
    out = losses.categorical_loss(logits, target, z_t, noise, t, alphas_cumprod, _decode_soft_linear,
                                  tau=2.2, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    out.loss.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all()) and logits.grad.abs().sum() > 0


def test_categorical_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, c, K, h, w\)"):
        losses.categorical_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4),
                                torch.zeros(2, 1, 4, 4), torch.zeros(2).long(), torch.tensor([0.5]),
                                _decode_soft_linear)
