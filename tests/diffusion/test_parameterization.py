"""Tests of mbldm/diffusion/parameterization.py: what the U-Net output means, for both variants."""
from __future__ import annotations

import math

import pytest
import torch

from mbldm.diffusion.categorical import CategoricalLogits
from mbldm.diffusion.logistic import LogisticMixture
from mbldm.diffusion.parameterization import Parameterization, parameterization_of
from mbldm.diffusion.preconditioning import edm_coefficients
from mbldm.diffusion.schedule import alphas_cumprod_from_betas, make_betas, q_sample

AC = alphas_cumprod_from_betas(make_betas("linear", 1000))


def _batch(c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, c, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, c, 4, 4, generator=g)
    t = torch.tensor([0, 300, 999])
    return x0, noise, t, q_sample(x0, t, noise, AC).float()


@pytest.mark.parametrize("prediction,precondition", [("epsilon", "none"), ("x0", "none"), ("v", "none"),
                                                     ("x0", "edm")])
def test_continuous_x0_from_the_true_target_is_the_true_x0(prediction, precondition):
    """Feeding each prediction type its own exact regression target must give back z_0 (the forms invert)."""
    x0, noise, t, z_t = _batch()
    p = Parameterization("continuous", (256, 256), prediction=prediction, precondition=precondition)
    target = p.regression_target(x0, noise, z_t, t, AC)
    torch.testing.assert_close(p.x0(target, z_t, t, AC), x0, rtol=0, atol=2e-4)
    assert p.out_channels() == 2


def test_out_channels_of_each_head():
    assert Parameterization("categorical", (256,) * 6).out_channels() == 6 * 256
    assert Parameterization("categorical", (256,) * 6, head="logistic", mixtures=10).out_channels() == 6 * 30
    with pytest.raises(ValueError, match="needs prediction 'x0'"):
        Parameterization("continuous", (256,), prediction="epsilon", precondition="edm")
    with pytest.raises(ValueError, match="head"):
        Parameterization("categorical", (256,), head="dense")


def test_logistic_edm_means_start_at_the_observed_latent():
    """With F = 0 the preconditioned logistic means are c_skip z~_t and the scales c_out (EDM's D at F = 0)."""
    _, _, t, z_t = _batch()
    L = 2
    p = Parameterization("categorical", (256, 256), head="logistic", mixtures=L, precondition="edm")
    dist = p.distribution(torch.zeros(3, 2 * 3 * L, 4, 4), z_t, t, AC)
    assert isinstance(dist, LogisticMixture)
    coef = edm_coefficients(AC, t, z_t)
    want_mu = (coef.c_skip * coef.inv_sqrt_abar * z_t).unsqueeze(2).expand(-1, -1, L, -1, -1)
    torch.testing.assert_close(dist.mu, want_mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(dist.log_s, torch.log(coef.c_out).unsqueeze(2).expand_as(dist.log_s).clamp(min=-9),
                               rtol=0, atol=1e-6)


def test_logits_edm_adds_the_gaussian_evidence_of_z_t():
    """Zero network logits + evidence: the posterior over k is proportional to N(z~_t; u_k, sigma^2)."""
    K = 8
    z_t = torch.full((1, 1, 1, 1), 0.3)
    t = torch.tensor([100])
    p = Parameterization("categorical", (K,), head="logits", precondition="edm")
    dist = p.distribution(torch.zeros(1, K, 1, 1), z_t, t, AC)
    assert isinstance(dist, CategoricalLogits)
    coef = edm_coefficients(AC, t, z_t)
    u = torch.tensor([2 * k / (K - 1) - 1 for k in range(K)])
    want = torch.softmax(-(float(coef.inv_sqrt_abar * 0.3) - u) ** 2 / (2 * float(coef.sigma) ** 2), dim=0)
    torch.testing.assert_close(torch.softmax(dist.logits()[0, 0, :, 0, 0], 0), want, rtol=0, atol=1e-5)


def test_parameterization_of_an_old_run_config_is_the_papers():
    p = parameterization_of({"variant": "categorical"}, (256,) * 6)
    assert (p.head, p.prediction, p.precondition) == ("logits", "epsilon", "none")
    assert p.estimate(torch.zeros(1, 6 * 256, 2, 2), torch.zeros(1, 6, 2, 2), torch.tensor([5]), AC).shape == \
        (1, 6, 2, 2)
    assert math.isclose(float(p.estimate(torch.zeros(1, 6 * 256, 2, 2), torch.zeros(1, 6, 2, 2),
                                         torch.tensor([5]), AC)[0, 0, 0, 0]), 0.0, abs_tol=1e-6)
