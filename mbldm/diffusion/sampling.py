"""Sampling a trained run to images and files (§3.2, §4.2): :func:`sample` loads the run
(:mod:`mbldm.diffusion.run_loading`), runs the reverse process batch by batch
(:mod:`mbldm.diffusion.reverse_process`, DDPM / DDIM, both variants), decodes with the run's codec, optionally refines
(§4.2.2) and writes the outputs. Several processes: :mod:`mbldm.diffusion.sample_sharding`.

Per-image seeds: image ``i`` (global index) owns ``torch.Generator("cpu").manual_seed(seed + i)`` (see
:mod:`mbldm.diffusion.reverse_process` for what it draws), so images depend only on ``seed + i``, never on the
batch size or on which other images share the batch, and a sharded run writes exactly the images an unsharded run
does.

Outputs of :func:`sample`: ``img_{i:06d}.png`` per global index i, ``grid.png`` (at most ``GRID_MAX_IMAGES`` images,
``ceil(sqrt(n))`` per row) and ``samples.json``; with a refiner (§4.2.2) the refined images are the ``img_*`` files
and the unrefined decodes go to ``raw/``; with a trajectory request, ``trajectory/img_{i:06d}_xt.png`` and
``_x0.png`` strips (one frame per recorded t, Fig. 7).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mbldm.diffusion.reverse_process import (
    SAMPLERS,
    TRAJECTORY_T,
    VARIANTS,
    FinalDistribution,
    Trajectory,
    default_trajectory_t,
    generate_latents,
    resolve_steps,
)
from mbldm.diffusion.run_loading import RunModel, load_run, read_trained_config

__all__ = [
    "SAMPLERS",
    "VARIANTS",
    "TRAJECTORY_T",
    "GRID_MAX_IMAGES",
    "Trajectory",
    "RunModel",
    "load_run",
    "resolve_steps",
    "default_trajectory_t",
    "generate_latents",
    "make_grid",
    "sample",
]

#: grid.png shows at most this many images (the first ones produced); it is a preview, not an archive.
GRID_MAX_IMAGES = 64
IMAGE_NAME = "img_{:06d}.png"
SUMMARY_FILE = "samples.json"
#: Summary of process r of n in a sharded job (:func:`mbldm.diffusion.sample_sharding.sample_sharded`); merged
#: into samples.json, then removed.
SHARD_SUMMARY_FILE = "samples.shard-{:03d}-of-{:03d}.json"
GRID_FILE = "grid.png"


# ---------------------------------------------------------------------------------------------------- images
def make_grid(images: np.ndarray, ncol: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images row-major into one image (numpy version of torchvision's ``make_grid``).

    Args:
        images: uint8 (N, H, W, 3), N >= 1.
        ncol: images per row (default ``ceil(sqrt(N))``).
        padding: pixels between images and around the border.
        pad_value: grey level of the padding.

    Returns:
        uint8 (rows*(H+p)+p, ncol*(W+p)+p, 3), rows = ceil(N / ncol); empty cells hold ``pad_value``.

    Raises:
        ValueError: not a non-empty uint8 (N, H, W, 3) array, or ncol < 1 / padding < 0.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"make_grid expects non-empty uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    N, H, W, _ = images.shape
    ncol = math.ceil(math.sqrt(N)) if ncol is None else int(ncol)
    if ncol < 1 or padding < 0:
        raise ValueError(f"make_grid needs ncol >= 1 and padding >= 0, got ncol={ncol}, padding={padding}")
    rows = math.ceil(N / ncol)
    p = padding
    grid = np.full((rows * (H + p) + p, ncol * (W + p) + p, 3), pad_value, np.uint8)
    for n, img in enumerate(images):
        r, col = divmod(n, ncol)
        top, left = p + r * (H + p), p + col * (W + p)
        grid[top:top + H, left:left + W] = img
    return grid


def _decode_frames(codec, frames: torch.Tensor) -> np.ndarray:
    """Decode trajectory frames: LongTensor (B, m, h, w, c) -> uint8 (B, m, H, W, 3)."""
    B, m = frames.shape[:2]
    flat = frames.reshape(B * m, *frames.shape[2:]).numpy().astype(codec.index_dtype)  # (B*m, h, w, c)
    dec = codec.decode(flat)  # (B*m, H, W, 3)
    return dec.reshape(B, m, *dec.shape[1:])


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, refusing a non-folder or (without ``overwrite``) a non-empty folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True (--overwrite) to write "
                              "into it")
    out_dir.mkdir(parents=True, exist_ok=True)


def check_indices(num: int, indices: Sequence[int] | None) -> list[int]:
    """The global indices to produce: ``indices`` checked against ``num`` (in range, distinct), or ``range(num)``."""
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    if indices is None:
        return list(range(int(num)))
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty: nothing to sample")
    bad = [i for i in idx if not 0 <= i < num]
    if bad:
        raise ValueError(f"indices must lie in [0, {num - 1}] (num={num}), got {bad[:10]}")
    if len(set(idx)) != len(idx):
        raise ValueError("indices holds duplicates; each global image index may be produced once")
    return idx


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when available, else cpu; anything else -> ``torch.device(device)``.

    Raises:
        ValueError: a CUDA device when torch has no CUDA here (instead of torch's "not compiled with CUDA"
            AssertionError deep inside ``load_run``).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available in this torch build/machine "
                         f"(torch {torch.__version__}); use 'cpu'")
    return torch.device(device)



def _check_shard(shard: tuple[int, int]) -> None:
    r, n = shard
    if not (isinstance(r, int) and isinstance(n, int) and 0 <= r < n):
        raise ValueError(f"shard must be (process_index, num_processes) with 0 <= process_index < num_processes, "
                         f"got {shard!r}")


def sample(
    run_dir: str | Path,
    num: int,
    out_dir: str | Path | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    temperature: float | None = None,
    refiner: str | Path | None = None,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    trajectory: Sequence[int] | bool | None = None,
    shard: tuple[int, int] | None = None,
    estimate: str | None = None,
    spacing: str | None = None,
    decode: str | None = None,
) -> dict:
    """Generate images from a training run, decode them with the run's codec and (optionally) write PNGs.

    Image ``i`` (a global index in [0, num)) is a function of ``seed + i`` alone (see the module docstring).

    Args:
        run_dir: training run directory (contract 6).
        num: total number of images N of the (possibly sharded) job.
        out_dir: folder for ``img_{i:06d}.png``, ``grid.png``, ``samples.json`` (+ ``raw/``, ``trajectory/``);
            None -> nothing is written and the images are returned in memory.
        sampler: "ddpm" (all T steps, ancestral) or "ddim".
        steps: DDIM steps S <= T (default 50); for DDPM None or T.
        eta: DDIM eta >= 0 (0 for DDPM).
        seed: base seed; image i uses seed + i.
        batch_size: images per forward pass (does not change the images).
        temperature: gamma of Eq. 25 (categorical runs only; 0 = argmax). None: the run's default
            (:func:`sampling_defaults`).
        estimate: categorical runs: "sample" (Eq. 25 at every step, Algorithm 2) or "mean" (the expected index at
            intermediate steps, a sample at ``temperature`` at the last); None: the run's default.
        spacing: DDIM timesteps, "trailing" (evenly spaced, the first at T-1) or "quadratic" (dense at small t,
            the last at t = 0; ``schedule.quadratic_timesteps``); None: the run's default.
        decode: categorical runs: "hard" (the table look-up of the sampled indices) or "soft" (the expected image
            E[D(z_0)] under the last step's distribution, Eq. 21 with its probabilities; the latents returned are
            still the sampled indices); None: the run's default.
        refiner: optional refiner directory (``mbldm refiner train``), applied after decoding (§4.2.2).
        use_ema: EMA weights (``RUN/model``, default) or the latest checkpoint's raw weights.
        device: torch device (default cuda if available, else cpu).
        indices: global indices to produce (default ``range(num)``); a shard passes its subset.
        progress: show progress bars.
        overwrite: allow writing into a non-empty ``out_dir``.
        trajectory: paper times in [0, T] at which to record x_t and x0 estimates (Fig. 7), or True for
            ``default_trajectory_t(T)`` (T, 0.9 T, ..., 0).
        shard: ``(process_index, num_processes)`` when this call is one process of
            :func:`~mbldm.diffusion.sample_sharding.sample_sharded`: the
            caller has checked ``out_dir`` (it may already hold other shards' images), the summary goes to
            ``SHARD_SUMMARY_FILE`` and no grid is written
            (:func:`~mbldm.diffusion.sample_sharding.merge_sample_shards` writes both).

    Returns:
        dict with ``"summary"`` (what ``samples.json`` holds), ``"indices"`` (list), ``"latents"`` (index dtype
        (n, h, w, c)), and: with ``out_dir``: ``"files"`` (list of Path), ``"grid"`` (Path); without:
        ``"images"`` uint8 (n, H, W, 3) (+ ``"raw_images"`` with a refiner); with ``trajectory``: ``"trajectory"``
        = {"t": list, "x_t": uint8 (n, m, H, W, 3), "x0": uint8 (n, m, H, W, 3)}.

    Raises:
        FileNotFoundError / ValueError: see :func:`load_run`, :func:`resolve_steps`, :func:`generate_latents`;
        ValueError for bad num / indices / batch_size; FileExistsError: non-empty ``out_dir`` without overwrite.
    """
    from tqdm.auto import tqdm

    from mbldm.diffusion.schedule import alphas_cumprod_from_betas, make_betas, make_scheduler

    idx = check_indices(num, indices)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if Path(run_dir).is_dir():  # cheap checks before loading the model
        resolve_steps(sampler, steps, int(read_trained_config(Path(run_dir))["timesteps"]))
    dev = _resolve_device(device)
    run = load_run(run_dir, use_ema=use_ema, device=dev)
    T = int(run.config["timesteps"])
    S = resolve_steps(sampler, steps, T)
    if trajectory is True:
        trajectory = default_trajectory_t(T)
    elif trajectory is False:
        trajectory = None
    temperature, estimate, spacing, decode = sampling_defaults(run, temperature, estimate, spacing, decode, sampler)
    param = run.parameterization
    pred = "epsilon" if not param.categorical and param.prediction == "epsilon" else "sample"
    scheduler = make_scheduler(sampler, T=T, schedule=run.config["beta_schedule"], prediction_type=pred,
                               spacing=spacing)
    alphas_cumprod = alphas_cumprod_from_betas(make_betas(run.config["beta_schedule"], T))  # as in training
    ref = _load_refiner(refiner, dev)
    out = _open_out_dir(out_dir, overwrite, shard)

    generate = functools.partial(
        generate_latents, run.model, scheduler, latent_shape=_latent_shape(run), num_codewords=run.config[
            "num_codewords"], variant=run.variant, self_condition=bool(run.config["self_condition"]), steps=S,
        eta=eta, temperature=temperature, tau=float(run.config.get("tau", 1.0)), progress=False,
        parameterization=param, estimate=estimate, alphas_cumprod=alphas_cumprod,
        self_condition_estimate=run.config["self_condition_estimate"])
    got = _Produced()
    start = time.time()
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for chunk in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        _sample_batch(generate, run.codec, chunk, seed, trajectory, ref, out, got, soft=decode == "soft")
    seconds = time.time() - start

    summary = _summary(run, run_dir, idx, got, sampler=sampler, steps=S, eta=eta, temperature=temperature,
                       estimate=estimate, spacing=spacing, decode=decode,
                       seed=seed, use_ema=use_ema, refiner=refiner, num=num, batch_size=batch_size, device=dev,
                       seconds=seconds)
    return _result(summary, idx, got, out, shard, with_raw=ref is not None, with_trajectory=trajectory is not None)


#: Sampling defaults of categorical runs by run format version: version 1 (the paper's head and loss) samples as
#: Algorithm 2 (Eq. 25 at gamma = 1 at every step); version 2 runs use the expected index at intermediate steps
#: and the mode at the last (measured best, BENCHMARKS.md "Generation recipe").
CATEGORICAL_DEFAULTS = {1: {"temperature": 1.0, "estimate": "sample", "spacing": "trailing", "decode": "hard"},
                        2: {"temperature": 0.0, "estimate": "mean", "spacing": "quadratic", "decode": "hard"}}


def sampling_defaults(run: RunModel, temperature: float | None, estimate: str | None, spacing: str | None = None,
                      decode: str | None = None, sampler: str = "ddim") -> tuple[float, str, str, str]:
    """The (temperature, estimate, spacing, decode) a sampling call uses: the given values, else the run's
    defaults (``CATEGORICAL_DEFAULTS`` by run format version; continuous runs: trailing spacing, hard decode).

    Raises:
        ValueError: a temperature, estimate or soft decode given for a continuous run (they apply to categorical
            runs only); an unknown estimate or decode.
    """
    from mbldm.diffusion.reverse_process import ESTIMATES

    if decode not in (None, "hard", "soft"):
        raise ValueError(f"decode must be 'hard' or 'soft', got {decode!r}")
    if estimate not in (None, *ESTIMATES):
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if run.variant == "continuous":
        if temperature is not None or estimate is not None or decode == "soft":
            raise ValueError(f"{run.run_dir}: --temperature, --estimate and --decode soft apply to categorical runs "
                             "only; this is a continuous run (drop them)")
        return 1.0, "sample", spacing or "trailing", "hard"
    version = 2 if int(run.config.get("version", 1)) >= 2 else 1
    defaults = CATEGORICAL_DEFAULTS[version]
    spacing = spacing or (defaults["spacing"] if sampler == "ddim" else "trailing")
    return (defaults["temperature"] if temperature is None else float(temperature),
            defaults["estimate"] if estimate is None else estimate, spacing,
            defaults["decode"] if decode is None else decode)


def _load_refiner(refiner: str | Path | None, device: torch.device):
    if refiner is None:
        return None
    from mbldm.diffusion.refiner import Refiner

    return Refiner.load(refiner, device=device)


def _open_out_dir(out_dir: str | Path | None, overwrite: bool, shard: tuple[int, int] | None) -> Path | None:
    """The output folder, checked (unless this is a shard) and created; None: results stay in memory."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if shard is None:
            prepare_out_dir(out, overwrite)
        else:  # sample_sharded checked the folder on every process before any of them wrote into it
            _check_shard(shard)
            out.mkdir(parents=True, exist_ok=True)
    return out


def _latent_shape(run: RunModel) -> tuple[int, int, int]:
    h, w, c = (int(v) for v in run.config["latent_shape"])
    return h, w, c


@dataclass
class _Produced:
    """What the batches of one :func:`sample` call produced so far, in order."""

    latents: list = field(default_factory=list)  # (b, h, w, c) index arrays
    images: list = field(default_factory=list)  # (b, H, W, 3) uint8, kept in memory when there is no out_dir
    raw: list = field(default_factory=list)  # unrefined decodes, kept in memory with a refiner
    files: list = field(default_factory=list)  # written img_*.png paths
    grid: list = field(default_factory=list)  # the first GRID_MAX_IMAGES images
    traj_t: list | None = None  # recorded paper times
    traj_xt: list = field(default_factory=list)  # (b, m, H, W, 3) decoded x_t frames per batch
    traj_x0: list = field(default_factory=list)  # (b, m, H, W, 3) decoded x0 frames per batch


def _sample_batch(generate: Callable, codec, chunk: list[int], seed: int, trajectory: Sequence[int] | None, ref,
                  out: Path | None, got: _Produced, soft: bool = False) -> None:
    """Generate, decode (and refine) the images of global indices ``chunk``; keep them in ``got`` or write them."""
    rec = Trajectory(t=trajectory) if trajectory is not None else None
    final = FinalDistribution() if soft else None
    z = generate([seed + i for i in chunk], trajectory=rec, final=final)
    z_np = z.numpy().astype(codec.index_dtype)  # (b, h, w, c)
    got.latents.append(z_np)
    if soft:  # E[D(z_0)] under the last step's distribution: (b, 3, H, W) in [0, 255] -> uint8 (b, H, W, 3)
        expected = codec.decode_soft(final.probabilities.to(torch.float32))
        raw = expected.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    else:
        raw = codec.decode(z_np)  # (b, H, W, 3) uint8
    imgs = ref.apply(raw) if ref is not None else raw
    if rec is not None:
        got.traj_t = rec.recorded_t
        got.traj_xt.append(_decode_frames(codec, rec.x_t))  # (b, m, H, W, 3)
        got.traj_x0.append(_decode_frames(codec, rec.x0))
    if len(got.grid) < GRID_MAX_IMAGES:
        got.grid.extend(imgs[: GRID_MAX_IMAGES - len(got.grid)])
    if out is None:
        got.images.append(imgs)
        if ref is not None:
            got.raw.append(raw)
        return
    _write_batch(out, chunk, imgs, raw if ref is not None else None, got, with_trajectory=rec is not None)


def _write_batch(out: Path, chunk: list[int], imgs: np.ndarray, raw: np.ndarray | None, got: _Produced,
                 with_trajectory: bool) -> None:
    """Write ``img_*.png`` (+ ``raw/`` with a refiner, + the ``trajectory/`` strips of the last batch)."""
    from mbldm.io.images import save_png

    for j, i in enumerate(chunk):
        path = out / IMAGE_NAME.format(i)
        save_png(path, imgs[j], overwrite=True)
        got.files.append(path)
        if raw is not None:
            save_png(out / "raw" / IMAGE_NAME.format(i), raw[j], overwrite=True)
        if with_trajectory:
            stem = IMAGE_NAME.format(i)[:-4]
            save_png(out / "trajectory" / f"{stem}_xt.png", make_grid(got.traj_xt[-1][j], ncol=len(got.traj_t)),
                     overwrite=True)
            save_png(out / "trajectory" / f"{stem}_x0.png", make_grid(got.traj_x0[-1][j], ncol=len(got.traj_t)),
                     overwrite=True)


def _summary(run: RunModel, run_dir: str | Path, idx: list[int], got: _Produced, *, sampler: str, steps: int,
             eta: float, temperature: float, estimate: str, spacing: str, decode: str, seed: int, use_ema: bool,
             refiner: str | Path | None,
             num: int, batch_size: int, device: torch.device, seconds: float) -> dict:
    """What ``samples.json`` holds."""
    h, w, c = _latent_shape(run)
    H, W = h * run.codec.patch_size, w * run.codec.patch_size
    return {
        "format": "mbldm-samples",
        "run": str(Path(run_dir).resolve()),
        "variant": run.variant,
        "sampler": sampler,
        "steps": steps,
        "timesteps": int(run.config["timesteps"]),
        "eta": float(eta) if sampler == "ddim" else None,
        "temperature": float(temperature) if run.variant == "categorical" else None,
        "estimate": estimate if run.variant == "categorical" else None,
        "spacing": spacing if sampler == "ddim" else None,
        "decode": decode,
        "seed": int(seed),
        "seed_rule": "image i uses torch.Generator('cpu').manual_seed(seed + i)",
        "use_ema": bool(use_ema),
        "refiner": str(Path(refiner).resolve()) if refiner is not None else None,
        "num": int(num),
        "count": len(idx),
        "indices": idx,
        "image_size": [H, W],
        "latent_shape": [h, w, c],
        "num_codewords": int(run.config["num_codewords"]),
        "files": IMAGE_NAME.replace("{:06d}", "{index:06d}"),
        "grid": GRID_FILE,
        "grid_images": len(got.grid),
        "trajectory_t": got.traj_t,
        "batch_size": int(batch_size),
        "device": str(device),
        "seconds": round(seconds, 3),
    }


def _result(summary: dict, idx: list[int], got: _Produced, out: Path | None, shard: tuple[int, int] | None, *,
            with_raw: bool, with_trajectory: bool) -> dict:
    """Write the summary (and the grid, unless this is a shard) and return :func:`sample`'s result."""
    from mbldm.io.atomic import write_json
    from mbldm.io.images import save_png

    result: dict = {"summary": summary, "indices": idx, "latents": np.concatenate(got.latents)}
    if out is not None and shard is not None:
        summary["shard"] = [int(shard[0]), int(shard[1])]
        write_json(out / SHARD_SUMMARY_FILE.format(*shard), summary)
        result.update(files=got.files, grid=None)
    elif out is not None:
        grid_path = out / GRID_FILE
        save_png(grid_path, make_grid(np.stack(got.grid)), overwrite=True)
        write_json(out / SUMMARY_FILE, summary)
        result.update(files=got.files, grid=grid_path)
    else:
        result["images"] = np.concatenate(got.images)
        if with_raw:
            result["raw_images"] = np.concatenate(got.raw)
    if with_trajectory:
        result["trajectory"] = {"t": got.traj_t, "x_t": np.concatenate(got.traj_xt), "x0": np.concatenate(got.traj_x0)}
    return result
