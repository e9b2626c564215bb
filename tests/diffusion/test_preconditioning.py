"""Tests of mbldm/diffusion/preconditioning.py: EDM's c_skip / c_out for the VP process (Karras et al. 2022)."""
from __future__ import annotations

import math

import pytest
import torch

from mbldm.diffusion.preconditioning import edm_coefficients
from mbldm.diffusion.schedule import alphas_cumprod_from_betas, make_betas


def test_coefficients_by_hand_at_one_timestep():
    abar = torch.tensor([0.8], dtype=torch.float64)  # sigma^2 = 0.2 / 0.8 = 0.25
    like = torch.zeros(1, 2, 1, 1)
    c = edm_coefficients(abar, torch.tensor([0]), like, sigma_data=0.5)
    assert float(c.sigma) == pytest.approx(0.5)
    assert float(c.c_skip) == pytest.approx(0.25 / (0.25 + 0.25))
    assert float(c.c_out) == pytest.approx(0.5 * 0.5 / math.sqrt(0.5))
    assert float(c.inv_sqrt_abar) == pytest.approx(1 / math.sqrt(0.8))
    assert c.c_skip.shape == (1, 1, 1, 1)


def test_target_inverts_denoise_and_has_unit_variance_on_data_of_std_sigma_data():
    ac = alphas_cumprod_from_betas(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    for t in (0, 50, 400, 999):
        z0 = 0.5 * torch.randn(4000, 1, 1, 1, generator=g, dtype=torch.float64)
        eps = torch.randn(4000, 1, 1, 1, generator=g, dtype=torch.float64)
        tt = torch.full((4000,), t)
        z_t = ac[t].sqrt() * z0 + (1 - ac[t]).sqrt() * eps
        coef = edm_coefficients(ac, tt, z_t, sigma_data=0.5)
        target = coef.target(z_t, z0)
        torch.testing.assert_close(coef.denoise(z_t, target), z0, rtol=0, atol=1e-9)
        assert float(target.std()) == pytest.approx(1.0, abs=0.05)  # EDM's unit-variance training target


def test_small_noise_keeps_the_input_and_scales_the_correction_to_the_noise():
    ac = alphas_cumprod_from_betas(make_betas("linear", 1000))
    coef = edm_coefficients(ac, torch.tensor([0]), torch.zeros(1, 1, 1, 1, dtype=torch.float64), sigma_data=0.5)
    assert float(coef.c_skip) == pytest.approx(1.0, abs=1e-3)
    assert float(coef.c_out) == pytest.approx(float(coef.sigma), rel=1e-3)  # ~0.01 = 1.3 index steps at K = 256
    with pytest.raises(ValueError, match="sigma_data"):
        edm_coefficients(ac, 0, torch.zeros(1), sigma_data=0.0)
