"""Tests for mbldm/diffusion/schedule.py: hand values of Eq. 2-4, min-SNR, index mapping, diffusers stepping."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mbldm.diffusion.schedule import (
    alphas_cumprod_from_betas,
    ddim_timesteps,
    eps_from_x0,
    indices_to_unit,
    make_betas,
    make_scheduler,
    min_snr_weight,
    q_sample,
    self_condition_input,
    snr,
    timestep_quartile,
    trailing_timesteps,
    unit_to_indices,
    x0_from_eps,
)


def _ac_with_snrs(snrs: list[float]) -> torch.Tensor:
    """alphas_cumprod whose entry i has SNR snrs[i]: a_bar = snr / (1 + snr)."""
    s = torch.tensor(snrs, dtype=torch.float64)
    return s / (1.0 + s)


# ---------------------------------------------------------------------------------------------------- schedules
def test_linear_betas_are_the_papers():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(2e-2, abs=1e-15)
    assert betas[1].item() == pytest.approx(1e-4 + (2e-2 - 1e-4) / 999, rel=1e-12)
    assert bool((betas[1:] > betas[:-1]).all())


def test_alphas_cumprod_hand_values():
    ac = alphas_cumprod_from_betas(make_betas())
    assert ac.dtype == torch.float64
    assert ac[0].item() == pytest.approx(1 - 1e-4, rel=1e-14)
    beta_1 = 1e-4 + 0.0199 / 999
    assert ac[1].item() == pytest.approx((1 - 1e-4) * (1 - beta_1), rel=1e-14)
    # Ho et al.: a_bar_T is ~4e-5 for the linear schedule (x_T is essentially pure noise)
    assert ac[-1].item() == pytest.approx(math.prod(1 - (1e-4 + i * 0.0199 / 999) for i in range(1000)), rel=1e-10)
    assert ac[-1].item() < 1e-4


def test_cosine_betas_match_diffusers_and_formula():
    betas = make_betas("cosine", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(betas, ref, atol=1e-7, rtol=0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal Eq. 17
    assert betas[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
    assert betas.max().item() == pytest.approx(0.999)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="T must be"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        alphas_cumprod_from_betas(torch.tensor([0.5, 1.0]))


# ---------------------------------------------------------------------------------------------------- SNR
def test_snr_hand_values():
    ac = _ac_with_snrs([4.0, 0.5, 10.0])
    torch.testing.assert_close(snr(ac, torch.tensor([0, 1, 2])), torch.tensor([4.0, 0.5, 10.0], dtype=torch.float64))


def test_min_snr_weight_hand_values():
    ac = _ac_with_snrs([4.0, 0.5, 10.0])
    t = torch.tensor([0, 1, 2, 2])
    w = min_snr_weight(ac, t, gamma=5.0, objective="epsilon")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.5, 0.5]))
    torch.testing.assert_close(min_snr_weight(ac, t, 5.0, "x0"), torch.tensor([4.0, 0.5, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(ac, t, 5.0, "v"), torch.tensor([4 / 5, 0.5 / 1.5, 5 / 11, 5 / 11]))
    with pytest.raises(ValueError, match="unknown objective"):
        min_snr_weight(ac, t, 5.0, "noise")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(ac, t, 0.0)


# ---------------------------------------------------------------------------------------------------- Eq. 4 / 24
def test_q_sample_hand_values():
    ac = torch.tensor([0.64, 0.25], dtype=torch.float64)
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.full((2, 1, 2, 2), 2.0)
    xt = q_sample(x0, torch.tensor([0, 1]), noise, ac)
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt[0], torch.full((1, 2, 2), 0.8 * 1 + 0.6 * 2))
    torch.testing.assert_close(xt[1], torch.full((1, 2, 2), 0.5 * 1 + math.sqrt(0.75) * 2))
    torch.testing.assert_close(q_sample(x0, 1, noise, ac), torch.full((2, 1, 2, 2), 0.5 + math.sqrt(0.75) * 2))
    with pytest.raises(ValueError, match="shape"):
        q_sample(x0, torch.tensor([0, 1, 1]), noise, ac)


def test_eps_from_x0_uses_eq24_constants():
    # a_bar = 0.25: a_t = 1/sqrt(0.25) = 2, b_t = sqrt(1/0.25 - 1) = sqrt(3)
    ac = torch.tensor([0.25], dtype=torch.float64)
    xt = torch.full((1, 1, 1, 1), 1.0, dtype=torch.float64)
    x0 = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    eps = eps_from_x0(xt, torch.tensor([0]), x0, ac)
    assert eps.item() == pytest.approx((2 * 1.0 - 0.5) / math.sqrt(3), rel=1e-14)
    assert x0_from_eps(xt, torch.tensor([0]), eps, ac).item() == pytest.approx(0.5, rel=1e-14)


def test_x0_eps_round_trip_through_q_sample():
    g = torch.Generator().manual_seed(0)
    ac = alphas_cumprod_from_betas(make_betas())
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = q_sample(x0, t, eps, ac)
    torch.testing.assert_close(eps_from_x0(xt, t, x0, ac), eps, atol=1e-9, rtol=0)
    torch.testing.assert_close(x0_from_eps(xt, t, eps, ac), x0, atol=1e-9, rtol=0)
    x0_hat = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(x0_from_eps(xt, t, eps_from_x0(xt, t, x0_hat, ac), ac), x0_hat, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------- index space
def test_indices_to_unit_hand_values():
    z = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).view(1, 1, 2, 2)
    u = indices_to_unit(z, 4)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u.flatten(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


@pytest.mark.parametrize("K", [2, 7, 256, 4096])
def test_index_round_trip_all_k(K):
    dtype = torch.uint8 if K <= 256 else torch.int64
    z = torch.arange(K).to(dtype).view(1, 1, 1, K)
    u = indices_to_unit(z, K)
    assert float(u.min()) == -1.0 and float(u.max()) == 1.0
    back = unit_to_indices(u, K)
    assert back.dtype == torch.int64
    assert torch.equal(back, z.long())
    # perturbations below half a step still round to the same index
    step = 2.0 / (K - 1)
    assert torch.equal(unit_to_indices(u + 0.4 * step, K), z.long())
    assert torch.equal(unit_to_indices(u - 0.4 * step, K), z.long())


def test_unit_to_indices_clamps_out_of_range():
    x = torch.tensor([-3.0, -1.2, 1.05, 7.0, 0.0])
    torch.testing.assert_close(unit_to_indices(x, 5), torch.tensor([0, 0, 4, 4, 2]))
    with pytest.raises(ValueError, match="K must be"):
        unit_to_indices(x, 1)
    with pytest.raises(ValueError, match="integer"):
        indices_to_unit(x, 5)


# ---------------------------------------------------------------------------------------------------- timesteps
def test_ddim_timesteps_full_and_strided():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = ddim_timesteps(1000, 50)
    assert ts == [999 - 20 * k for k in range(50)]
    assert len(set(ts)) == 50 and all(a > b for a, b in zip(ts, ts[1:]))
    # the 13-step example of diffusers issue #9261 (trailing spacing)
    assert ddim_timesteps(1000, 13) == [999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76]
    assert ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError, match="cannot take S=1001 steps with T=1000 timesteps"):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="S=0"):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("T", [1000, 100, 37])
def test_trailing_timesteps_valid_for_every_S(T):
    for S in range(1, T + 1):
        ts = trailing_timesteps(T, S)
        if T < 1000 or S % 97 == 0:  # exact reference: Python's round of a Fraction is half-to-even
            assert ts == [round(Fraction((S - k) * T, S)) - 1 for k in range(S)], S
        assert len(ts) == S and ts[0] == T - 1 and ts[-1] >= 0, S
        assert all(a > b for a, b in zip(ts, ts[1:])), S


def test_scheduler_visits_ddim_timesteps_and_matches_diffusers_where_it_is_exact():
    ours = make_scheduler("ddim")
    plain = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for S in (1, 2, 4, 5, 8, 10, 13, 20, 25, 50, 100, 250, 1000):  # diffusers' float arange is exact here
        ours.set_timesteps(S)
        plain.set_timesteps(S)
        assert ours.timesteps.tolist() == ddim_timesteps(1000, S) == plain.timesteps.tolist(), S
    # S = 61: diffusers 0.42 returns 62 steps ending at t = -1; ours visits 61 valid steps
    ours.set_timesteps(61)
    assert len(ours.timesteps) == 61 and int(ours.timesteps.min()) >= 0
    ddpm = make_scheduler("ddpm")
    ddpm.set_timesteps(1000)
    assert ddpm.timesteps.tolist() == list(range(999, -1, -1))
    ddpm.set_timesteps(61)
    assert ddpm.timesteps.tolist() == ddim_timesteps(1000, 61)
    assert int(ddpm.previous_timestep(ddpm.timesteps[0])) == ddim_timesteps(1000, 61)[1]


def test_make_scheduler_configuration():
    ddim = make_scheduler("ddim")
    ddpm = make_scheduler("ddpm", prediction_type="sample")
    assert isinstance(ddim, DDIMScheduler) and isinstance(ddpm, DDPMScheduler)
    for s in (ddim, ddpm):
        assert s.config.clip_sample is True and s.config.clip_sample_range == 1.0
        assert s.config.num_train_timesteps == 1000 and s.config.timestep_spacing == "trailing"
        torch.testing.assert_close(s.alphas_cumprod.double(), alphas_cumprod_from_betas(make_betas()), atol=1e-6, rtol=0)
    assert ddim.config.set_alpha_to_one is True
    assert ddpm.config.prediction_type == "sample" and ddpm.config.variance_type == "fixed_small"
    cos = make_scheduler("ddim", schedule="cosine")
    torch.testing.assert_close(cos.betas.double(), make_betas("cosine"), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        make_scheduler("ddim", prediction_type="x0")
    with pytest.raises(ValueError, match="unknown schedule"):
        make_scheduler("ddim", schedule="sigmoid")


def test_ddim_last_step_returns_clipped_x0_estimate():
    s = make_scheduler("ddim")
    s.set_timesteps(50)
    ac = alphas_cumprod_from_betas(make_betas())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    t_last = int(s.timesteps[-1])
    assert t_last == 19
    out = s.step(eps, t_last, x, eta=0.0)
    expected = x0_from_eps(x, t_last, eps, ac).clamp(-1, 1)
    torch.testing.assert_close(out.prev_sample, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_image_generators_make_step_noise_batch_invariant(sampler):
    """Batch of 4 with generators seeded 0..3 == the same images stepped one at a time (diffusers randn_tensor)."""
    s = make_scheduler(sampler)
    s.set_timesteps(1000 if sampler == "ddpm" else 50)
    t = int(s.timesteps[1])
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, 2, 4, 4, generator=g)
    eps = torch.randn(4, 2, 4, 4, generator=g)
    kw = {} if sampler == "ddpm" else {"eta": 1.0}
    batch = s.step(eps, t, x, generator=[torch.Generator().manual_seed(b) for b in range(4)], **kw).prev_sample
    single = torch.cat([
        s.step(eps[b : b + 1], t, x[b : b + 1], generator=[torch.Generator().manual_seed(b)], **kw).prev_sample
        for b in range(4)
    ])
    torch.testing.assert_close(batch, single, atol=0, rtol=0)
    # the noise is really drawn from the generators: another seed changes the result
    other = s.step(eps, t, x, generator=[torch.Generator().manual_seed(b + 10) for b in range(4)], **kw).prev_sample
    assert not torch.allclose(batch, other)


# ---------------------------------------------------------------------------------------------------- helpers
def test_timestep_quartile():
    t = torch.tensor([0, 249, 250, 499, 500, 749, 750, 999])
    assert timestep_quartile(t, 1000).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert timestep_quartile(torch.tensor([0, 1, 2, 3, 4, 5, 6]), 7).tolist() == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="timesteps must lie"):
        timestep_quartile(torch.tensor([1000]), 1000)


def test_self_condition_input():
    x = torch.randn(2, 3, 4, 4)
    est = torch.randn(2, 3, 4, 4)
    out = self_condition_input(x, est)
    assert out.shape == (2, 6, 4, 4)
    assert torch.equal(out[:, :3], x) and torch.equal(out[:, 3:], est)
    zero = self_condition_input(x, None)
    assert torch.equal(zero[:, :3], x) and torch.equal(zero[:, 3:], torch.zeros_like(x))
    with pytest.raises(ValueError, match="shape"):
        self_condition_input(x, est[:, :2])


def test_quadratic_timesteps_by_hand():
    from mbldm.diffusion.schedule import quadratic_timesteps

    # T = 1000, S = 4: round(999 * (i / 4)^2) for i = 4..0 = 999, 562, 250, 62, 0
    assert quadratic_timesteps(1000, 4) == [999, 562, 250, 62, 0]
    ts = quadratic_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True) and len(ts) == 50
    with pytest.raises(ValueError):
        quadratic_timesteps(10, 11)


def test_quadratic_ddim_steps_to_the_next_visited_timestep():
    """One deterministic step from t to t' (the next listed timestep) is DDIM Eq. 12 with abar_t and abar_t'."""
    from mbldm.diffusion.schedule import make_scheduler, quadratic_timesteps

    sch = make_scheduler("ddim", T=1000, prediction_type="sample", spacing="quadratic")
    sch.set_timesteps(4)
    assert sch.timesteps.tolist() == quadratic_timesteps(1000, 4)
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    abar = sch.alphas_cumprod
    out = sch.step(x0, 562, x)
    eps = (x - abar[562].sqrt() * x0) / (1 - abar[562]).sqrt()
    torch.testing.assert_close(out.prev_sample, abar[250].sqrt() * x0 + (1 - abar[250]).sqrt() * eps)
    torch.testing.assert_close(sch.step(x0, 0, x).prev_sample, x0)  # the last step returns the x0 estimate
    with pytest.raises(ValueError, match="ddim only"):
        make_scheduler("ddpm", spacing="quadratic")
