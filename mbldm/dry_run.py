"""Dry run of a training configuration (``mbldm train --config FILE --dry-run``): size a job before launching it.

Prints the U-Net's parameter count, the latent shape, a memory estimate per process and the measured time of a
few real training steps, without the dataset or the latent store: when ``latents`` is not a complete store, a
synthetic store of random indices with the configuration's declared ``latent_shape`` / ``num_codewords`` stands in
for it, and the categorical variant gets a codec of the declared ``codec_spec`` with random codebooks (the
decode's cost depends on the shapes only). The steps are those of :func:`mbldm.diffusion.training.train` itself
(same model, losses, self-conditioning, optimizer, EMA, Accelerate setup), run in a temporary folder that is
deleted afterwards; no checkpoint is written.

Memory estimate (per process, fp32 master weights as :func:`~mbldm.diffusion.training.train` keeps them)::

    static      = 20 B x P   (weights 4, gradients 4, AdamW moments 8, EMA copy 4; P parameters)
                + 4 B x P    with several processes (DDP gradient buckets)
    activations = A x b      (A: bytes saved for the backward pass per image, measured on the timed steps
                              with ``torch.autograd.graph.saved_tensors_hooks``; b: images per process)

The allocator's transient buffers (the largest temporary of a layer, workspace) come on top, typically 10-30 %.
On CUDA the measured peak (``torch.cuda.max_memory_allocated``) is reported as well. Activations are measured in
the precision of the dry run (fp32 on a CPU); under bf16/fp16 autocast most of them take half the bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mbldm.diffusion.train_config import TrainConfig

__all__ = [
    "STATIC_BYTES_PER_PARAM",
    "LatentGeometry",
    "latent_geometry",
    "synthetic_codec",
    "SyntheticLatentStore",
    "DryRunReport",
    "dry_run",
]

#: fp32 weights + gradients + AdamW exp_avg and exp_avg_sq + EMA shadow weights.
STATIC_BYTES_PER_PARAM = 4 + 4 + 8 + 4
#: DDP keeps its gradient buckets besides ``param.grad`` when there is more than one process.
DDP_BYTES_PER_PARAM = 4
#: Process counts of the per-process memory / time table.
TABLE_PROCESSES = (1, 2, 4, 8)


class _StopDryRun(Exception):
    """Raised by the step callback to end the training loop after the timed steps."""


# ----------------------------------------------------------------------------------------------- latent geometry

@dataclass(frozen=True)
class LatentGeometry:
    """What the model's shapes depend on: latent (h, w, c), K, the codec spec and the image side R.

    ``source`` is "store" (read from a complete latent store) or "config" (declared in the --config JSON).
    """

    latent_shape: tuple[int, int, int]
    num_codewords: int
    codec_spec: str | None
    resolution: int | None
    source: str
    dtype: str = "uint8"

    @property
    def patch_size(self) -> int | None:
        """s = R / h (None when R is unknown)."""
        return None if self.resolution is None else self.resolution // self.latent_shape[0]

    @property
    def store_bytes_per_image(self) -> int:
        """h * w * c * (1 or 2) bytes: one image in the latent store (index dtype uint8 for K <= 256)."""
        h, w, c = self.latent_shape
        return h * w * c * np.dtype(self.dtype).itemsize


def _declared_geometry(config: TrainConfig) -> dict:
    """``latent_shape``, ``num_codewords``, ``codec_spec``, ``resolution`` from the raw --config JSON (or {})."""
    if not config.config:
        return {}
    file = Path(config.config)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: cannot read the configuration ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return {k: raw[k] for k in ("latent_shape", "num_codewords", "codec_spec", "resolution") if k in raw}


def latent_geometry(config: TrainConfig) -> LatentGeometry:
    """The latent geometry of a run: from ``config.latents`` when it is a complete store, else from the
    ``latent_shape`` (``[h, w, c]``), ``num_codewords`` (K), ``codec_spec`` and ``resolution`` keys of the
    ``--config`` JSON (keys that :func:`~mbldm.diffusion.train_config.resolve_config` accepts and ignores).

    Raises:
        ValueError: no store and no declared shape; a declared shape that is malformed, disagrees with the store
            or with ``codec_spec`` (c, K) and ``resolution`` (R divisible by h, s = R / h).
    """
    from mbldm.codec.spec import parse_spec

    declared = _declared_geometry(config)
    where = config.config or "the configuration"
    store_json = Path(config.latents) / "store.json" if config.latents else None
    if store_json is not None and store_json.is_file():
        from mbldm.data.latent_store import LatentStore

        store = LatentStore(config.latents)
        geom = LatentGeometry(tuple(store.latent_shape), store.num_codewords, store.spec, store.resolution, "store",
                              store.dtype.name)
        for key, have in (("latent_shape", list(geom.latent_shape)), ("num_codewords", geom.num_codewords)):
            if key in declared and declared[key] != have:
                raise ValueError(f"{where}: declares {key}={declared[key]} but the store {config.latents} has {have}")
        return geom
    shape, K = declared.get("latent_shape"), declared.get("num_codewords")
    if shape is None or K is None:
        raise ValueError(f"dry run: {config.latents} is not a latent store and {where} declares no latent_shape / "
                         f"num_codewords; add e.g. \"latent_shape\": [64, 64, 6], \"num_codewords\": 256")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"{where}: latent_shape must be [h, w, c] positive integers, got {shape!r}")
    if not (isinstance(K, int) and 2 <= K <= 65536):
        raise ValueError(f"{where}: num_codewords must be an integer in [2, 65536], got {K!r}")
    spec, R = declared.get("codec_spec"), declared.get("resolution")
    if R is not None and (not isinstance(R, int) or R % shape[0] or R % shape[1] or R // shape[0] != R // shape[1]):
        raise ValueError(f"{where}: resolution {R!r} is not the same multiple of latent h={shape[0]} and w={shape[1]}")
    if spec is not None and R is not None:
        parsed = parse_spec(spec, R // shape[0])
        if parsed.latent_channels != shape[2] or parsed.max_k != K:
            raise ValueError(f"{where}: codec_spec {spec} gives c={parsed.latent_channels}, K={parsed.max_k} but "
                             f"latent_shape/num_codewords say c={shape[2]}, K={K}")
    return LatentGeometry(tuple(shape), K, spec, R, "config", "uint8" if K <= 256 else "uint16")


# ----------------------------------------------------------------------------------------------- synthetic stand-ins

def synthetic_codec(spec: str, patch_size: int, seed: int = 0):
    """A :class:`~mbldm.codec.Codec` of ``spec`` with random codebooks (uniform in [0, 255]) and, for OPQ, the
    identity rotation: the shapes and costs of ``decode_torch`` / ``decode_soft`` of a fitted codec, without data.
    Not a usable codec (its images are noise); its config says so (``training["synthetic"]``).
    """
    from mbldm.codec.codebooks import TrainedQuantizer
    from mbldm.codec.codec import Codec, CodecConfig
    from mbldm.codec.spec import parse_spec

    parsed = parse_spec(spec, patch_size)
    rng = np.random.default_rng(seed)
    d = patch_size * patch_size
    quantizers, perms = [], []
    for cq in parsed.channels:
        dsub = d if parsed.method == "RQ" else d // cq.m
        scale = 255.0 / (cq.m if parsed.method == "RQ" else 1)  # RQ sums its M codewords
        codebooks = rng.uniform(0, scale, (cq.m, cq.k, dsub)).astype(np.float32)
        rotation = np.eye(d, dtype=np.float32) if parsed.method == "OPQ" else None
        quantizers.append(TrainedQuantizer(parsed.method, codebooks, rotation))
        perms.append(np.tile(np.arange(cq.k, dtype=np.int64), (cq.m, 1)))
    config = CodecConfig(spec=parsed.name, patch_size=patch_size, latent_channels=parsed.latent_channels,
                         num_codewords=parsed.max_k, index_dtype="uint8" if parsed.max_k <= 256 else "uint16",
                         training={"synthetic": "random codebooks for an mbldm dry run; not a fitted codec"})
    return Codec(config, quantizers, perms)


class SyntheticLatentStore:
    """Stand-in for :class:`~mbldm.data.latent_store.LatentStore`: ``count`` latents of uniformly random indices.

    Latent i is drawn from ``np.random.default_rng((seed, i))``: integers in [0, K), shape (h, w, c), dtype uint8
    (K <= 256) or uint16. ``codec_dir`` is copied by training into the run folder (a synthetic codec, or an empty
    folder for the continuous variant, which never decodes).
    """

    def __init__(self, geometry: LatentGeometry, codec_dir: Path, count: int = 4096, seed: int = 0):
        self.latent_shape = tuple(int(v) for v in geometry.latent_shape)
        self.num_codewords = int(geometry.num_codewords)
        self.spec = geometry.codec_spec or "synthetic"
        self.resolution = geometry.resolution
        self.codec_dir = Path(codec_dir)
        self.dtype = np.dtype(geometry.dtype)
        self._count, self._seed = int(count), int(seed)

    def __len__(self) -> int:
        return self._count

    def batch(self, indices) -> np.ndarray:
        """(B, h, w, c) random indices of the store dtype, one generator per latent index."""
        out = np.empty((len(indices), *self.latent_shape), self.dtype)
        for b, i in enumerate(indices):
            out[b] = np.random.default_rng((self._seed, int(i))).integers(0, self.num_codewords, self.latent_shape)
        return out


# ----------------------------------------------------------------------------------------------- measurement

class _SavedTensorMeter:
    """Bytes of the tensors autograd saves for the backward pass, per step (unique storages; parameters excluded).

    Used as ``torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)``; ``step_done()`` closes a step.
    """

    def __init__(self) -> None:
        self.current: dict[tuple, int] = {}
        self.per_step: list[int] = []

    def pack(self, t):
        if not (t.is_leaf and t.requires_grad):  # a parameter is stored once, not per step
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            self.current[key] = max(self.current.get(key, 0), storage.nbytes())
        return t

    @staticmethod
    def unpack(t):
        return t

    def step_done(self) -> None:
        self.per_step.append(sum(self.current.values()))
        self.current = {}


@dataclass
class DryRunReport:
    """Result of :func:`dry_run` (all byte counts per process; times measured on this machine)."""

    config_file: str | None
    latents: str
    geometry: LatentGeometry
    preset: str
    variant: str
    in_channels: int
    out_channels: int
    num_parameters: int
    batch_size: int  # the configuration's global batch
    steps: int  # the configuration's total steps
    mixed_precision: str  # the configuration's setting
    mixed_precision_here: str  # what the dry run ran with
    device: str
    num_processes: int  # processes of the dry run itself
    measured_batch: int  # global batch of the timed steps
    timed_steps: int
    seconds_per_step: float
    self_conditioned_steps: int  # timed steps that ran the extra self-conditioning forward
    activation_bytes: int  # saved-for-backward bytes of one timed step, per process
    cuda_peak_bytes: int | None = None
    table: list[dict] = field(default_factory=list)
    batch_note: str | None = None  # why the timed batch differs from the configuration's, when it does

    @property
    def local_measured_batch(self) -> int:
        return self.measured_batch // self.num_processes

    @property
    def activation_bytes_per_image(self) -> float:
        return self.activation_bytes / self.local_measured_batch

    @property
    def seconds_per_image(self) -> float:
        """Step seconds per image of this process's batch (the step cost grows ~linearly with the batch)."""
        return self.seconds_per_step / self.local_measured_batch

    def memory_estimate(self, local_batch: int, num_processes: int = 1) -> int:
        """Estimated bytes of one process holding ``local_batch`` images (module docstring)."""
        static = STATIC_BYTES_PER_PARAM * self.num_parameters
        if num_processes > 1:
            static += DDP_BYTES_PER_PARAM * self.num_parameters
        return int(static + self.activation_bytes_per_image * local_batch)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["geometry"] = {**dataclasses.asdict(self.geometry),
                         "store_bytes_per_image": self.geometry.store_bytes_per_image}
        d.update(seconds_per_image=self.seconds_per_image, activation_bytes_per_image=self.activation_bytes_per_image,
                 static_bytes=STATIC_BYTES_PER_PARAM * self.num_parameters)
        return d

    def lines(self) -> list[str]:
        """Human-readable report, one line per item."""
        g = self.geometry
        h, w, c = g.latent_shape
        src = (f"{self.latents} (latent store)" if g.source == "store" else
               f"{self.latents} not used: synthetic random indices with the configuration's latent_shape")
        image = f", {g.resolution} x {g.resolution} images" if g.resolution else ""
        spec = f", {g.codec_spec}" if g.codec_spec else ""
        static = STATIC_BYTES_PER_PARAM * self.num_parameters
        steps_s = 1.0 / self.seconds_per_step
        full = self.steps * self.batch_size * self.seconds_per_image
        config = f" --config {shlex.quote(self.config_file)}" if self.config_file else ""
        out = [
            f"mbldm train{config} --dry-run",
            f"  latents      {src}",
            f"  latent       {h} x {w} x {c}, K = {g.num_codewords}{spec}{image}; "
            f"{_size(g.store_bytes_per_image)} per image in the store ({g.dtype})",
            f"  model        preset {self.preset}, {self.variant}, {self.in_channels} -> {self.out_channels} channels, "
            f"{self.num_parameters:,} parameters ({_size(4 * self.num_parameters)} in fp32)",
            f"  run          global batch {self.batch_size}, {self.steps:,} steps, mixed precision "
            f"{self.mixed_precision} (this dry run: {self.mixed_precision_here} on {self.device})",
            f"  measured     {self.timed_steps} step(s) after 1 warm-up, global batch {self.measured_batch} on "
            f"{self.num_processes} process(es): {self.seconds_per_step:.3f} s/step ({steps_s:.3f} steps/s), "
            f"{self.seconds_per_image:.3f} s per image; {self.self_conditioned_steps} of them with the "
            f"self-conditioning forward",
            *([f"  note         {self.batch_note}"] if self.batch_note else []),
            f"  memory       static {_size(static)} (20 B/parameter: weights, gradients, AdamW, EMA) + activations "
            f"{_size(self.activation_bytes_per_image)} per image (saved for backward, measured)"
            + (f"; CUDA peak {_size(self.cuda_peak_bytes)} at batch {self.local_measured_batch}"
               if self.cuda_peak_bytes is not None else ""),
            "  per process  processes  local batch  memory (est.)  s/step here (est.)",
        ]
        for row in self.table:
            out.append(f"               {row['num_processes']:>9}  {row['local_batch']:>11}  "
                       f"{_size(row['memory_bytes']):>13}  {row['seconds_per_step']:>18.3f}")
        out.append(f"  projected    {self.steps:,} steps x {self.batch_size} images on this device: "
                   f"{full / 3600:,.1f} h ({full / 86400:,.1f} days) for one process; see docs/scaling.md "
                   f"to scale to other hardware")
        return out


def _size(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def dry_run(config: TrainConfig, steps: int = 3, batch_size: int | None = None, progress: bool = False,
            announce: Callable[[str], None] | None = None) -> DryRunReport:
    """Time ``steps`` real training steps of ``config`` on a synthetic (or the real) store; estimate memory.

    Args:
        config: a resolved TrainConfig (``resolve_config``); ``latents`` need not exist (see the module docstring).
        steps: steps to run, >= 2: the first is a warm-up, the others are timed.
        batch_size: global batch of the timed steps. Default: the configuration's on CUDA; on a CPU one image per
            process (a step of the paper preset at batch 64 takes minutes there), which the report notes
            (``batch_note``). The per-image cost and memory are extrapolated linearly to the configuration's
            batch in the report's table.
        progress: show the training progress bar.
        announce: called with one line ("dry run: timing N steps at global batch B on DEVICE ...") just before
            the steps run, e.g. to tell a user at a terminal what the silence is.

    Returns:
        A :class:`DryRunReport` (print ``"\\n".join(report.lines())``).
    Raises:
        ValueError: bad ``steps`` / ``batch_size``, or no latent geometry (:func:`latent_geometry`);
        errors of :func:`~mbldm.diffusion.training.train` (e.g. a latent side the preset cannot downsample).
    """
    import torch

    from mbldm.diffusion.training import train

    config = config.validate()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"dry run: steps must be an integer >= 2 (one warm-up + timed steps), got {steps!r}")
    cuda = torch.cuda.is_available()
    batch_note = None
    if batch_size is None and not cuda:
        from mbldm.distributed import num_processes

        batch = min(config.batch_size, num_processes())  # one image per process
        if batch != config.batch_size:
            batch_note = (f"CPU default: timed at global batch {batch} instead of the configuration's "
                          f"{config.batch_size} (--dry-run-batch B to time another batch); time and memory are "
                          f"extrapolated per image")
    else:
        batch = config.batch_size if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"dry run: batch size must be an integer >= 1, got {batch!r}")
    geometry = latent_geometry(config)
    is_categorical = config.variant == "categorical"
    if is_categorical and geometry.source == "config" and (geometry.codec_spec is None or geometry.resolution is None):
        raise ValueError(f"dry run: the categorical variant decodes latents; {config.config or 'the configuration'} "
                         f"must declare codec_spec and resolution (e.g. \"OPQ-32-8-8\", 512)")

    with tempfile.TemporaryDirectory(prefix="mbldm-dry-run-") as tmp:
        tmp = Path(tmp)
        store = None
        if geometry.source == "config":
            codec_dir = tmp / "codec"
            if is_categorical:
                synthetic_codec(geometry.codec_spec, geometry.patch_size, seed=config.seed).save(codec_dir)
            else:
                codec_dir.mkdir()
            store = SyntheticLatentStore(geometry, codec_dir, seed=config.seed)
        never = max(config.steps, steps) + 1
        trial = dataclasses.replace(config, out=str(tmp / "run"), batch_size=batch, steps=max(config.steps, steps),
                                    resume=None, config=None, max_minutes=None, checkpoint_every=never,
                                    log_every=never, progress=progress)
        meter = _SavedTensorMeter()
        times: list[float] = []

        def on_step(done: int) -> None:
            meter.step_done()
            if cuda:
                torch.cuda.synchronize()
                if done == 1:
                    torch.cuda.reset_peak_memory_stats()
            times.append(time.perf_counter())
            if done >= steps:
                raise _StopDryRun

        if announce is not None:
            hint = "; --dry-run-batch 1 for a quick estimate" if batch > 1 else ""
            announce(f"dry run: timing {steps} steps (1 warm-up) at global batch {batch} on "
                     f"{'cuda' if cuda else 'cpu'} (Ctrl-C to stop{hint})...")
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            try:
                train(trial, store=store, on_step=on_step)
            except _StopDryRun:
                pass
        run_cfg = json.loads((tmp / "run" / "config.json").read_text(encoding="utf-8"))

    from mbldm.diffusion.batch_stream import use_self_condition

    timed = len(times) - 1
    n_proc = int(run_cfg["num_processes"])
    report = DryRunReport(
        config_file=config.config, latents=str(config.latents), geometry=geometry, preset=config.preset,
        variant=config.variant, in_channels=int(run_cfg["in_channels"]), out_channels=int(run_cfg["out_channels"]),
        num_parameters=int(run_cfg["num_parameters"]), batch_size=config.batch_size, steps=config.steps,
        mixed_precision=config.mixed_precision, mixed_precision_here=run_cfg["mixed_precision_resolved"],
        device="cuda" if cuda else "cpu", num_processes=n_proc, measured_batch=batch, timed_steps=timed,
        seconds_per_step=(times[-1] - times[0]) / timed,
        self_conditioned_steps=sum(config.self_condition and use_self_condition(config.seed, s)
                                   for s in range(1, steps)),
        activation_bytes=max(meter.per_step),
        cuda_peak_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None, batch_note=batch_note,
    )
    for n in TABLE_PROCESSES:
        if config.batch_size % n == 0:
            b = config.batch_size // n
            report.table.append({"num_processes": n, "local_batch": b, "memory_bytes": report.memory_estimate(b, n),
                                 "seconds_per_step": report.seconds_per_image * b})
    return report
