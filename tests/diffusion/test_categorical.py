"""Tests for mbldm/diffusion/categorical.py: Eq. 20 (Gumbel-softmax), Eq. 24 (eps_z), Eq. 25 (temperature sampling)."""
from __future__ import annotations

import math

import pytest
import torch

from mbldm.diffusion.categorical import (
    eps_z,
    expected_index_unit,
    gumbel_noise,
    gumbel_softmax,
    logits_from_model_output,
    temperature_sample,
)
from mbldm.diffusion.schedule import alphas_cumprod_from_betas, indices_to_unit, make_betas, q_sample

EULER_GAMMA = 0.5772156649015329


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = n * probs
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square quantile for 7 degrees of freedom at p = 1e-4 (tables: 29.88)
CHI2_7_P1E4 = 29.9


def test_logits_layout_channel_is_ci_times_K_plus_k():
    B, c, K, h, w = 2, 3, 4, 2, 5
    out = torch.arange(B * c * K * h * w, dtype=torch.float32).view(B, c * K, h, w)
    logits = logits_from_model_output(out, c, K)
    assert logits.shape == (B, c, K, h, w)
    for ci in range(c):
        for k in range(K):
            assert torch.equal(logits[:, ci, k], out[:, ci * K + k])
    assert logits.data_ptr() == out.data_ptr()  # a view
    with pytest.raises(ValueError, match="c\\*K|3\\*5"):
        logits_from_model_output(out, 3, 5)


def test_gumbel_noise_moments_and_reproducibility():
    g = gumbel_noise((200_000,), _gen(0))
    # Gumbel(0, 1): mean = Euler's constant, variance = pi^2 / 6; std errors ~0.003 and ~0.01
    assert float(g.mean()) == pytest.approx(EULER_GAMMA, abs=0.015)
    assert float(g.var()) == pytest.approx(math.pi**2 / 6, abs=0.05)
    assert torch.equal(gumbel_noise((5, 3), _gen(7)), gumbel_noise((5, 3), _gen(7)))
    assert torch.isfinite(g).all()


def test_gumbel_softmax_small_tau_is_one_hot_of_perturbed_argmax():
    logits = torch.randn(2, 3, 8, 4, 4, generator=_gen(1), dtype=torch.float64)
    w = gumbel_softmax(logits, tau=1e-3, generator=_gen(5))
    G = gumbel_noise(tuple(logits.shape), _gen(5), dtype=torch.float64)
    perturbed = logits + G
    target = torch.nn.functional.one_hot(perturbed.argmax(dim=2), 8).permute(0, 1, 4, 2, 3).double()
    # where the top two perturbed logits are 0.02 apart (tau * 20), softmax is within e^-20 of one-hot
    top2 = perturbed.topk(2, dim=2).values
    clear = (top2[:, :, 0] - top2[:, :, 1] > 0.02).unsqueeze(2).expand_as(w)
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(w[clear], target[clear], atol=1e-6, rtol=0)
    assert torch.equal(w.argmax(dim=2), perturbed.argmax(dim=2))


def test_gumbel_softmax_tiny_tau_large_margin_is_one_hot_of_argmax():
    idx = torch.randint(0, 8, (2, 3, 4, 4), generator=_gen(2))
    # margin 40 > range of float32 Gumbel noise (about 21), so the noise cannot change the argmax
    logits = 40.0 * torch.nn.functional.one_hot(idx, 8).permute(0, 1, 4, 2, 3).float()
    w = gumbel_softmax(logits, tau=1e-2, generator=_gen(3))
    expected = torch.nn.functional.one_hot(idx, 8).permute(0, 1, 4, 2, 3).float()
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


def test_gumbel_softmax_properties():
    logits = torch.randn(2, 2, 6, 3, 3, generator=_gen(4), requires_grad=True)
    w = gumbel_softmax(logits, tau=1.0, generator=_gen(0))
    assert w.shape == logits.shape and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=2), torch.ones(2, 2, 3, 3))
    (w[:, :, 0] * 3.0).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # tau -> inf: uniform
    torch.testing.assert_close(gumbel_softmax(logits.detach(), 1e6, _gen(0)), torch.full_like(w, 1 / 6), atol=1e-4, rtol=0)
    # hard: exact one-hot forward, soft gradient
    hard = gumbel_softmax(logits.detach(), 1.0, _gen(0), hard=True)
    assert torch.equal(hard.sum(dim=2), torch.ones(2, 2, 3, 3)) and set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.argmax(dim=2), w.argmax(dim=2))
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(logits, 0.0)
    with pytest.raises(ValueError, match="\\(B, c, K, h, w\\)"):
        gumbel_softmax(logits[0], 1.0)


def test_expected_index_unit():
    K = 5
    idx = torch.randint(0, K, (2, 3, 4, 4), generator=_gen(6))
    one_hot = torch.nn.functional.one_hot(idx, K).permute(0, 1, 4, 2, 3).float()
    torch.testing.assert_close(expected_index_unit(one_hot, K), indices_to_unit(idx, K))
    w = torch.softmax(torch.randn(2, 3, K, 4, 4, generator=_gen(7)), dim=2)
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])  # 2k/4 - 1 by hand
    torch.testing.assert_close(expected_index_unit(w, K), (w * values.view(1, 1, K, 1, 1)).sum(dim=2))
    torch.testing.assert_close(expected_index_unit(torch.full((1, 1, K, 2, 2), 1 / K), K), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="K=4"):
        expected_index_unit(w, 4)


def test_eps_z_recovers_true_noise_for_true_z0():
    ac = alphas_cumprod_from_betas(make_betas())
    K = 256
    z = torch.randint(0, K, (4, 6, 4, 4), generator=_gen(8))
    z0 = indices_to_unit(z, K).double()
    eps = torch.randn(4, 6, 4, 4, generator=_gen(9), dtype=torch.float64)
    t = torch.tensor([0, 3, 500, 999])
    zt = q_sample(z0, t, eps, ac)
    torch.testing.assert_close(eps_z(zt, t, z0, ac), eps, atol=1e-9, rtol=0)
    # a wrong z0 gives a different noise: (a_t z_t - z0') / b_t differs by (z0 - z0') / b_t
    wrong = eps_z(zt, t, z0 + 0.1, ac)
    b_t = torch.sqrt(1 / ac[t] - 1).view(4, 1, 1, 1)
    torch.testing.assert_close(wrong, eps - 0.1 / b_t, atol=1e-9, rtol=0)


def test_temperature_sample_gamma_zero_is_argmax():
    logits = torch.randn(3, 2, 16, 5, 5, generator=_gen(10))
    z = temperature_sample(logits, 0.0, generator=_gen(0))
    assert z.dtype == torch.int64 and z.shape == (3, 2, 5, 5)
    assert torch.equal(z, logits.argmax(dim=2))
    with pytest.raises(ValueError, match="gamma"):
        temperature_sample(logits, -1.0)


def test_temperature_sample_large_gamma_is_near_uniform():
    K = 8
    logits = (torch.arange(K, dtype=torch.float32) * 2.0).view(1, 1, K, 1, 1).expand(1, 1, K, 100, 200)
    z = temperature_sample(logits, 1e4, generator=_gen(11))  # 20,000 samples
    counts = torch.bincount(z.flatten(), minlength=K).double()
    assert _chi2(counts, torch.full((K,), 1 / K, dtype=torch.float64)) < CHI2_7_P1E4


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_temperature_sample_follows_softmax_of_scaled_logits(gamma):
    K = 8
    base = torch.tensor([0.0, 0.5, 1.0, -1.0, 0.2, 1.5, -0.5, 0.3])
    logits = base.view(1, 1, K, 1, 1).expand(1, 1, K, 100, 200)
    z = temperature_sample(logits, gamma, generator=_gen(12))
    counts = torch.bincount(z.flatten(), minlength=K).double()
    probs = torch.softmax(base.double() / gamma, dim=0)
    assert _chi2(counts, probs) < CHI2_7_P1E4
    # and it is not the uniform distribution
    assert _chi2(counts, torch.full((K,), 1 / K, dtype=torch.float64)) > 100


def test_per_image_generators_are_batch_size_invariant():
    logits = torch.randn(4, 2, 8, 3, 3, generator=_gen(13))
    batch = temperature_sample(logits, 1.0, generator=[_gen(b) for b in range(4)])
    single = torch.cat([temperature_sample(logits[b : b + 1], 1.0, generator=[_gen(b)]) for b in range(4)])
    assert torch.equal(batch, single)
    two = temperature_sample(logits[2:4], 1.0, generator=[_gen(2), _gen(3)])
    assert torch.equal(two, batch[2:4])
    w_batch = gumbel_softmax(logits, 1.0, generator=[_gen(b) for b in range(4)])
    w_single = torch.cat([gumbel_softmax(logits[b : b + 1], 1.0, generator=[_gen(b)]) for b in range(4)])
    assert torch.equal(w_batch, w_single)
    # different seeds give different samples (the generators are used)
    assert not torch.equal(batch, temperature_sample(logits, 1.0, generator=[_gen(b + 20) for b in range(4)]))
    with pytest.raises(ValueError, match="one per image"):
        temperature_sample(logits, 1.0, generator=[_gen(0)] * 3)
