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


def test_continuous_loss_weights_of_each_objective_by_hand():
    # SNR = 1, 9, 1/9; gamma = 5: x0 weights min(SNR, 5) = 1, 5, 1/9; v weights min(SNR, 5) / (SNR + 1) =
    # 1/2, 1/2, (1/9) / (10/9) = 1/10; edm weights 1
    alphas_cumprod = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    target = torch.zeros(3, 1, 2, 2)
    pred = torch.ones(3, 1, 2, 2) * 2.0  # squared error 4 everywhere
    got = {o: losses.continuous_loss(pred, target, t, alphas_cumprod, 5.0, objective=o).per_sample.tolist()
           for o in ("x0", "v", "edm")}
    assert got["x0"] == pytest.approx([4.0, 20.0, 4 / 9], rel=1e-6)
    assert got["v"] == pytest.approx([2.0, 2.0, 0.4], rel=1e-6)
    assert got["edm"] == pytest.approx([4.0, 4.0, 4.0], rel=1e-6)
    with pytest.raises(ValueError, match="objective"):
        losses.continuous_loss(pred, target, t, alphas_cumprod, 5.0, objective="score")


def test_nll_loss_is_the_mean_cross_entropy_by_hand():
    from mbldm.diffusion.categorical import CategoricalLogits

    # one position, K = 3 logits (0, ln 2, ln 5): probabilities 1/8, 2/8, 5/8
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)]).view(1, 1, 3, 1, 1).repeat(2, 1, 1, 1, 2)
    z0 = torch.tensor([[[[2, 0]]], [[[1, 1]]]])  # (B=2, c=1, h=1, w=2)
    out = losses.nll_loss(CategoricalLogits(logits).log_prob(z0))
    expected = [(-math.log(5 / 8) - math.log(1 / 8)) / 2, -math.log(2 / 8)]
    assert out.per_sample.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.parts["nll"].tolist() == pytest.approx(expected, rel=1e-6)


def test_categorical_objective_adds_the_weighted_terms():
    from mbldm.diffusion.categorical import CategoricalLogits

    K = 3
    alphas_cumprod = torch.tensor([0.8, 0.5], dtype=torch.float64)
    t = torch.tensor([0, 1])
    index = torch.tensor([2, 0]).view(2, 1, 1, 1)
    logits = _one_hot_logits(index, K, scale=3.0)
    x0_image = torch.tensor([127.5, 255.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    z_t, noise = torch.tensor([0.3, -0.2]).view(2, 1, 1, 1), torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    g = [torch.Generator().manual_seed(s) for s in (1, 2)]
    paper = losses.categorical_loss(logits, x0_image, z_t, noise, t, alphas_cumprod, _decode_soft_linear,
                                    min_snr_gamma=None, generator=g)
    nll = losses.nll_loss(CategoricalLogits(logits).log_prob(index)).per_sample
    g = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = losses.categorical_objective(CategoricalLogits(logits), index, x0_image, z_t, noise, t, alphas_cumprod,
                                        _decode_soft_linear, nll_weight=0.5, eq24_weight=2.0, generator=g)
    torch.testing.assert_close(both.per_sample, 0.5 * nll + 2.0 * paper.per_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both.parts["img"], 2.0 * paper.parts["img"], rtol=1e-6, atol=1e-6)
    only_nll = losses.categorical_objective(CategoricalLogits(logits), index, None, z_t, noise, t, alphas_cumprod,
                                            None, nll_weight=1.0, eq24_weight=0.0)
    torch.testing.assert_close(only_nll.per_sample, nll)
    assert float(only_nll.parts["img"].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="not both 0"):
        losses.categorical_objective(CategoricalLogits(logits), index, None, z_t, noise, t, alphas_cumprod, None,
                                     nll_weight=0.0, eq24_weight=0.0)


def test_soft_weights_modes():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 2, 2)
    soft = losses.soft_weights(logits, "softmax", 0.5)
    torch.testing.assert_close(soft, torch.softmax(logits / 0.5, dim=2))
    logits.requires_grad_(True)
    hard = losses.soft_weights(logits, "straight-through", 1.0, torch.Generator().manual_seed(3))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0} and torch.equal(hard.detach().sum(2),
                                                                               torch.ones(2, 1, 2, 2))
    (hard * torch.arange(5.0).view(1, 1, 5, 1, 1)).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0  # the soft gradient flows
    with pytest.raises(ValueError, match="soft_sample"):
        losses.soft_weights(logits, "hardmax", 1.0)


def test_default_categorical_loss_solves_the_free_logit_check():
    """Issue 10's free-logit check: optimise one free logit tensor for a single latent with the default loss
    (the NLL; Adam lr 1e-2): the argmax must reach >= 90 % of the true indices (Eq. 24 alone reaches ~3.5 %)."""
    from mbldm.diffusion.categorical import CategoricalLogits

    g = torch.Generator().manual_seed(0)
    K, c, h = 256, 6, 8
    z0 = torch.randint(0, K, (1, c, h, h), generator=g)
    logits = torch.zeros(1, c, K, h, h, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=1e-2)
    for _ in range(300):
        loss = losses.categorical_objective(CategoricalLogits(logits), z0, None, None, None, None, None, None).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = float((logits.argmax(2) == z0).float().mean())
    assert accuracy >= 0.9


def test_logistic_head_nll_solves_the_free_parameter_check():
    """The same check for the default head (a 10-component discretised logistic mixture): its mode must reach
    >= 90 % of the true indices."""
    from mbldm.diffusion.logistic import LogisticMixture

    g = torch.Generator().manual_seed(0)
    K, c, h, L = 256, 6, 8, 10
    z0 = torch.randint(0, K, (1, c, h, h), generator=g)
    out = (0.1 * torch.randn(1, c * 3 * L, h, h, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([out], lr=1e-2)
    for _ in range(300):
        dist = LogisticMixture.from_output(out, c, L, K)
        loss = losses.nll_loss(dist.log_prob(z0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    mode = LogisticMixture.from_output(out.detach(), c, L, K).sample(0.0)
    assert float((mode == z0).float().mean()) >= 0.9
