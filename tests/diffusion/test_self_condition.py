"""Self-conditioning (§4.2.1, Chen et al. 2022): the second channel block of the U-Net input is the x0 estimate.

Checked end to end through the real training loop (:func:`mbldm.diffusion.training.train`) and the real sampler
(:func:`mbldm.diffusion.sampling.generate_latents`), by recording every U-Net call (input, timestep, output) and
recomputing the estimate by hand in float64 from the recorded output:

* continuous: x0 = clip((x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), -1, 1), abar from linear betas
  1e-4 .. 0.02 written out here (Ho et al. 2020);
* categorical: z0_hat = sum_k w_k (2k / (K - 1) - 1), w = softmax((logits + G) / tau) over K (Eq. 20) with the
  Gumbel noise G = -log(-log U) replayed from the documented per-image generators (training: seed
  ``step_seed(seed, n, "gumbel", j)``; sampling: ``seed + i`` after the initial noise and, per step, the Eq. 25
  temperature draw).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mbldm.codec import Codec
from mbldm.diffusion import models
from mbldm.diffusion.batch_stream import step_seed
from mbldm.diffusion.models import build_unet
from mbldm.diffusion.reverse_process import generate_latents
from mbldm.diffusion.train_config import VERSION1_VALUES
from mbldm.diffusion.schedule import make_scheduler
from mbldm.diffusion.train_config import TrainConfig
from mbldm.diffusion.training import train

C, K, SIDE = 3, 16, 8  # VQ-4-4-4 (c = 3, K = 16), s = 4: latents 8 x 8 x 3 of 32 x 32 images
SEED = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Shared CPU cores: one intra-op thread is fastest for these tiny models. Numba too: once an earlier test
    has run a parallel ``codec.decode`` (numba's "omp" layer shares libgomp with torch), its idle worker makes
    torch's CPU ops many times slower (see tests/diffusion/test_end_to_end.py)."""
    import numba

    n, n_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    numba.set_num_threads(n_numba)


# ------------------------------------------------------------------------------------------------ hand formulas

def _abar(T: int) -> torch.Tensor:
    """(T,) float64 abar_t = prod_{s<=t} (1 - beta_s), betas evenly spaced 1e-4 .. 0.02 (the paper's schedule)."""
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def _x0_unclipped(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) in float64, per image timestep t (B,)."""
    a = abar[t.long().cpu()].view(-1, 1, 1, 1)
    return (x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()


def _gumbel(g: torch.Generator) -> torch.Tensor:
    """One image's Gumbel noise (1, c, K, h, w): G = -log(-log U), U ~ U[tiny, 1), drawn from g."""
    u = torch.rand((1, C, K, SIDE, SIDE), generator=g).clamp(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def _expected_index(logits: torch.Tensor, gumbel: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_k softmax((logits + G) / tau)_k * (2k / (K - 1) - 1): (B, c, K, h, w) -> (B, c, h, w) float64."""
    w = torch.softmax((logits.double() + gumbel.double()) / tau, dim=2)
    unit = torch.tensor([2.0 * k / (K - 1) - 1.0 for k in range(K)], dtype=torch.float64).view(1, 1, K, 1, 1)
    return (w * unit).sum(dim=2)


def _synthetic_image(rng: np.random.Generator, n: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)),
                     np.sin(4 * (xx + yy))], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 10, (n, n, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ recording

class Calls(list):
    """U-Net calls in order: dicts with x (input), t, out (output .sample), grad (grad mode), requires_grad."""

    def record(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
        self.append({"x": x.detach().clone(), "t": torch.as_tensor(t).detach().clone().expand(x.shape[0]),
                     "out": out.detach().float().clone(), "grad": torch.is_grad_enabled(),
                     "requires_grad": x.requires_grad})


class RecordingModel(torch.nn.Module):
    """Wraps a U-Net; records each call's input, timestep and output; returns the output unchanged."""

    def __init__(self, inner: torch.nn.Module, calls: Calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x, t):
        result = self.inner(x, t)
        self.calls.record(x, t, result.sample)
        return result


def _steps_of(calls: Calls, n_steps: int) -> list[list[dict]]:
    """Group training calls by step: a no-grad call (self-conditioning's first pass) + the grad call, or one call."""
    steps, i = [], 0
    while i < len(calls):
        if not calls[i]["grad"]:
            assert i + 1 < len(calls) and calls[i + 1]["grad"], "a no-grad pass must be followed by the loss pass"
            steps.append([calls[i], calls[i + 1]])
            i += 2
        else:
            steps.append([calls[i]])
            i += 1
    assert len(steps) == n_steps
    kinds = {len(s) for s in steps}
    assert kinds == {1, 2}, f"expected steps with and without self-conditioning, got call counts {kinds}"
    return steps


# ------------------------------------------------------------------------------------------------ training

class _SyntheticStore:
    """Stand-in for a LatentStore (the interface ``train(store=...)`` documents): 6 random index latents."""

    def __init__(self, codec_dir: Path):
        self.codec_dir = codec_dir
        self.latent_shape = (SIDE, SIDE, C)
        self.num_codewords = K
        self.spec = "VQ-4-4-4"
        self.resolution = 4 * SIDE
        self._z = np.random.default_rng(1).integers(0, K, (6, SIDE, SIDE, C)).astype(np.uint8)

    def __len__(self) -> int:
        return len(self._z)

    def batch(self, indices):
        return self._z[np.asarray(indices)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> _SyntheticStore:
    root = tmp_path_factory.mktemp("selfcond_codec")
    rng = np.random.default_rng(0)
    Codec.fit([_synthetic_image(rng) for _ in range(3)], spec="VQ-4-4-4", patch_size=4,
              progress=False).save(root / "codec")
    return _SyntheticStore(root / "codec")


def _train_recorded(store, out: Path, monkeypatch, **kw) -> Calls:
    """Train with a forward hook on the U-Net that ``train`` builds; return its calls."""
    calls = Calls()
    real_build = models.build_unet

    def build_and_hook(*args, **kwargs):
        net = real_build(*args, **kwargs)
        net.register_forward_hook(
            lambda mod, args, kwargs, res: calls.record(kwargs.get("sample", args[0] if args else None),
                                                        kwargs.get("timestep", args[1] if len(args) > 1 else None),
                                                        res.sample),
            with_kwargs=True)
        return net

    monkeypatch.setattr(models, "build_unet", build_and_hook)
    cfg = TrainConfig(latents="synthetic", out=str(out), preset="tiny", batch_size=3, lr=1e-3, lr_warmup_steps=0,
                      checkpoint_every=100, log_every=100, progress=False, seed=SEED, self_condition=True, **kw)
    train(cfg, store=store)
    return calls


def test_training_continuous_self_condition_is_the_clipped_x0_estimate(store, tmp_path, monkeypatch):
    steps = 6
    calls = _train_recorded(store, tmp_path / "run", monkeypatch, variant="continuous", steps=steps)
    abar = _abar(1000)
    clipped_somewhere = False
    for step in _steps_of(calls, steps):
        loss_pass = step[-1]
        assert not loss_pass["requires_grad"]  # the conditioning input carries no graph
        if len(step) == 1:  # the half of the steps without self-conditioning: zeros
            assert torch.count_nonzero(loss_pass["x"][:, C:]) == 0
            continue
        first, second = step
        z_t = first["x"][:, :C]  # (B, c, h, w)
        assert torch.count_nonzero(first["x"][:, C:]) == 0  # the first pass is conditioned on zeros
        assert torch.equal(second["x"][:, :C], z_t) and torch.equal(second["t"], first["t"])
        x0 = _x0_unclipped(z_t, first["t"], first["out"], abar)  # (B, c, h, w) float64
        clipped_somewhere |= bool((x0.abs() > 1.01).any())
        torch.testing.assert_close(second["x"][:, C:].double(), x0.clamp(-1, 1), rtol=0, atol=1e-5)
    assert clipped_somewhere  # the clip to [-1, 1] was exercised, not only the formula


def test_training_categorical_self_condition_is_the_expected_index(store, tmp_path, monkeypatch):
    steps, tau = 6, 2.2  # tau != 1 so that using the run's tau is checked
    calls = _train_recorded(store, tmp_path / "run", monkeypatch, variant="categorical", steps=steps, tau=tau,
                            **VERSION1_VALUES)  # the paper's head, as version-1 runs
    for n, step in enumerate(_steps_of(calls, steps)):
        if len(step) == 1:
            assert torch.count_nonzero(step[0]["x"][:, C:]) == 0
            continue
        first, second = step
        assert torch.count_nonzero(first["x"][:, C:]) == 0
        assert torch.equal(second["x"][:, :C], first["x"][:, :C])
        B = first["x"].shape[0]
        logits = first["out"].view(B, C, K, SIDE, SIDE)  # channel ci * K + k
        # the first draw of each image's own Gumbel generator (seed, step, "gumbel", j)
        gumbel = torch.cat([_gumbel(torch.Generator().manual_seed(step_seed(SEED, n, "gumbel", j)))
                            for j in range(B)])
        expected = _expected_index(logits, gumbel, tau)  # (B, c, h, w)
        cond = second["x"][:, C:].double()
        torch.testing.assert_close(cond, expected, rtol=0, atol=1e-5)
        assert float((cond - _expected_index(logits, gumbel, 1.0)).abs().max()) > 1e-3  # tau matters


# ------------------------------------------------------------------------------------------------ sampling

def _tiny_unet(out_channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", 2 * C, out_channels, SIDE).eval()


@pytest.mark.parametrize("sampler,T,steps", [("ddim", 1000, 8), ("ddpm", 40, None)])
def test_sampling_continuous_input_is_previous_x0_estimate(sampler, T, steps):
    calls = Calls()
    model = RecordingModel(_tiny_unet(C), calls)
    scheduler = make_scheduler(sampler, T=T)
    seeds = [5, 6]
    generate_latents(model, scheduler, seeds, (SIDE, SIDE, C), K, variant="continuous", self_condition=True,
                     steps=steps, eta=0.0)
    assert len(calls) == (steps or T)
    assert [int(c["t"][0]) for c in calls] == [int(k) for k in scheduler.timesteps]
    assert torch.count_nonzero(calls[0]["x"][:, C:]) == 0  # zeros at the first step
    x_T = torch.cat([torch.randn((1, C, SIDE, SIDE), generator=torch.Generator().manual_seed(s)) for s in seeds])
    assert torch.equal(calls[0]["x"][:, :C], x_T)
    abar = _abar(T)
    clipped_somewhere = False
    for prev, cur in zip(calls[:-1], calls[1:]):
        x0 = _x0_unclipped(prev["x"][:, :C], prev["t"], prev["out"], abar)  # (B, c, h, w) from step k
        clipped_somewhere |= bool((x0.abs() > 1.01).any())
        torch.testing.assert_close(cur["x"][:, C:].double(), x0.clamp(-1, 1), rtol=0, atol=1e-5)
    if sampler == "ddim":  # t = 999 first: 1 / sqrt(abar) ~ 156, the clip must act
        assert clipped_somewhere


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_categorical_input_is_previous_expected_index(temperature):
    calls = Calls()
    model = RecordingModel(_tiny_unet(C * K), calls)
    scheduler = make_scheduler("ddim", T=1000, prediction_type="sample")
    seeds, S, tau = [3, 4], 6, 2.2
    generate_latents(model, scheduler, seeds, (SIDE, SIDE, C), K, variant="categorical", self_condition=True,
                     steps=S, eta=0.0, temperature=temperature, tau=tau)
    assert len(calls) == S
    assert torch.count_nonzero(calls[0]["x"][:, C:]) == 0
    # replay each image's generator: initial noise, then per step [Eq. 25 draw if gamma > 0], self-cond Gumbel
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.cat([torch.randn((1, C, SIDE, SIDE), generator=g) for g in gens])
    assert torch.equal(calls[0]["x"][:, :C], x_T)
    for prev, cur in zip(calls[:-1], calls[1:]):
        if temperature > 0:
            for g in gens:
                _gumbel(g)  # the temperature sample's noise (DDIM with eta = 0 draws no scheduler noise)
        gumbel = torch.cat([_gumbel(g) for g in gens])  # (B, c, K, h, w)
        logits = prev["out"].view(len(seeds), C, K, SIDE, SIDE)
        cond = cur["x"][:, C:].double()
        torch.testing.assert_close(cond, _expected_index(logits, gumbel, tau), rtol=0, atol=1e-5)
        # it is the soft expectation, not the Eq. 25 sample fed to the scheduler (the argmax at gamma = 0)
        argmax_unit = logits.argmax(dim=2).double() * 2 / (K - 1) - 1
        assert float((cond - argmax_unit).abs().max()) > 1e-3
    assert math.isfinite(float(calls[-1]["out"].abs().max()))
