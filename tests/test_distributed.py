"""Tests of mbldm/distributed.py and of every multi-process command, with 2 real CPU processes.

The processes are started the documented way, ``accelerate launch --multi_gpu --num_processes 2
--main_process_port 0 -m mbldm ...`` (on this CPU-only machine Accelerate then runs torch.distributed.run and
mbldm uses the gloo backend), and compared with a single process:

* ``train``: loss and weights of a 2-process run (global batch 4 = 2 x 2), checkpointed and resumed, agree with a
  single uninterrupted process;
* ``sample`` / ``fid``: N = 10 images with batch 3 are exactly the 10 single-process images (none repeated,
  none missing), and the FID of 2 processes equals the single-process FID over exactly 10 + 10 images;
* ``latents build``: 2 processes write the same store as 1.

If two processes cannot be started at all here (a launch of a bare Accelerate script fails), these tests are
skipped with the launcher's error; once launching works, a failure of our code fails the tests.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mbldm import distributed as dist

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
R = 32  # images 32 x 32, VQ-4-4-4 with s = 4 -> latents 8 x 8 x 3, K = 16
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared CPU cores: one intra-op thread per process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _accelerate() -> list[str]:
    script = Path(sys.executable).parent / "accelerate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1")
    return env


def launch(*args: str, cwd: Path, cpu_flag: bool = False) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 processes with ``args`` (a script or ``-m mbldm ...``); returns the finished process.

    ``cpu_flag`` uses ``--cpu`` instead of ``--multi_gpu`` (the launch that starts only one process).
    """
    mode = ["--cpu"] if cpu_flag else ["--multi_gpu", "--main_process_port", "0"]
    cmd = [*_accelerate(), "launch", *mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                                  f"{proc.stderr[-5000:]}")
    return proc


PROBE = r'''
import json, sys, time
from pathlib import Path
from accelerate import PartialState

state = PartialState(cpu=True)
sys.stdout.write(f"LAUNCH-OK {state.process_index} {state.num_processes}\n")  # one write: lines stay whole
sys.stdout.flush()

from mbldm import distributed as dist

dist.check_launch()
r = dist.process_index()
result = {"rank": r, "n": dist.num_processes(), "main": dist.is_main_process(), "split": {}, "gathered": {}}
for count in (0, 1, 2, 3, 10):
    result["split"][count] = dist.local_indices(count)
    result["gathered"][count] = dist.gather_object(list(result["split"][count]))
flag = Path(sys.argv[1])
with dist.main_process_first():
    result["saw_main_file"] = flag.exists()   # the main process writes it inside its turn
    if r == 0:
        time.sleep(0.5)
        flag.write_text("main was first")
dist.wait_for_everyone()
sys.stdout.write("RESULT " + json.dumps(result) + "\n")
sys.stdout.flush()
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> list[dict]:
    """Launch a bare Accelerate script with 2 processes (skip the module if that fails), then the helpers."""
    root = tmp_path_factory.mktemp("probe")
    (root / "probe.py").write_text(PROBE)
    try:
        proc = launch("probe.py", str(root / "flag.txt"), cwd=root)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot launch 2 processes with accelerate here: {exc}")
    started = sorted(re.findall(r"LAUNCH-OK (\d+) 2", proc.stdout))
    if started != ["0", "1"]:
        pytest.skip(f"accelerate did not start 2 processes here (environment): exit {proc.returncode}, "
                    f"stdout: {proc.stdout[-500:]!r}, stderr: {proc.stderr[-1500:]!r}")
    _ok(proc)
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", proc.stdout)]
    return sorted(results, key=lambda r: r["rank"])


# ----------------------------------------------------------------------------------------------- helpers

def test_helpers_split_gather_and_order_with_two_processes(probe):
    assert [(r["rank"], r["n"], r["main"]) for r in probe] == [(0, 2, True), (1, 2, False)]
    rank0, rank1 = (r["split"] for r in probe)
    # contiguous blocks, the first count % 2 processes take one more, no padding
    assert (rank0["10"], rank1["10"]) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert (rank0["3"], rank1["3"]) == ([0, 1], [2])
    assert (rank0["1"], rank1["1"]) == ([0], [])
    assert (rank0["0"], rank1["0"]) == ([], [])
    for r in probe:
        for count, gathered in r["gathered"].items():
            assert gathered == list(range(int(count))), (r["rank"], count)
    assert [r["saw_main_file"] for r in probe] == [False, True]


def test_helpers_single_process_are_identity():
    assert (dist.num_processes(), dist.process_index(), dist.is_main_process()) == (1, 0, True)
    assert dist.local_indices(7) == list(range(7)) and dist.local_indices(0) == []
    assert dist.gather_object([3, 1]) == [3, 1]
    dist.wait_for_everyone()
    with pytest.raises(ValueError, match="count"):
        dist.local_indices(-1)
    with pytest.raises(TypeError, match="list"):
        dist.gather_object((1, 2))


@pytest.mark.parametrize("env, refused", [
    ({}, False),
    ({"ACCELERATE_USE_CPU": "True"}, False),  # accelerate launch --cpu, one process: no MASTER_ADDR
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "OMPI_COMM_WORLD_SIZE": "2"}, False),  # mpirun
    ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False),  # torchrun / --multi_gpu
])
def test_check_launch(env, refused):
    if refused:
        with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N"):
            dist.check_launch(env)
    else:
        dist.check_launch(env)


def test_cpu_launch_that_starts_one_process_is_refused(probe, tmp_path):
    """`accelerate launch --cpu --num_processes 2` (no MPI) runs one process: mbldm says so instead of going on."""
    proc = launch("-m", "mbldm", "train", "--out", str(tmp_path / "run"), cwd=tmp_path, cpu_flag=True)
    assert proc.returncode != 0
    assert "started only this one" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """12 real faces, a tiny VQ-4-4-4 codec (s = 4) fitted on them at 32 x 32, and a 1-process store of them."""
    if not FACES.is_dir():
        pytest.skip(f"real face images not found at {FACES} (see /work/shared/data/README.md)")
    from PIL import Image

    from mbldm.codec import Codec
    from mbldm.data.latent_store import build_latent_store

    root = tmp_path_factory.mktemp("data")
    files = sorted(FACES.glob("face_*.jpg"))[:12]
    (root / "faces").mkdir()
    for f in files:
        shutil.copyfile(f, root / "faces" / f.name)
    images = [np.asarray(Image.open(f).convert("RGB").resize((R, R))) for f in files]
    Codec.fit(images, spec="VQ-4-4-4", patch_size=4, max_patches=20000, progress=False).save(root / "codec")
    store = build_latent_store(root / "codec", root / "faces", R, root / "store1", shard_size=5, progress=False)
    return {"root": root, "faces": root / "faces", "codec": root / "codec", "store": store}


def _same_tree(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_latents_build_with_two_processes_equals_one(probe, data):
    out = data["root"] / "store2"
    proc = _ok(launch("-m", "mbldm", "latents", "build", "--codec", str(data["codec"]), "--data", str(data["faces"]),
                      "--resolution", str(R), "--out", str(out), "--shard-size", "5", "--quiet", cwd=data["root"]))
    assert proc.stdout.count("12 latents 8x8x3") == 1  # process 0 reports once
    store1 = json.loads((data["store"] / "store.json").read_text())
    assert store1["num_shards"] == 3 and store1["complete"]
    _same_tree(data["store"], out)  # store.json, sources.jsonl, codec/ and the 3 shards, byte for byte


# ----------------------------------------------------------------------------------------------- training

TRAIN_ARGS = ("--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--lr-warmup-steps", "2", "--checkpoint-every",
              "3", "--log-every", "1", "--ema-decay", "0.99", "--no-progress")
# The key bias of attention gets an exactly zero gradient (softmax(q.(k + b)) = softmax(q.k): q.b is the same for
# every key), so Adam turns round-off (~1e-9) into +-lr steps whose signs differ between any two runs.
ZERO_GRADIENT = ("mid_block.attentions.0.to_k.bias",)


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory) -> Path:
    """6 steps in this process with the same settings (global batch 4), checkpoints at 3 and 6."""
    from mbldm.diffusion.training import resolve_config, train

    flags = dict(latents=str(data["store"]), out=str(tmp_path_factory.mktemp("train1") / "run"), steps=6,
                 preset="tiny", batch_size=4, lr=1e-3, lr_warmup_steps=2, checkpoint_every=3, log_every=1,
                 ema_decay=0.99, progress=False)
    return train(resolve_config(flags))


@pytest.fixture(scope="module")
def two_process_run(probe, data, tmp_path_factory) -> Path:
    """The first 3 steps with 2 processes (2 images each), ending with a checkpoint."""
    run = tmp_path_factory.mktemp("train2") / "run"
    _ok(launch("-m", "mbldm", "train", "--latents", str(data["store"]), "--out", str(run), *TRAIN_ARGS, "--steps", "3",
               cwd=run.parent))
    return run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(run_a: Path, run_b: Path, step: int) -> None:
    from safetensors.torch import load_file

    for name in ("model", "ema"):
        a = load_file(str(run_a / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))
        b = load_file(str(run_b / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            if k not in ZERO_GRADIENT:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")


def test_train_two_processes_match_one(one_process_run, two_process_run):
    run1, run2 = one_process_run, two_process_run
    assert json.loads((run2 / "config.json").read_text())["num_processes"] == 2
    assert json.loads((run1 / "config.json").read_text())["num_processes"] == 1
    assert [m["step"] for m in _metrics(run2)] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in _metrics(run2)], [m["loss"] for m in _metrics(run1)[:3]],
                               rtol=1e-5)
    _assert_same_weights(run1, run2, 3)


def test_train_two_processes_resume_and_match_one(one_process_run, two_process_run):
    run1, run2 = one_process_run, two_process_run
    _ok(launch("-m", "mbldm", "train", "--out", str(run2), "--resume", "latest", "--steps", "6", "--no-progress",
               cwd=run2.parent))
    assert [m["step"] for m in _metrics(run2)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in _metrics(run2)], [m["loss"] for m in _metrics(run1)], rtol=1e-5)
    _assert_same_weights(run1, run2, 6)


# ----------------------------------------------------------------------------------------------- sampling and FID

@pytest.fixture(scope="module")
def run_dir(data) -> Path:
    """A training run made by hand (contract 6): the faces codec, an untrained tiny U-Net, T = 20."""
    from mbldm.diffusion.models import build_unet

    run = data["root"] / "run"
    shutil.copytree(data["codec"], run / "codec")
    cfg = {"variant": "continuous", "preset": "tiny", "latent_shape": [8, 8, 3], "num_codewords": 16,
           "timesteps": 20, "beta_schedule": "linear", "self_condition": True, "tau": 1.0, "seed": 0}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    build_unet("tiny", 6, 3, 8).save_pretrained(run / "model", safe_serialization=True)
    return run


@pytest.fixture(scope="module")
def sampled(probe, data, run_dir) -> dict[str, Path]:
    """N = 10 images with batch 3: once in this process, once with 2 processes."""
    from mbldm.diffusion.sampling import sample

    one, two = data["root"] / "samples1", data["root"] / "samples2"
    sample(run_dir, 10, one, steps=4, batch_size=3, seed=5, device="cpu", progress=False)
    _ok(launch("-m", "mbldm", "sample", "--run", str(run_dir), "--num", "10", "--out", str(two), "--steps", "4",
               "--batch-size", "3", "--seed", "5", "--quiet", cwd=data["root"]))
    return {"one": one, "two": two}


def test_sample_two_processes_writes_exactly_the_single_process_images(sampled):
    from mbldm.io.images import load_image

    one, two = sampled["one"], sampled["two"]
    names = [f"img_{i:06d}.png" for i in range(10)]
    assert sorted(p.name for p in two.glob("img_*.png")) == names  # exactly N, none repeated or padded
    assert sorted(p.name for p in two.iterdir()) == sorted([*names, "grid.png", "samples.json"])  # no shard files
    for name in names:
        np.testing.assert_array_equal(load_image(two / name), load_image(one / name), err_msg=name)
    np.testing.assert_array_equal(load_image(two / "grid.png"), load_image(one / "grid.png"))
    s1, s2 = (json.loads((d / "samples.json").read_text()) for d in (one, two))
    assert s2["count"] == 10 and s2["indices"] == list(range(10)) and s2["num_processes"] == 2
    assert [(s["first"], s["last"], s["count"]) for s in s2["shards"]] == [(0, 4, 5), (5, 9, 5)]
    same = ("seed", "steps", "sampler", "num", "grid_images", "latent_shape", "seed_rule")
    assert {k: s2[k] for k in same} == {k: s1[k] for k in same}


def _fid_small_n(x: np.ndarray, y: np.ndarray) -> float:
    """Eq. 1 for n <= D features, derived independently of mbldm.eval.fid: with centred features A (n1, D) and
    B (n2, D), Sigma1 Sigma2 = A^T A B^T B / ((n1-1)(n2-1)) has the non-zero eigenvalues of M M^T, M = A B^T, so
    Tr (Sigma1^1/2 Sigma2 Sigma1^1/2)^1/2 = sum of the singular values of M / sqrt((n1-1)(n2-1)): an n1 x n2 SVD."""
    a, b = x - x.mean(0), y - y.mean(0)
    n1, n2 = len(x), len(y)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    mean = x.mean(0) - y.mean(0)
    return float(mean @ mean + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * cross)


def test_fid_two_processes_scores_exactly_n_images_and_equals_one(probe, data, sampled, tmp_path):
    from mbldm.eval.fid import InceptionFeatures, extract_features

    real = tmp_path / "real"
    real.mkdir()
    for f in sorted(data["faces"].iterdir())[:4]:
        shutil.copyfile(f, real / f.name)
    out = tmp_path / "fid.json"
    proc = _ok(launch("-m", "mbldm", "fid", "--real", str(real), "--fake", str(sampled["two"]), "--json", str(out),
                      "--no-progress", cwd=tmp_path))
    assert proc.stdout.count("FID:") == 1  # process 0 reports
    got = json.loads(out.read_text())
    assert (got["n_real"], got["n_fake"]) == (4, 10)  # exactly the N samples: not grid.png

    extractor = InceptionFeatures("cpu")
    x = extract_features(real, extractor=extractor, progress=False)
    y = extract_features([sampled["one"] / f"img_{i:06d}.png" for i in range(10)], extractor=extractor,
                         progress=False)
    assert got["fid"] == pytest.approx(_fid_small_n(x, y), rel=1e-5)
