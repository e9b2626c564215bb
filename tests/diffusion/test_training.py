"""Tests of mbldm/diffusion/training.py and `mbldm train` on a tiny real latent store (faces, VQ-4-4-4, CPU).

Resuming gives the same weights, EMA and optimizer state as not stopping; saving never changes the live
weights; a non-finite loss stops the run without a checkpoint; metrics.jsonl and config.json follow contract 6;
the categorical variant trains, saves and resumes.
"""
from __future__ import annotations

import os
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mbldm.cli import main
from mbldm.diffusion import losses, training
from mbldm.diffusion.batch_stream import global_batch_indices
from mbldm.diffusion.train_config import VERSION1_VALUES, TrainConfig, resolve_config
from mbldm.diffusion.training import train

FACES = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
             or Path(__file__).resolve().parents[2].parent / "shared" / "data") / "faces"
R = 32  # patch size 4 -> latents 8 x 8 x 3, K = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on 2 shared cores


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A complete latent store of 12 real faces (32 x 32) encoded with a tiny VQ-4-4-4 codec (s = 4)."""
    if not FACES.is_dir():
        pytest.skip(f"real face images not found at {FACES} (see MBLDM_TEST_DATA in README)")
    from PIL import Image

    from mbldm.codec import Codec
    from mbldm.data.latent_store import build_latent_store

    root = tmp_path_factory.mktemp("train_store")
    files = sorted(FACES.glob("face_*.jpg"))[:12]
    (root / "data").mkdir()
    for f in files:
        shutil.copyfile(f, root / "data" / f.name)
    images = [np.asarray(Image.open(f).convert("RGB").resize((R, R))) for f in files[:4]]
    Codec.fit(images, spec="VQ-4-4-4", patch_size=4, max_patches=4000, progress=False).save(root / "codec")
    return build_latent_store(root / "codec", root / "data", R, root / "store", shard_size=5, progress=False)


def _config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(latents=str(store), out=str(out), steps=20, preset="tiny", batch_size=4, lr=1e-3,
                lr_warmup_steps=3, checkpoint_every=10, log_every=5, progress=False, ema_decay=0.99)
    return TrainConfig(**{**base, **kw})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_checkpoint(a: Path, b: Path, atol: float = 1e-6) -> None:
    for name in ("model", "ema", "optimizer"):
        ta, tb = _tensors(a / f"{name}.safetensors"), _tensors(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=f"{name}: {k}")
    for name in ("ema.json", "optimizer.json", "scheduler.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.fixture(scope="module")
def straight_run(store, tmp_path_factory) -> Path:
    """20 continuous steps without stopping (checkpoints at 10 and 20)."""
    return train(_config(store, tmp_path_factory.mktemp("straight") / "run"))


def test_resume_equals_uninterrupted_run(store, straight_run, tmp_path):
    run = tmp_path / "run"
    common = ["--latents", str(store), "--out", str(run), "--preset", "tiny", "--batch-size", "4", "--lr", "1e-3",
              "--lr-warmup-steps", "3", "--checkpoint-every", "10", "--log-every", "5", "--ema-decay", "0.99",
              "--no-progress"]
    assert main(["train", *common, "--steps", "10"]) == 0
    # resume through the CLI: only --steps changes; the rest comes from RUN/config.json
    assert main(["train", "--out", str(run), "--resume", "latest", "--steps", "20", "--no-progress"]) == 0
    _assert_same_checkpoint(straight_run / "checkpoints" / "step_0000020", run / "checkpoints" / "step_0000020")
    # the exported EMA model is the same, and it holds the EMA weights of the last checkpoint
    exported = _tensors(run / "model" / "diffusion_pytorch_model.safetensors")
    ema = _tensors(run / "checkpoints" / "step_0000020" / "ema.safetensors")
    straight = _tensors(straight_run / "model" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() == straight.keys()
    for k in ema:
        assert torch.equal(exported[k], ema[k]), k
        torch.testing.assert_close(exported[k], straight[k], rtol=0, atol=1e-6)
    raw = _tensors(run / "checkpoints" / "step_0000020" / "model.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # EMA differs from the raw weights
    # the logged losses agree step for step
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(s) for s in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [5, 10, 15, 20]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-5)


def test_metrics_and_config_follow_the_contract(straight_run):
    rows = [json.loads(s) for s in (straight_run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "steps_per_s"} <= row.keys()
        assert np.isfinite(row["loss"]) and row["steps_per_s"] > 0
        quartiles = [row[f"loss_q{k}"] for k in range(4) if row[f"loss_q{k}"] is not None]
        assert min(quartiles) <= row["loss"] <= max(quartiles)  # the mean lies between the group means
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warm-up of 3 steps is over by step 5
    cfg = json.loads((straight_run / "config.json").read_text())
    assert cfg["variant"] == "continuous" and cfg["preset"] == "tiny"
    assert cfg["latent_shape"] == [8, 8, 3] and cfg["num_codewords"] == 16
    assert cfg["timesteps"] == 1000 and cfg["beta_schedule"] == "linear" and cfg["self_condition"] is True
    assert cfg["tau"] == 1.0 and cfg["min_snr_gamma"] == 5.0 and cfg["seed"] == 0
    assert cfg["in_channels"] == 6 and cfg["out_channels"] == 3
    model_cfg = json.loads((straight_run / "model" / "config.json").read_text())
    assert model_cfg["in_channels"] == 6 and model_cfg["out_channels"] == 3 and model_cfg["sample_size"] == 8
    assert (straight_run / "codec" / "config.json").is_file()
    assert [p.name for p in sorted((straight_run / "checkpoints").iterdir())] == ["step_0000010", "step_0000020"]


def test_non_finite_loss_stops_without_checkpoint(store, tmp_path, monkeypatch):
    real = losses.continuous_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # the loss of step 5
            out.per_sample = out.per_sample * float("nan")
        return out

    monkeypatch.setattr(losses, "continuous_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="non-finite loss at step 5"):
        train(_config(store, run, steps=8, checkpoint_every=2))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_0000002", "step_0000004"]
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").exists() else []
    assert all(r["step"] < 5 for r in rows)


def test_max_minutes_stops_with_checkpoint_and_export(store, tmp_path):
    run = train(_config(store, tmp_path / "run", steps=50, max_minutes=1e-9, self_condition=False))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]
    assert (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((run / "model" / "config.json").read_text())["in_channels"] == 3  # no self-conditioning


def test_categorical_trains_saves_and_resumes(store, tmp_path):
    # the paper's head and objective (free logits, Eq. 24 only), as every version-1 run was trained
    cfg = dict(variant="categorical", steps=4, checkpoint_every=2, log_every=2, tau=1.0, **VERSION1_VALUES)
    straight = train(_config(store, tmp_path / "a", **cfg))
    resumed = tmp_path / "b"
    train(_config(store, resumed, **{**cfg, "steps": 2}))
    train(_config(store, resumed, **{**cfg, "resume": "latest"}))
    _assert_same_checkpoint(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    rows = [json.loads(s) for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_img"] + r["loss_eps"], rel=1e-5)
    cfg_json = json.loads((resumed / "config.json").read_text())
    assert cfg_json["variant"] == "categorical" and cfg_json["out_channels"] == 3 * 16
    assert json.loads((resumed / "model" / "config.json").read_text())["out_channels"] == 48


def test_categorical_logistic_head_default_trains_and_resumes(store, tmp_path):
    """The default categorical run: logistic-mixture head (c * 3L outputs), NLL only, no preconditioning."""
    cfg = dict(variant="categorical", steps=4, checkpoint_every=2, log_every=2)
    straight = train(_config(store, tmp_path / "a", **cfg))
    resumed = tmp_path / "b"
    train(_config(store, resumed, **{**cfg, "steps": 2}))
    train(_config(store, resumed, **{**cfg, "resume": "latest"}))
    _assert_same_checkpoint(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    rows = [json.loads(s) for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_nll"], rel=1e-5) and r["loss_img"] == r["loss_eps"] == 0
        assert 0 < r["loss_nll"] < np.log(16) + 1  # nats per index of a 16-entry codebook, near uniform at first
    cfg_json = json.loads((resumed / "config.json").read_text())
    assert cfg_json["head"] == "logistic" and cfg_json["precondition"] == "none" and cfg_json["version"] == 2
    assert cfg_json["out_channels"] == 3 * 3 * cfg_json["mixtures"] and cfg_json["codebook_sizes"] == [16] * 3


def test_existing_run_needs_resume_and_shape_fields_cannot_change(store, straight_run, tmp_path):
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(_config(store, straight_run))
    flags = {"out": str(straight_run), "resume": "latest", "preset": "small"}
    with pytest.raises(ValueError, match="preset"):
        resolve_config(flags)
    with pytest.raises(ValueError, match="variant"):
        train(_config(store, straight_run, steps=20, resume="latest", variant="categorical"))


def test_resolve_config_precedence(straight_run, tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 5e-4, "batch_size": 8}))
    cfg = resolve_config({"out": str(straight_run), "resume": "latest", "config": str(cfg_file), "batch_size": 2})
    assert cfg.preset == "tiny" and cfg.steps == 20 and cfg.ema_decay == 0.99  # from RUN/config.json
    assert cfg.lr == 5e-4  # the --config file beats the run's config
    assert cfg.batch_size == 2  # explicit flags beat everything
    assert cfg.resume == "latest" and cfg.progress is True  # invocation fields are not inherited
    fresh = resolve_config({"latents": "S", "out": str(tmp_path / "new"), "steps": 3})
    assert fresh.preset == TrainConfig.preset and fresh.lr == 1e-4  # defaults
    with pytest.raises(ValueError, match="--steps is required"):
        resolve_config({"latents": "S", "out": "O"})
    cfg_file.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config({"config": str(cfg_file), "latents": "S", "out": "O", "steps": 1})


def test_batches_cover_each_epoch_and_split_across_processes():
    count, B = 10, 4
    stream = np.concatenate([global_batch_indices(7, step, B, count) for step in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a new permutation per epoch
    # process r of 2 takes positions [2r, 2r+2) of the same global batch
    for step in range(5):
        full = global_batch_indices(7, step, B, count)
        halves = [global_batch_indices(7, step, B, count, 2 * r, 2 * r + 2) for r in range(2)]
        assert np.array_equal(np.concatenate(halves), full)
    t_all, n_all = training._noise_and_timesteps(7, 3, range(0, 4), (3, 2, 2), 1000)
    t_hi, n_hi = training._noise_and_timesteps(7, 3, range(2, 4), (3, 2, 2), 1000)
    assert torch.equal(t_all[2:], t_hi) and torch.equal(n_all[2:], n_hi)
    assert training.step_seed(0, 1, 2) != training.step_seed(0, 2, 1)
