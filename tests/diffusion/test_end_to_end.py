"""End to end on CPU (issue 4): a tiny codec and latent store of real faces, then through the CLI in-process
``mbldm train`` (stopped after 3 steps and resumed to 6) and ``mbldm sample``, for both variants.

Checks: the resumed run's final raw and EMA weights equal an uninterrupted 6-step run's; ``sample`` writes
``img_*.png`` of the store's resolution that are the codec's decodes of the sampled latents; temperature 0 (and the
deterministic DDIM eta = 0 path of the continuous variant) gives the same images twice; temperature 1 other ones.
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

DATA = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
            or Path(__file__).resolve().parents[2].parent / "shared" / "data")
FACES = DATA / "faces"
R, S = 32, 4  # images 32 x 32, patch size 4 -> latents 8 x 8 x 3 (VQ-4-4-4: K = 16)
NUM = 4
STEPS = 10  # DDIM steps of every sampling call (the default 50 only costs time here)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Shared CPU cores: one intra-op thread is fastest for these tiny models. Numba too: after a parallel
    ``codec.decode`` (numba's "omp" threading layer, sharing libgomp with torch) its idle worker keeps a core
    busy and makes every following torch op on CPU tens of times slower (measured: 0.1 s -> 5 s per U-Net call)."""
    import numba

    n, n_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    numba.set_num_threads(n_numba)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Codec fitted on two 32 x 32 centre crops of real faces; latent store of 6 faces at R = 32."""
    files = sorted(FACES.glob("face_*.jpg"))[:6] if FACES.is_dir() else []
    if len(files) < 6:
        pytest.skip(f"real face images not found at {FACES} (see {DATA / 'README.md'})")
    from mbldm.codec import Codec
    from mbldm.data.datasets import resize_center_crop
    from mbldm.data.latent_store import build_latent_store
    from mbldm.io.images import load_image

    root = tmp_path_factory.mktemp("e2e")
    (root / "data").mkdir()
    for f in files:  # a temporary image folder (outside the repo) for the store builder
        shutil.copyfile(f, root / "data" / f.name)
    crops = [resize_center_crop(load_image(f), R) for f in files[:2]]
    Codec.fit(crops, spec="VQ-4-4-4", patch_size=S, max_patches=20000, progress=False).save(root / "codec")
    return build_latent_store(root / "codec", root / "data", R, root / "store", shard_size=4, progress=False)


def _train_args(store: Path, run: Path, variant: str, steps: int) -> list[str]:
    return ["train", "--latents", str(store), "--out", str(run), "--variant", variant, "--preset", "tiny",
            "--steps", str(steps), "--checkpoint-every", "3", "--batch-size", "2", "--lr", "1e-3",
            "--lr-warmup-steps", "2", "--ema-decay", "0.9", "--log-every", "3", "--no-progress"]


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {"raw": load_file(str(run / "checkpoints" / "step_0000006" / "model.safetensors")),
            "ema": load_file(str(run / "model" / "diffusion_pytorch_model.safetensors"))}


def _images(folder: Path) -> np.ndarray:
    from mbldm.io.images import load_image

    return np.stack([load_image(folder / f"img_{i:06d}.png") for i in range(NUM)])


def _sample(run: Path, out: Path, *extra: str) -> np.ndarray:
    assert main(["sample", "--run", str(run), "--num", str(NUM), "--out", str(out), "--steps", str(STEPS),
                 "--quiet", *extra]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png"] + [f"img_{i:06d}.png" for i in range(NUM)] + ["samples.json"]  # no raw/
    imgs = _images(out)
    assert imgs.shape == (NUM, R, R, 3) and imgs.dtype == np.uint8
    assert json.loads((out / "samples.json").read_text())["image_size"] == [R, R]
    return imgs


@pytest.mark.parametrize("variant", ["categorical", "continuous"])
def test_train_resume_and_sample_through_the_cli(store, tmp_path, variant, capsys):
    from mbldm.data.latent_store import LatentStore
    from mbldm.diffusion.sampling import sample

    # ---- train: 6 steps straight vs 3 steps + resume to 6 ----------------------------------------------------
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(_train_args(store, straight, variant, 6)) == 0
    assert main(_train_args(store, run, variant, 3)) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]
    assert main(["train", "--out", str(run), "--resume", "latest", "--steps", "6", "--no-progress"]) == 0
    assert capsys.readouterr().err.count("resumed from") == 1
    a, b = _weights(straight), _weights(run)
    for kind in ("raw", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for k in a[kind]:
            assert torch.allclose(a[kind][k], b[kind][k], rtol=0, atol=1e-6), f"{kind}: {k}"
    first = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert any(not torch.equal(first[k], b["raw"][k]) for k in first)  # the resumed steps did train
    cfg = json.loads((run / "config.json").read_text())
    c, K = 3, 16
    assert cfg["variant"] == variant and cfg["steps"] == 6 and cfg["latent_shape"] == [R // S, R // S, c]
    # the default categorical head is the logistic mixture over the ordered codebook: 3 numbers per component
    assert cfg["out_channels"] == (c * 3 * cfg["mixtures"] if variant == "categorical" else c)
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["loss"]) for r in rows)

    # ---- sample -------------------------------------------------------------------------------------------
    st = LatentStore(store)
    assert st.resolution == R
    if variant == "categorical":
        cold = _sample(run, tmp_path / "t0a", "--temperature", "0")
        assert np.array_equal(cold, _sample(run, tmp_path / "t0b", "--temperature", "0"))  # argmax path
        hot = _sample(run, tmp_path / "t1", "--temperature", "1.0")
        assert not np.array_equal(hot, cold)
        mem = sample(run, NUM, None, steps=STEPS, temperature=0.0, progress=False)
    else:
        cold = _sample(run, tmp_path / "a")
        assert np.array_equal(cold, _sample(run, tmp_path / "b"))  # DDIM eta = 0, seeds 0..3
        mem = sample(run, NUM, None, steps=STEPS, progress=False)
    # the PNGs are the run codec's decodes of the sampled latents, at the store's resolution
    assert mem["latents"].shape == (NUM, R // S, R // S, c) and mem["latents"].dtype == np.uint8
    assert np.array_equal(mem["images"], cold)
    assert np.array_equal(st.load_codec().decode(mem["latents"]), cold)
