"""Tests of mbldm/distributed.py and of every multi-process command, with 2 real CPU processes.

One job of 2 processes is started the documented way, ``accelerate launch --multi_gpu --num_processes 2
--main_process_port 0`` (on this CPU-only machine Accelerate then runs torch.distributed.run and mbldm uses the
gloo backend). To pay the start-up of the processes once on this shared 2-core machine, the job runs a driver
script that calls ``mbldm.cli.main([...])`` (what ``python -m mbldm ...`` runs) for each command in turn:

* ``latents build``: the same store, byte for byte, as one process;
* ``train`` 3 steps (global batch 4 = 2 x 2, checkpoint), then ``train --resume latest`` to step 6: losses and
  weights agree with one uninterrupted process;
* ``sample``: N = 10 images with batch 3 are exactly the 10 single-process images (none repeated, none missing);
* ``fid``: scores exactly those 10 images; equals Eq. 1 computed here from single-process features.

If two processes cannot be started at all (the driver's first line, printed after Accelerate set up the process
group, does not appear for both ranks), these tests are skipped with the launcher's error; once the processes are
up, a failure of our code fails the tests. The literal ``accelerate launch --cpu --num_processes 2 -m mbldm train``
(which starts one process without MPI; mbldm starts the two) is launched separately: train, then resume.
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

FACES = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
             or Path(__file__).resolve().parents[1].parent / "shared" / "data") / "faces"
R = 32  # images 32 x 32, VQ-4-4-4 with s = 4 -> latents 8 x 8 x 3, K = 16
JOB_TIMEOUT_S = 1200  # this shared machine can be 6x oversubscribed; the job takes ~1 min when it is idle


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on 2 shared cores


def _accelerate() -> list[str]:
    script = Path(sys.executable).parent / "accelerate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1")
    return env


def launch(*args: str, cwd: Path, cpu_flag: bool = False, timeout: float = JOB_TIMEOUT_S):
    """``accelerate launch`` 2 processes with ``args`` (a script or ``-m mbldm ...``); returns the finished process.

    ``cpu_flag`` uses ``--cpu`` instead of ``--multi_gpu`` (the launch that starts only one process).
    """
    mode = ["--cpu"] if cpu_flag else ["--multi_gpu", "--main_process_port", "0"]
    cmd = [*_accelerate(), "launch", *mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# The job's driver: one line per stage and rank, "STAGE {json}", written in one write() so lines stay whole.
DRIVER = r'''
import contextlib, io, json, sys, time, traceback
from pathlib import Path
from accelerate import PartialState

state = PartialState(cpu=True)
rank = state.process_index


def emit(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


emit(f"LAUNCH-OK {rank} {state.num_processes}")

from mbldm import distributed as dist
from mbldm.cli import main

P = json.loads(sys.argv[1])


def helpers():
    out = {"rank": dist.process_index(), "n": dist.num_processes(), "main": dist.is_main_process(), "split": {},
           "gathered": {}}
    for count in (0, 1, 2, 3, 10):
        out["split"][count] = dist.local_indices(count)
        out["gathered"][count] = dist.gather_object(list(out["split"][count]))
    flag = Path(P["flag"])
    with dist.main_process_first():
        out["saw_main_file"] = flag.exists()  # the main process writes it in its turn, before the others
        if rank == 0:
            time.sleep(0.5)
            flag.write_text("main was first")
    dist.wait_for_everyone()
    return out


def stage(name, fn):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            status = {"ok": True, "result": fn()}
    except BaseException:
        status = {"ok": False, "error": traceback.format_exc()}
    emit("STAGE " + json.dumps({"stage": name, "rank": rank, "stdout": buffer.getvalue(), **status}))


stage("helpers", helpers)
for name, argv in P["commands"]:
    stage(name, lambda argv=argv: main(argv))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """12 real faces, a tiny VQ-4-4-4 codec (s = 4) fitted on them at 32 x 32, and a 1-process store of them."""
    if not FACES.is_dir():
        pytest.skip(f"real face images not found at {FACES} (see MBLDM_TEST_DATA in README)")
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
    (root / "real").mkdir()  # FID reference: 4 of the faces
    for f in files[:4]:
        shutil.copyfile(f, root / "real" / f.name)
    return {"root": root, "faces": root / "faces", "real": root / "real", "codec": root / "codec", "store": store}


@pytest.fixture(scope="module")
def run_dir(data) -> Path:
    """A training run made by hand (contract 6) for sampling: the faces codec, an untrained tiny U-Net, T = 20."""
    from mbldm.diffusion.models import build_unet

    run = data["root"] / "run"
    shutil.copytree(data["codec"], run / "codec")
    cfg = {"variant": "continuous", "preset": "tiny", "latent_shape": [8, 8, 3], "num_codewords": 16,
           "timesteps": 20, "beta_schedule": "linear", "self_condition": True, "tau": 1.0, "seed": 0}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    build_unet("tiny", 6, 3, 8).save_pretrained(run / "model", safe_serialization=True)
    return run


TRAIN_ARGS = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--lr-warmup-steps", "2", "--checkpoint-every",
              "3", "--log-every", "1", "--ema-decay", "0.99", "--no-progress"]
SAMPLE_ARGS = ["--num", "10", "--steps", "4", "--batch-size", "3", "--seed", "5", "--quiet"]


@pytest.fixture(scope="module")
def job(data, run_dir) -> dict:
    """The 2-process job: {"dir": folder of its outputs, "stages": {name: [rank 0 record, rank 1 record]}}."""
    root = data["root"]
    out = root / "job"
    out.mkdir()
    commands = [
        ("latents", ["latents", "build", "--codec", str(data["codec"]), "--data", str(data["faces"]), "--resolution",
                     str(R), "--out", str(out / "store2"), "--shard-size", "5", "--quiet"]),
        ("train", ["train", "--latents", str(data["store"]), "--out", str(out / "run2"), *TRAIN_ARGS, "--steps", "3"]),
        ("resume", ["train", "--out", str(out / "run2"), "--resume", "latest", "--steps", "6", "--no-progress"]),
        ("sample", ["sample", "--run", str(run_dir), "--out", str(out / "samples2"), *SAMPLE_ARGS]),
        ("fid", ["fid", "--real", str(data["real"]), "--fake", str(out / "samples2"), "--json", str(out / "fid.json"),
                 "--no-progress"]),
    ]
    (root / "driver.py").write_text(DRIVER)
    spec = json.dumps({"flag": str(out / "flag.txt"), "commands": commands})
    try:
        proc = launch("driver.py", spec, cwd=root)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run 2 processes with accelerate here: {exc}")
    if sorted(re.findall(r"LAUNCH-OK (\d+) 2", proc.stdout)) != ["0", "1"]:
        pytest.skip(f"accelerate did not start 2 processes here (environment): exit {proc.returncode}, "
                    f"stdout: {proc.stdout[-500:]!r}, stderr: {proc.stderr[-1500:]!r}")
    stages: dict[str, list] = {}
    for record in (json.loads(m) for m in re.findall(r"^STAGE (\{.*\})$", proc.stdout, flags=re.M)):
        stages.setdefault(record["stage"], [None, None])[record["rank"]] = record
    return {"dir": out, "stages": stages, "stderr": proc.stderr, "returncode": proc.returncode}


def _stage(job: dict, name: str, command: bool = True) -> list[dict]:
    """Both ranks' records of a stage; fails with the error (or the job's stderr) unless both succeeded (for a
    ``command``: ``main`` returned 0)."""
    records = job["stages"].get(name, [None, None])
    for rank, rec in enumerate(records):
        assert rec is not None, f"stage {name!r} did not report on rank {rank}; job stderr:\n{job['stderr'][-4000:]}"
        assert rec["ok"], f"stage {name!r} failed on rank {rank}:\n{rec['error']}"
        assert not command or rec["result"] == 0, (f"stage {name!r}: exit {rec['result']} on rank {rank}; job "
                                                   f"stderr:\n{job['stderr'][-4000:]}")
    return records


# ----------------------------------------------------------------------------------------------- helpers

def test_helpers_split_gather_and_order_with_two_processes(job):
    results = [rec["result"] for rec in _stage(job, "helpers", command=False)]
    assert [(r["rank"], r["n"], r["main"]) for r in results] == [(0, 2, True), (1, 2, False)]
    rank0, rank1 = (r["split"] for r in results)
    # contiguous blocks, the first count % 2 processes take one more, no padding
    assert (rank0["10"], rank1["10"]) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert (rank0["3"], rank1["3"]) == ([0, 1], [2])
    assert (rank0["1"], rank1["1"]) == ([0], [])
    assert (rank0["0"], rank1["0"]) == ([], [])
    for r in results:
        for count, gathered in r["gathered"].items():
            assert gathered == list(range(int(count))), (r["rank"], count)
    assert [r["saw_main_file"] for r in results] == [False, True]


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


def test_parse_accelerate_launch_reads_the_process_count_and_port():
    base = ["/v/bin/python3", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "3"]
    assert dist.parse_accelerate_launch([*base, "-m", "mbldm", "train", "--steps", "2"]) == (3, None)
    assert dist.parse_accelerate_launch([*base, "--main_process_port", "29777", "-m", "mbldm", "fid"]) == (3, 29777)
    assert dist.parse_accelerate_launch(["/v/bin/python3", "-m", "mbldm", "train"]) is None  # no `launch`
    assert dist.parse_accelerate_launch(["accelerate", "launch", "--cpu", "-m", "mbldm"]) is None  # no count
    assert dist.parse_accelerate_launch(["accelerate", "launch", "--no-such-flag"]) is None


def test_complete_cpu_launch_only_acts_on_the_single_process_of_many():
    parent = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "mbldm", "train"]
    assert dist.complete_cpu_launch(["train"], environ={}, parent_cmdline=parent) is None  # plain `mbldm train`
    torchrun = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert dist.complete_cpu_launch(["train"], environ=torchrun, parent_cmdline=parent) is None  # a started worker
    single = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(RuntimeError, match="started only this one"):  # N not readable: refused, not run as 1
        dist.complete_cpu_launch(["train"], environ=single, parent_cmdline=["bash", "wrapper.sh"])


def test_torchrun_args_pass_mbldm_arguments_through_unparsed():
    argv = ["sample", "--run", "RUN", "--num", "5", "--out", "S"]  # --run would abbreviate torchrun's --run-path
    targs = dist.torchrun_args(2, None, argv)
    assert (targs.nproc_per_node, targs.standalone, targs.module) == ("2", True, True)
    assert (targs.training_script, targs.training_script_args) == ("mbldm", argv)
    fixed = dist.torchrun_args(3, 29777, ["train"])
    assert (fixed.standalone, fixed.master_port, fixed.nproc_per_node) == (False, 29777, "3")


def test_cpu_launch_trains_checkpoints_and_resumes_with_two_processes(data, one_process_run, run_dir, samples_one,
                                                                      tmp_path):
    """The literal `accelerate launch --cpu --num_processes 2 -m mbldm train ...` (no MPI): Accelerate starts one
    process, mbldm starts the two (complete_cpu_launch); 3 steps, then --resume to 6, equal the 1-process run."""
    run = tmp_path / "run_cpu"
    first = launch("-m", "mbldm", "train", "--latents", str(data["store"]), "--out", str(run), *TRAIN_ARGS,
                   "--steps", "3", cwd=tmp_path, cpu_flag=True)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "starting all 2 through torch.distributed.run" in first.stderr
    assert first.stdout.count(str(run)) == 1  # process 0 reports the run folder
    assert json.loads((run / "config.json").read_text())["num_processes"] == 2
    _assert_same_weights(one_process_run, run, 3)
    second = launch("-m", "mbldm", "train", "--out", str(run), "--resume", "latest", "--steps", "6",
                    "--no-progress", cwd=tmp_path, cpu_flag=True)
    assert second.returncode == 0, second.stderr[-4000:]
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in _metrics(run)], [m["loss"] for m in _metrics(one_process_run)],
                               rtol=1e-5)
    _assert_same_weights(one_process_run, run, 6)
    # `sample --run ...` too: its --run must reach mbldm, not torchrun's parser (which would read --run-path)
    third = launch("-m", "mbldm", "sample", "--run", str(run_dir), "--out", str(tmp_path / "s_cpu"), *SAMPLE_ARGS,
                   cwd=tmp_path, cpu_flag=True)
    assert third.returncode == 0, third.stderr[-4000:]
    from mbldm.io.images import load_image

    assert sorted(p.name for p in (tmp_path / "s_cpu").glob("img_*.png")) == [f"img_{i:06d}.png" for i in range(10)]
    for i in range(10):
        np.testing.assert_array_equal(load_image(tmp_path / "s_cpu" / f"img_{i:06d}.png"),
                                      load_image(samples_one / f"img_{i:06d}.png"))


# ----------------------------------------------------------------------------------------------- latents build

def _same_tree(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_latents_build_with_two_processes_equals_one(job, data):
    records = _stage(job, "latents")
    assert "12 latents 8x8x3" in records[0]["stdout"] and records[1]["stdout"] == ""  # process 0 reports
    store1 = json.loads((data["store"] / "store.json").read_text())
    assert store1["num_shards"] == 3 and store1["complete"]  # process 0 encodes shards 0 and 2, process 1 shard 1
    _same_tree(data["store"], job["dir"] / "store2")  # store.json, sources.jsonl, codec/, 3 shards: byte for byte


# ----------------------------------------------------------------------------------------------- training

# The key bias of attention gets an exactly zero gradient (softmax(q.(k + b)) = softmax(q.k): q.b is the same for
# every key), so Adam turns round-off (~1e-9) into +-lr steps whose signs differ between any two runs.
ZERO_GRADIENT = ("mid_block.attentions.0.to_k.bias",)


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory) -> Path:
    """6 steps in this process with the same settings (global batch 4), checkpoints at 3 and 6."""
    from mbldm.diffusion.train_config import resolve_config
    from mbldm.diffusion.training import train

    flags = dict(latents=str(data["store"]), out=str(tmp_path_factory.mktemp("train1") / "run"), steps=6,
                 preset="tiny", batch_size=4, lr=1e-3, lr_warmup_steps=2, checkpoint_every=3, log_every=1,
                 ema_decay=0.99, progress=False)
    return train(resolve_config(flags))


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


def test_train_two_processes_checkpoint_and_match_one(job, one_process_run):
    _stage(job, "train")
    run1, run2 = one_process_run, job["dir"] / "run2"
    assert json.loads((run2 / "config.json").read_text())["num_processes"] == 2
    assert json.loads((run1 / "config.json").read_text())["num_processes"] == 1
    _assert_same_weights(run1, run2, 3)  # the checkpoint written by the 2-process run


def test_train_two_processes_resume_and_match_one(job, one_process_run):
    _stage(job, "resume")
    run1, run2 = one_process_run, job["dir"] / "run2"
    assert [m["step"] for m in _metrics(run2)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in _metrics(run2)], [m["loss"] for m in _metrics(run1)], rtol=1e-5)
    _assert_same_weights(run1, run2, 6)


# ----------------------------------------------------------------------------------------------- sampling and FID

@pytest.fixture(scope="module")
def samples_one(data, run_dir) -> Path:
    """The same N = 10 images with batch 3 in this process."""
    from mbldm.cli import main

    out = data["root"] / "samples1"
    assert main(["sample", "--run", str(run_dir), "--out", str(out), "--device", "cpu", *SAMPLE_ARGS]) == 0
    return out


def test_sample_two_processes_writes_exactly_the_single_process_images(job, samples_one):
    from mbldm.io.images import load_image

    records = _stage(job, "sample")
    assert "wrote 10 images" in records[0]["stdout"] and records[1]["stdout"] == ""
    one, two = samples_one, job["dir"] / "samples2"
    names = [f"img_{i:06d}.png" for i in range(10)]
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


def test_fid_two_processes_scores_exactly_n_images_and_equals_one(job, data, samples_one):
    from mbldm.eval.fid import InceptionFeatures, extract_features

    records = _stage(job, "fid")
    assert records[0]["stdout"].count("FID:") == 1 and records[1]["stdout"] == ""  # process 0 reports
    got = json.loads((job["dir"] / "fid.json").read_text())
    assert (got["n_real"], got["n_fake"]) == (4, 10)  # exactly the N samples: not grid.png

    extractor = InceptionFeatures("cpu")
    x = extract_features(data["real"], extractor=extractor, progress=False)
    y = extract_features([samples_one / f"img_{i:06d}.png" for i in range(10)], extractor=extractor, progress=False)
    assert got["fid"] == pytest.approx(_fid_small_n(x, y), rel=1e-5)
