"""Tests of mbldm/diffusion/logistic.py: the discretised logistic mixture over ordered codebook indices."""
from __future__ import annotations

import math

import pytest
import torch

from mbldm.diffusion.logistic import LogisticMixture, per_channel_sizes, split_output


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _mixture(out: torch.Tensor, c: int, L: int, sizes) -> LogisticMixture:
    return LogisticMixture.from_output(out, c, L, sizes)


def test_one_component_bin_probabilities_by_hand():
    """K = 4 (units -1, -1/3, 1/3, 1; half-bin 1/3), mu = 0, s = 0.2: P(k) from the logistic CDF by hand."""
    c, L, K = 1, 1, 4
    out = torch.tensor([0.0, 0.0, math.log(0.2)]).view(1, 3, 1, 1)  # pi logit, mu, log s
    m = _mixture(out, c, L, K)
    cdf = lambda u: _sigmoid(u / 0.2)  # noqa: E731
    expected = [cdf(-2 / 3), cdf(0.0) - cdf(-2 / 3), cdf(2 / 3) - cdf(0.0), 1 - cdf(2 / 3)]
    got = m.logits(K).exp().view(-1).tolist()
    assert got == pytest.approx(expected, abs=1e-6)
    z = torch.tensor([0, 1, 2, 3]).view(4, 1, 1, 1)
    m4 = _mixture(out.repeat(4, 1, 1, 1), c, L, K)
    assert m4.log_prob(z).exp().view(-1).tolist() == pytest.approx(expected, abs=1e-6)


def test_two_components_mix_by_their_weights():
    """P(k) = 0.25 P_1(k) + 0.75 P_2(k) for pi logits (0, log 3)."""
    K = 8
    out = torch.tensor([0.0, math.log(3.0), -0.5, 0.5, math.log(0.1), math.log(0.3)]).view(1, 6, 1, 1)
    mix = _mixture(out, 1, 2, K).logits(K).exp().view(-1)
    one = _mixture(torch.tensor([0.0, -0.5, math.log(0.1)]).view(1, 3, 1, 1), 1, 1, K).logits(K).exp().view(-1)
    two = _mixture(torch.tensor([0.0, 0.5, math.log(0.3)]).view(1, 3, 1, 1), 1, 1, K).logits(K).exp().view(-1)
    torch.testing.assert_close(mix, 0.25 * one + 0.75 * two, rtol=0, atol=1e-6)


def test_probabilities_sum_to_one_per_channel_with_its_own_codebook_size():
    torch.manual_seed(0)
    c, L = 3, 4
    out = torch.randn(2, c * 3 * L, 2, 3) * 2
    m = _mixture(out, c, L, [16, 8, 256])
    p = m.logits(256).exp()  # (B, c, K, h, w)
    for j, k in enumerate((16, 8, 256)):
        torch.testing.assert_close(p[:, j, :k].sum(1), torch.ones(2, 2, 3), rtol=0, atol=1e-5)
        assert float(p[:, j, k:].sum()) < 1e-20  # indices beyond K_j carry no mass
    z = torch.stack([torch.randint(0, k, (2, 2, 3)) for k in (16, 8, 256)], dim=1)
    torch.testing.assert_close(m.log_prob(z), m.logits(256).gather(2, z.unsqueeze(2)).squeeze(2), rtol=0, atol=1e-5)


def test_log_prob_stays_finite_for_tiny_scales_far_from_the_mean():
    out = torch.tensor([0.0, 0.0, -9.0]).view(1, 3, 1, 1)  # s = e^-9, far below one index step
    m = _mixture(out.repeat(3, 1, 1, 1), 1, 1, 256)
    lp = m.log_prob(torch.tensor([127, 0, 255]).view(3, 1, 1, 1))
    assert torch.isfinite(lp).all() and float(lp[1]) < -1e3 and float(lp[2]) < -1e3


def test_mean_and_mode_and_sampling():
    # one component at index 100 of 256, tiny scale: mean = unit(100), mode = 100, samples all 100
    u100 = 2 * 100 / 255 - 1
    out = torch.tensor([0.0, u100, -8.0]).view(1, 3, 1, 1).repeat(4, 1, 2, 2)
    m = _mixture(out, 1, 1, 256)
    torch.testing.assert_close(m.mean_unit(), torch.full((4, 1, 2, 2), u100), rtol=0, atol=1e-6)
    assert bool((m.sample(0.0) == 100).all()) and bool((m.sample(1.0) == 100).all())


def test_sampling_matches_the_mixture_frequencies_and_per_image_generators():
    """gamma = 1 draws from the mixture: 20,000 draws of a wide two-component mixture over K = 8 match P(k)."""
    K, n = 8, 20000
    out = torch.tensor([0.0, math.log(3.0), -0.5, 0.5, math.log(0.2), math.log(0.3)]).view(1, 6, 1, 1)
    m = _mixture(out.repeat(n, 1, 1, 1), 1, 2, K)
    draws = m.sample(1.0, torch.Generator().manual_seed(0)).view(-1)
    freq = torch.bincount(draws, minlength=K).float() / n
    torch.testing.assert_close(freq, m.logits(K)[0].exp().view(-1), rtol=0, atol=0.015)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = _mixture(out.repeat(2, 1, 3, 3), 1, 2, K).sample(1.0, gens)
    alone = _mixture(out.repeat(1, 1, 3, 3), 1, 2, K).sample(1.0, [torch.Generator().manual_seed(6)])
    assert torch.equal(both[1:], alone)  # image b depends only on its own generator


def test_bad_shapes_and_sizes_are_refused():
    with pytest.raises(ValueError, match="outputs"):
        split_output(torch.zeros(1, 7, 2, 2), 1, 2)
    with pytest.raises(ValueError, match="codebook sizes"):
        per_channel_sizes([16, 1], 2)
    m = _mixture(torch.zeros(1, 3, 1, 1), 1, 1, 4)
    with pytest.raises(ValueError, match="gamma"):
        m.sample(-1.0)
