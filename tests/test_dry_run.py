"""Tests of mbldm/dry_run.py and ``mbldm train --dry-run``: every paper config dry-runs on this CPU without the
LSUN data or store; the memory accounting counts what autograd really saves; the report's arithmetic.

The per-config dry runs use ``--preset tiny`` (two steps of the "paper" U-Net take minutes on this shared 2-core
machine; the paper preset's size is checked in tests/test_configs.py), everything else from the file: the
64 x 64 x 6 latent, K = 256, the variant (the categorical one decodes 512 x 512 images through a synthetic
OPQ-32-8-8 codec), self-conditioning, min-SNR.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mbldm.cli import main
from mbldm.diffusion.models import build_unet, count_parameters
from mbldm.diffusion.train_config import VERSION1_VALUES, resolve_config
from mbldm.dry_run import (
    STATIC_BYTES_PER_PARAM,
    DryRunReport,
    LatentGeometry,
    SyntheticLatentStore,
    _SavedTensorMeter,
    dry_run,
    latent_geometry,
    synthetic_codec,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = [f"lsun_{ds}_512_{v}" for ds in ("church", "cat") for v in ("continuous", "categorical")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on 2 shared cores


@pytest.mark.parametrize("name", NAMES)
def test_config_dry_runs_without_data_or_store(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's stores/lsun_*_512 and runs/ paths do not exist here
    args = ["train", "--config", str(CONFIGS / f"{name}.json"), "--dry-run", "--preset", "tiny",
            "--dry-run-batch", "1", "--dry-run-steps", "2", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    out_channels = 6 if name.endswith("continuous") else 6 * 256
    params = count_parameters(build_unet("tiny", 12, out_channels, 64))
    assert f"12 -> {out_channels} channels, {params:,} parameters" in text
    assert "64 x 64 x 6, K = 256, OPQ-32-8-8, 512 x 512 images; 24.00 KiB per image" in text
    assert "global batch 64, 1,000,000 steps" in text and "1 step(s) after 1 warm-up" in text
    assert len([line for line in text.splitlines() if line.startswith("               ")]) == 4  # 1/2/4/8 processes
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written (no run folder, no store)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the batch-1 default applies on a CPU only")
def test_cli_dry_run_on_cpu_announces_itself_and_defaults_to_batch_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "lsun_church_512_continuous.json"
    assert main(["train", "--config", str(config), "--dry-run", "--preset", "tiny", "--dry-run-steps", "2",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "dry run: timing 2 steps (1 warm-up) at global batch 1 on cpu (Ctrl-C to stop)..."]
    lines = captured.out.splitlines()
    assert lines[0] == f"mbldm train --config {config} --dry-run"  # a command that runs
    assert "1 step(s) after 1 warm-up, global batch 1 on 1 process(es)" in captured.out
    assert ("  note         CPU default: timed at global batch 1 instead of the configuration's 64 "
            "(--dry-run-batch B to time another batch); time and memory are extrapolated per image") in lines
    assert "global batch 64, 1,000,000 steps" in captured.out  # the table still reports the configuration's batch
    assert [line.split()[:2] for line in lines if line.startswith("               ")] == [
        ["1", "64"], ["2", "32"], ["4", "16"], ["8", "8"]]


def _tiny_store(tmp_path: Path, num_images: int, seed: int) -> Path:
    """A latent store of ``num_images`` random 16x16 images under a VQ-4-4-4 codec (s = 4 -> 4x4x3 latents)."""
    from mbldm.codec import Codec
    from mbldm.data.latent_store import build_latent_store
    from mbldm.io.images import save_png

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(num_images)]
    for i, im in enumerate(images):
        save_png(tmp_path / "imgs" / f"{i}.png", im)
    Codec.fit(images, spec="VQ-4-4-4", patch_size=4, progress=False).save(tmp_path / "codec")
    return build_latent_store(tmp_path / "codec", tmp_path / "imgs", 16, tmp_path / "store", progress=False)


def test_dry_run_announces_a_larger_batch_with_the_quick_hint(tmp_path):
    store = _tiny_store(tmp_path, num_images=2, seed=1)
    cfg = resolve_config({"latents": str(store), "out": str(tmp_path / "never"), "steps": 10, "preset": "tiny",
                          "batch_size": 4})
    said = []
    report = dry_run(cfg, steps=2, batch_size=2, announce=said.append)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert said == [f"dry run: timing 2 steps (1 warm-up) at global batch 2 on {device} (Ctrl-C to stop; "
                    "--dry-run-batch 1 for a quick estimate)..."]
    assert report.batch_note is None and report.lines()[0] == "mbldm train --dry-run"


def test_dry_run_report_on_a_real_store(tmp_path):
    """With an existing store the dry run uses it (its latent shape) and times real training steps."""
    store = _tiny_store(tmp_path, num_images=3, seed=0)
    cfg = resolve_config({"latents": str(store), "out": str(tmp_path / "never"), "steps": 100, "preset": "tiny",
                          "batch_size": 4, "variant": "categorical", **VERSION1_VALUES})  # the paper's c*K head
    report = dry_run(cfg, steps=3, batch_size=2)
    assert report.geometry == LatentGeometry((4, 4, 3), 16, "VQ-4-4-4", 16, "store", "uint8")
    assert (report.in_channels, report.out_channels) == (6, 3 * 16)
    assert report.num_parameters == count_parameters(build_unet("tiny", 6, 48, 4))
    assert (report.timed_steps, report.measured_batch, report.num_processes) == (2, 2, 1)
    assert report.seconds_per_step > 0 and report.activation_bytes > 0
    assert [row["local_batch"] for row in report.table] == [4, 2, 1]  # 8 processes cannot split a batch of 4
    assert not (tmp_path / "never").exists()
    json.dumps(report.to_dict())  # JSON-ready


def test_saved_tensor_meter_counts_what_autograd_keeps():
    meter = _SavedTensorMeter()
    x, w = torch.randn(4, 8), torch.nn.Parameter(torch.randn(8, 16))
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        y = torch.relu(x @ w)  # mm keeps x (w is a parameter: not counted); relu keeps its output y
        (y * y).sum().backward()  # y * y keeps y twice: one storage, counted once
    meter.step_done()
    assert meter.per_step == [4 * 8 * 4 + 4 * 16 * 4]


def test_memory_estimate_arithmetic():
    geometry = LatentGeometry((64, 64, 6), 256, "OPQ-32-8-8", 512, "config")
    report = DryRunReport(config_file=None, latents="s", geometry=geometry, preset="p", variant="continuous",
                          in_channels=12, out_channels=6, num_parameters=1000, batch_size=8, steps=10,
                          mixed_precision="auto", mixed_precision_here="no", device="cpu", num_processes=1,
                          measured_batch=3, timed_steps=2, seconds_per_step=1.5, self_conditioned_steps=1,
                          activation_bytes=300)
    assert STATIC_BYTES_PER_PARAM == 20  # fp32 weights 4 + grads 4 + AdamW 8 + EMA 4
    assert report.memory_estimate(4) == 20 * 1000 + 100 * 4
    assert report.memory_estimate(4, num_processes=2) == 24 * 1000 + 100 * 4  # + DDP gradient buckets
    assert report.seconds_per_image == pytest.approx(0.5)


def test_latent_geometry_needs_a_store_or_a_declared_shape(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"latents": "nowhere", "out": "o", "steps": 1}))
    with pytest.raises(ValueError, match="latent_shape"):
        latent_geometry(resolve_config({"config": str(bare)}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"latents": "nowhere", "out": "o", "steps": 1, "latent_shape": [64, 64, 3],
                               "num_codewords": 256, "codec_spec": "OPQ-32-8-8", "resolution": 512}))
    with pytest.raises(ValueError, match="c=6"):
        latent_geometry(resolve_config({"config": str(bad)}))


def test_synthetic_codec_and_store_have_the_declared_shapes(tmp_path):
    codec = synthetic_codec("OPQ-32-8-8", 8)
    assert (codec.latent_channels, codec.num_codewords, codec.index_dtype) == (6, 256, np.uint8)
    z = torch.randint(0, 256, (1, 6, 2, 3))
    hard = codec.decode_torch(z)  # (1, 3, 16, 24)
    soft = codec.decode_soft(torch.nn.functional.one_hot(z, 256).permute(0, 1, 4, 2, 3).float())
    assert hard.shape == (1, 3, 16, 24)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-3)  # Eq. 21 with one-hot weights is the decode
    store = SyntheticLatentStore(LatentGeometry((4, 4, 6), 256, "OPQ-32-8-8", 32, "config"), tmp_path)
    batch = store.batch([3, 0, 3])
    assert batch.shape == (3, 4, 4, 6) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], batch[2])  # latent i depends on i only
    assert not np.array_equal(batch[0], batch[1])
