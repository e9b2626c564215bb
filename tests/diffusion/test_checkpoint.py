"""Tests of mbldm/diffusion/checkpoint.py: round trip of the full resume state, atomicity, pruning, RNG."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from mbldm.diffusion import checkpoint as ckpt


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)
        self.register_buffer("count", torch.tensor([7.0]))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _trained(seed: int = 0, steps: int = 3):
    """(model, optimizer, scheduler, ema) after ``steps`` AdamW steps on random data."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=5)
    ema = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, power=0.75)
    for _ in range(steps):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.step(model.parameters())
    return model, opt, sched, ema


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(model, opt, sched, ema, x):
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    ema.step(model.parameters())


def test_round_trip_restores_everything_and_continues_identically(tmp_path):
    model, opt, sched, ema = _trained()
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, lr_scheduler=sched, ema=ema,
                                extra={"seed": 11})
    assert path == tmp_path / "step_0000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "ema.safetensors", "ema.json", "optimizer.safetensors", "optimizer.json",
         "scheduler.json", "rng.safetensors", "rng.json", "state.json"])
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and state["seed"] == 11 and state["complete"] is True

    # a fresh set of objects (other init), loaded from the checkpoint, continues exactly like the original
    model2, opt2, sched2, ema2 = _trained(seed=5, steps=1)
    loaded = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, lr_scheduler=sched2, ema=ema2)
    assert loaded["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    for s1, s2 in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(s1, s2)
    assert ema2.optimization_step == ema.optimization_step == 3
    assert sched2.last_epoch == sched.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 3 / 5)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for pid, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(opt2.state_dict()["state"][pid][name], value), (pid, name)

    x = torch.randn(8, 3)
    _train_step(model, opt, sched, ema, x)
    _train_step(model2, opt2, sched2, ema2, x)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    for s1, s2 in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(s1, s2)


def test_save_does_not_change_live_weights(tmp_path):
    model, opt, sched, ema = _trained()
    before = _snapshot(model)
    ema_before = [s.clone() for s in ema.shadow_params]
    opt_before = {pid: {k: v.clone() for k, v in e.items()} for pid, e in opt.state_dict()["state"].items()}
    ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, lr_scheduler=sched, ema=ema)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, ema_before))
    for pid, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(v, opt_before[pid][k]) for k, v in entry.items())
    assert all(p.requires_grad for p in model.parameters())


def test_keep_prunes_oldest_and_latest_is_highest_step(tmp_path):
    model, opt, sched, ema = _trained(steps=1)
    for step in (1, 2, 10, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, lr_scheduler=sched, ema=ema, keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 10]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000010"
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_failed_save_leaves_no_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    model, opt, sched, ema = _trained(steps=1)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, lr_scheduler=sched, ema=ema)
    real = ckpt._write_json

    def failing(path, obj):
        if path.name == "state.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, lr_scheduler=sched, ema=ema)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000001"


def test_folder_without_state_json_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_0000009").mkdir()
    (tmp_path / ".tmp-step_0000010-x").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="state.json"):
        ckpt.read_checkpoint_state(tmp_path / "step_0000009")


def test_load_into_other_architecture_names_the_file(tmp_path):
    model, opt, sched, ema = _trained(steps=1)
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, lr_scheduler=sched, ema=ema)
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="model.safetensors"):
        ckpt.load_checkpoint(path, model=other, optimizer=other_opt, lr_scheduler=get_scheduler("constant", other_opt))


def test_optimizer_flattening_round_trip():
    model, opt, _, _ = _trained(steps=2)
    sd = opt.state_dict()
    tensors, meta = ckpt.optimizer_state_to_flat(sd)
    assert set(tensors) == {f"state.{pid}.{n}" for pid in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}
    json.dumps(meta)
    back = ckpt.optimizer_state_from_flat(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == sd["param_groups"]
    assert torch.equal(back["state"][2]["exp_avg_sq"], sd["state"][2]["exp_avg_sq"])


def test_rng_capture_restore():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    tensors, meta = ckpt.capture_rng_state()
    json.dumps(meta)
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(tensors, json.loads(json.dumps(meta)))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
