"""Tests of mbldm/diffusion/sampling.py: DDPM / DDIM loops, per-image seeds, temperature, sample() output files.

A training run is made by hand (contract 6): a tiny VQ-4-4-4 codec (s = 4, c = 3, K = 16) fitted on synthetic
images, ``build_unet("tiny", ...)`` weights and a config.json, with T = 20 timesteps so DDPM runs are short.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from mbldm.codec import Codec
from mbldm.diffusion.categorical import expected_index_unit, gumbel_softmax, logits_from_model_output
from mbldm.diffusion.models import build_unet
from mbldm.diffusion.reverse_process import (
    TRAJECTORY_T,
    Trajectory,
    default_trajectory_t,
    generate_latents,
    resolve_steps,
)
from mbldm.diffusion.sampling import make_grid, sample
from mbldm.diffusion.schedule import alphas_cumprod_from_betas, make_betas, make_scheduler
from mbldm.io.images import load_image

T = 20
C, K, SIDE = 3, 16, 4  # latent (4, 4, 3), images 16 x 16
SHAPE = (SIDE, SIDE, C)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on 2 shared cores


def _synthetic_image(rng: np.random.Generator, n: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)),
                     np.sin(4 * (xx + yy))], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 10, (n, n, 3)), 0, 255).astype(np.uint8)


def _model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    out = C if variant == "continuous" else C * K
    return build_unet("tiny", 2 * C, out, SIDE).eval()


def _make_run(root, variant: str, codec: Codec):
    run = root / f"run_{variant}"
    codec.save(run / "codec")
    cfg = {"variant": variant, "preset": "tiny", "latent_shape": list(SHAPE), "num_codewords": K, "timesteps": T,
           "beta_schedule": "linear", "self_condition": True, "tau": 1.0, "min_snr_gamma": 5.0, "seed": 0,
           "latents": "none"}
    (run / "config.json").write_text(json.dumps(cfg))
    _model(variant).save_pretrained(run / "model", safe_serialization=True)
    return run


@pytest.fixture(scope="module")
def codec():
    rng = np.random.default_rng(0)
    return Codec.fit([_synthetic_image(rng) for _ in range(3)], spec="VQ-4-4-4", patch_size=4, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, codec):
    root = tmp_path_factory.mktemp("runs")
    return {v: _make_run(root, v, codec) for v in ("continuous", "categorical")}


def _alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod_from_betas(make_betas("linear", T))  # (T,) float64


def _initial_noise(seed: int) -> torch.Tensor:
    """x_T of one image: the first draw of its own generator, (1, c, h, w)."""
    return torch.randn((1, C, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))


def _to_indices(x: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) unit values -> (B, h, w, c) indices, written out here: round((x + 1) (K - 1) / 2), clamped."""
    return torch.round((x.double() + 1) * (K - 1) / 2).clamp(0, K - 1).long().permute(0, 2, 3, 1)


@torch.no_grad()
def _reference_ddim(model, seeds, x0_from_output) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12, eta = 0) over all T steps, written without diffusers.

    ``x0_from_output(out, x, abar_t, gens) -> (x0, eps or None, self-conditioning estimate or None)``;
    x0 = clip(x0, -1, 1); eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) for x0 models (Eq. 24) or the model
    output for eps models; x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps, abar_{-1} = 1.
    """
    abar = _alphas_cumprod()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, C, SIDE, SIDE), generator=g) for g in gens]).double()  # (B, c, h, w)
    x0_prev = torch.zeros_like(x)
    for k in range(T - 1, -1, -1):
        out = model(torch.cat([x, x0_prev], 1).float(), torch.full((len(seeds),), k)).sample.double()
        a, a_prev = abar[k], (abar[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64))
        x0, eps, cond = x0_from_output(out, x, a, gens)
        x0 = x0.clamp(-1, 1)
        if eps is None:
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        x0_prev = x0 if cond is None else cond.double()
    return _to_indices(x)


def test_ddim_with_all_T_steps_matches_reference_equations():
    model = _model("continuous")
    z = generate_latents(model, make_scheduler("ddim", T=T), [3, 4], SHAPE, K, variant="continuous",
                         self_condition=True, steps=T, eta=0.0)
    assert z.shape == (2, SIDE, SIDE, C) and z.dtype == torch.long
    ref = _reference_ddim(model, [3, 4], lambda out, x, a, gens: ((x - (1 - a).sqrt() * out) / a.sqrt(), out, None))
    assert torch.equal(z, ref)
    assert int(z.min()) >= 0 and int(z.max()) <= K - 1


def test_more_ddim_steps_than_T_is_refused(runs, tmp_path):
    model = _model("continuous")
    with pytest.raises(ValueError, match=r"S=21"):
        generate_latents(model, make_scheduler("ddim", T=T), [0], SHAPE, K, self_condition=True, steps=T + 1)
    with pytest.raises(ValueError, match=r"1 <= S <= T=20"):
        sample(runs["continuous"], 1, tmp_path / "o", steps=T + 1, progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="ddpm sampler runs all T=20 steps"):
        resolve_steps("ddpm", 10, T)
    assert resolve_steps("ddpm", None, T) == T and resolve_steps("ddim", None, T) == T
    assert resolve_steps("ddim", None, 1000) == 50
    with pytest.raises(ValueError, match="eta=0.5 applies to the ddim sampler only"):
        generate_latents(model, make_scheduler("ddpm", T=T), [0], SHAPE, K, self_condition=True, eta=0.5)


@pytest.mark.parametrize("variant,sampler", [("continuous", "ddpm"), ("categorical", "ddpm"), ("continuous", "ddim")])
def test_images_depend_on_their_seed_only_not_on_batch_size(variant, sampler):
    """DDPM / DDIM eta = 1 (noise at every step) and, for the categorical model, temperature sampling and
    self-conditioning Gumbel noise at every step."""
    model = _model(variant)
    sched = make_scheduler(sampler, T=T, prediction_type="epsilon" if variant == "continuous" else "sample")
    kw = dict(variant=variant, self_condition=True)
    if sampler == "ddim":
        kw.update(steps=8, eta=1.0)
    together = generate_latents(model, sched, [10, 11, 12], SHAPE, K, **kw)
    alone = torch.cat([generate_latents(model, sched, [s], SHAPE, K, **kw) for s in (10, 11, 12)])
    assert torch.equal(together, alone)
    swapped = generate_latents(model, sched, [12, 10], SHAPE, K, **kw)
    assert torch.equal(swapped, together[[2, 0]])
    assert not torch.equal(together[0], together[1])  # different seeds give different images


def test_temperature_zero_is_the_argmax_path_and_deterministic():
    model = _model("categorical")
    sched = make_scheduler("ddim", T=T, prediction_type="sample")
    kw = dict(variant="categorical", self_condition=True, steps=T, eta=0.0)
    z0 = generate_latents(model, sched, [7, 8], SHAPE, K, temperature=0.0, **kw)

    def argmax_x0(out, x, a, gens):  # Eq. 25 with gamma -> 0: the mode of each categorical distribution
        logits = logits_from_model_output(out.float(), C, K)  # (B, c, K, h, w)
        idx = logits.argmax(dim=2)  # (B, c, h, w)
        # self-conditioning as in training: expected index under Gumbel-softmax weights, tau = 1 (Eq. 20)
        return idx.double() * 2 / (K - 1) - 1, None, expected_index_unit(gumbel_softmax(logits, 1.0, gens), K)

    assert torch.equal(z0, _reference_ddim(model, [7, 8], argmax_x0))
    assert torch.equal(z0, generate_latents(model, sched, [7, 8], SHAPE, K, temperature=0.0, **kw))
    hot = generate_latents(model, sched, [7, 8], SHAPE, K, temperature=5.0, **kw)
    assert not torch.equal(hot, z0)  # a high temperature samples other indices


def test_temperature_is_refused_for_continuous_models():
    with pytest.raises(ValueError, match="categorical"):
        generate_latents(_model("continuous"), make_scheduler("ddim", T=T), [0], SHAPE, K, self_condition=True,
                         temperature=0.5)


def test_trajectory_records_noise_estimates_and_final_sample():
    model = _model("continuous")
    rec = Trajectory(t=[20, 11, 0])
    z = generate_latents(model, make_scheduler("ddpm", T=T), [5], SHAPE, K, self_condition=True, trajectory=rec)
    assert rec.recorded_t == [20, 11, 0]
    assert rec.x_t.shape == (1, 3, SIDE, SIDE, C)
    assert torch.equal(rec.x_t[:, 0], _to_indices(_initial_noise(5)))  # x_T is the initial noise
    assert torch.equal(rec.x_t[:, 2], z) and torch.equal(rec.x0[:, 2], z)
    # DDIM with 4 steps visits t = 20, 15, 10, 5 (and 0): 11 snaps to 10, 13 to 15.
    assert Trajectory(t=[11, 13, 0]).snapped([20, 15, 10, 5, 0]) == [15, 10, 0]
    with pytest.raises(ValueError, match=r"\[0, 20\]"):
        Trajectory(t=[21]).snapped([20, 10, 0])
    assert default_trajectory_t(1000) == list(TRAJECTORY_T) == list(range(1000, -1, -100))  # Fig. 7
    assert default_trajectory_t(20) == [20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0]


def test_make_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    g = make_grid(imgs, padding=1, pad_value=0)  # ceil(sqrt(5)) = 3 per row, 2 rows
    assert g.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    assert (g[1:3, 1:4] == 10).all() and (g[1:3, 9:12] == 30).all() and (g[4:6, 1:4] == 40).all()
    assert (g[4:6, 9:12] == 0).all()  # the empty sixth cell
    assert (g[0] == 0).all() and (g[:, 4] == 0).all()
    with pytest.raises(ValueError):
        make_grid(np.zeros((0, 2, 2, 3), np.uint8))


def test_sample_writes_pngs_grid_summary_and_refuses_to_overwrite(runs, codec, tmp_path):
    out = tmp_path / "samples"
    res = sample(runs["categorical"], 5, out, sampler="ddim", steps=5, seed=100, batch_size=2, temperature=0.5,
                 progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png"] + [f"img_{i:06d}.png" for i in range(5)] + ["samples.json"]
    imgs = np.stack([load_image(out / f"img_{i:06d}.png") for i in range(5)])
    assert imgs.shape == (5, 16, 16, 3)
    assert np.array_equal(imgs, codec.decode(res["latents"]))  # PNGs are the codec's decodes of the latents
    # each image is the in-memory latent of its own seed (batch 2 in sample(), batch 1 here)
    direct = generate_latents(_model("categorical"), make_scheduler("ddim", T=T, prediction_type="sample"), [103],
                              SHAPE, K, variant="categorical", self_condition=True, steps=5, temperature=0.5)
    assert np.array_equal(res["latents"][3], direct[0].numpy())
    grid = load_image(out / "grid.png")
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert np.array_equal(grid[2 + 18:2 + 18 + 16, 2:18], imgs[3])  # 4th image: 2nd row, 1st column
    summary = json.loads((out / "samples.json").read_text())
    assert summary["count"] == 5 and summary["steps"] == 5 and summary["temperature"] == 0.5
    assert summary["variant"] == "categorical" and summary["indices"] == [0, 1, 2, 3, 4]

    with pytest.raises(FileExistsError, match="not empty"):
        sample(runs["categorical"], 5, out, steps=5, seed=1, progress=False)
    assert np.array_equal(load_image(out / "img_000000.png"), imgs[0])  # untouched

    # a shard: indices 1 and 3 of the same job give the same images as the full run
    shard = sample(runs["categorical"], 5, tmp_path / "shard", steps=5, seed=100, temperature=0.5, indices=[3, 1],
                   progress=False)
    assert sorted(p.name for p in (tmp_path / "shard").glob("img_*")) == ["img_000001.png", "img_000003.png"]
    assert np.array_equal(shard["latents"], res["latents"][[3, 1]])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        sample(runs["categorical"], 5, None, steps=5, indices=[5], progress=False)


def test_sample_in_memory_and_overwrite(runs, tmp_path):
    mem = sample(runs["continuous"], 3, None, steps=4, seed=0, batch_size=3, progress=False)
    assert mem["images"].shape == (3, 16, 16, 3) and mem["images"].dtype == np.uint8
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    res = sample(runs["continuous"], 3, out, steps=4, seed=0, batch_size=1, overwrite=True, progress=False)
    assert np.array_equal(res["latents"], mem["latents"])
    assert math.isfinite(res["summary"]["seconds"])


def test_load_errors_name_the_problem(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sample(tmp_path / "nope", 1, None, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(runs["continuous"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["variant"] = "categorical"  # the model has c outputs, not c*K
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="3 outputs|-> 3 channels"):
        sample(broken, 1, None, progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        sample(runs["continuous"], 1, None, use_ema=False, progress=False)


def test_cuda_device_without_cuda_is_a_value_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", torch.device("cuda:0")):  # checked before the run is loaded
        with pytest.raises(ValueError, match=r"CUDA is not available in this torch build/machine \(torch "):
            sample(tmp_path / "nope", 1, None, device=device, progress=False)
    with pytest.raises(FileNotFoundError):  # a CPU device passes the check
        sample(tmp_path / "nope", 1, None, device="cpu", progress=False)


def test_cli_sample(runs, tmp_path, capsys):
    from mbldm.cli import main

    out = tmp_path / "cli"
    assert main(["sample", "--run", str(runs["continuous"]), "--num", "2", "--out", str(out), "--steps", "3",
                 "--quiet", "--trajectory", "20,10,0"]) == 0
    assert (out / "img_000001.png").is_file() and (out / "trajectory" / "img_000001_x0.png").is_file()
    strip = load_image(out / "trajectory" / "img_000000_xt.png")
    assert strip.shape == (16 + 4, 3 * 18 + 2, 3)  # 3 frames: DDIM S=3 visits t = 20, 13, 7, 0; 10 snaps to 13
    # --trajectory without a value: T, 0.9 T, ..., 0 snapped to the DDIM times 20, 13, 7, 0 -> 4 frames
    assert main(["sample", "--run", str(runs["continuous"]), "--num", "1", "--out", str(out), "--steps", "3",
                 "--quiet", "--trajectory", "--overwrite"]) == 0
    assert load_image(out / "trajectory" / "img_000000_x0.png").shape == (16 + 4, 4 * 18 + 2, 3)
    assert main(["sample", "--run", str(runs["continuous"]), "--num", "2", "--out", str(tmp_path / "x"),
                 "--steps", "21", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "S=21" in err[0]


def test_sample_applies_a_refiner_after_decoding(runs, tmp_path):
    """A hand-made refiner whose residual is the constant +0.1 (x 127.5 = +12.75 grey levels) in [-1, 1] space."""
    R = tmp_path / "refiner"
    torch.manual_seed(0)
    unet = build_unet("refiner", 3, 3, 16)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.constant_(unet.conv_out.bias, 0.1)
    unet.save_pretrained(R / "model", safe_serialization=True)
    (R / "config.json").write_text(json.dumps({"format": "mbldm-refiner", "version": 1}))

    res = sample(runs["continuous"], 2, tmp_path / "o", steps=2, refiner=R, progress=False)
    raw = np.stack([load_image(tmp_path / "o" / "raw" / f"img_{i:06d}.png") for i in range(2)])
    refined = np.stack([load_image(tmp_path / "o" / f"img_{i:06d}.png") for i in range(2)])
    assert np.array_equal(refined, np.minimum(raw.astype(int) + 13, 255))  # round(x + 12.75), clipped
    assert res["summary"]["refiner"] == str(R.resolve())


def _make_logistic_run(root, codec: Codec, mixtures: int = 2):
    """A version-2 categorical run with the logistic-mixture head (c * 3L outputs)."""
    run = root / "run_logistic"
    codec.save(run / "codec")
    cfg = {"variant": "categorical", "preset": "tiny", "latent_shape": list(SHAPE), "num_codewords": K,
           "timesteps": T, "beta_schedule": "linear", "self_condition": True, "tau": 1.0, "min_snr_gamma": 5.0,
           "seed": 0, "latents": "none", "version": 2, "head": "logistic", "mixtures": mixtures,
           "precondition": "none", "nll_weight": 1.0, "eq24_weight": 0.0, "self_condition_estimate": "mean",
           "codebook_sizes": [K] * C}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    build_unet("tiny", 2 * C, C * 3 * mixtures, SIDE).eval().save_pretrained(run / "model", safe_serialization=True)
    return run


def test_version2_logistic_run_defaults_and_soft_decode(codec, runs, tmp_path):
    from mbldm.diffusion.reverse_process import FinalDistribution
    from mbldm.diffusion.run_loading import load_run

    run = _make_logistic_run(tmp_path, codec)
    res = sample(run, 3, tmp_path / "hard", steps=6, seed=7, batch_size=3, progress=False)
    s = res["summary"]
    assert (s["temperature"], s["estimate"], s["spacing"], s["decode"]) == (0.0, "mean", "quadratic", "hard")
    soft = sample(run, 3, None, steps=6, seed=7, batch_size=3, decode="soft", progress=False)
    assert np.array_equal(soft["latents"], res["latents"])  # the same reverse process; only the decode differs
    # the soft images are E[D(z0)] under the last step's distribution, recomputed here through generate_latents
    loaded = load_run(run)
    final = FinalDistribution()
    z = generate_latents(loaded.model, make_scheduler("ddim", T=T, prediction_type="sample", spacing="quadratic"),
                         [7, 8, 9], SHAPE, K, self_condition=True, steps=6, temperature=0.0, estimate="mean",
                         parameterization=loaded.parameterization, self_condition_estimate="mean",
                         alphas_cumprod=_alphas_cumprod(), final=final)
    assert np.array_equal(z.numpy(), res["latents"])
    torch.testing.assert_close(final.probabilities.sum(2), torch.ones(3, C, SIDE, SIDE), rtol=0, atol=1e-5)
    expected = codec.decode_soft(final.probabilities).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(soft["images"], expected)
    assert not np.array_equal(soft["images"], res["images"] if "images" in res else codec.decode(res["latents"]))
    with pytest.raises(ValueError, match="categorical runs only"):
        sample(runs["continuous"], 1, None, steps=2, decode="soft", progress=False)
    with pytest.raises(ValueError, match="categorical runs only"):
        sample(runs["continuous"], 1, None, steps=2, temperature=1.0, progress=False)  # issue 11: not silently ok
