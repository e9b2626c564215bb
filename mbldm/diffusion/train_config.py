"""Configuration of a training run: :class:`TrainConfig`, how flags, a ``--config`` file and a resumed run's
``RUN/config.json`` merge into one (:func:`resolve_config`), and reading / checking that saved config.

``SHAPE_FIELDS`` define the model (a resumed run must keep them), ``INVOCATION_FIELDS`` describe one invocation
(never inherited from a saved config), ``DERIVED_FIELDS`` are the keys :func:`mbldm.diffusion.training.train`
writes to RUN/config.json besides the TrainConfig fields. No torch: importing this module is cheap.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TrainConfig",
    "VARIANTS",
    "SHAPE_FIELDS",
    "INVOCATION_FIELDS",
    "DERIVED_FIELDS",
    "RUN_FORMAT",
    "RUN_VERSION",
    "resolve_config",
    "read_run_config",
    "check_shape_fields",
    "check_resumed_run",
    "with_version1_values",
    "VERSION1_VALUES",
]

VARIANTS = ("continuous", "categorical")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
PREDICTIONS = ("epsilon", "x0", "v")
HEADS = ("logits", "logistic")
PRECONDITIONS = ("none", "edm")
SOFT_SAMPLES = ("gumbel", "straight-through", "softmax")
SELF_CONDITION_ESTIMATES = ("mean", "gumbel")
# Fields that define the model (its shapes or the meaning of its inputs): a resumed run must keep them.
SHAPE_FIELDS = ("variant", "preset", "self_condition", "timesteps", "beta_schedule", "prediction", "head",
                "mixtures", "precondition", "sigma_data", "self_condition_estimate")
# Fields that describe one invocation: never inherited from a run's saved config.json.
INVOCATION_FIELDS = ("resume", "config", "max_minutes", "max_cpu_minutes", "progress")
# Values of the fields added in run format version 2 that reproduce what a version-1 run (written before they
# existed) did: the paper's parameterisation and objective. A saved config.json missing them gets these.
VERSION1_VALUES = {"prediction": "epsilon", "head": "logits", "mixtures": 10, "precondition": "none",
                   "sigma_data": 0.5, "nll_weight": 0.0, "eq24_weight": 1.0, "soft_sample": "gumbel",
                   "self_condition_estimate": "gumbel"}
# Keys written to RUN/config.json besides the TrainConfig fields (computed from the store and the model).
DERIVED_FIELDS = ("latent_shape", "num_codewords", "codebook_sizes", "codec_spec", "resolution", "in_channels",
                  "out_channels", "num_parameters", "mixed_precision_resolved", "num_processes", "format", "version")
RUN_FORMAT = "mbldm-train-run"
RUN_VERSION = 2


@dataclass
class TrainConfig:
    """Resolved configuration of a training run (all ``mbldm train`` flags; saved as RUN/config.json).

    Required: ``latents`` (a latent store, contract 5), ``out`` (the run directory), ``steps``.
    ``batch_size`` is global (split evenly across processes). ``lr`` is AdamW's peak rate, reached after
    ``lr_warmup_steps`` (``lr_schedule`` names a diffusers schedule). ``ema_decay`` is the EMA's final decay,
    approached with diffusers' warm-up ``1 - (1 + n)^-ema_power``. ``mixed_precision`` "auto" is bf16 (or fp16)
    on CUDA and "no" on CPU. ``max_minutes`` is a wall-clock budget for this invocation: when exceeded the run
    stops cleanly with a checkpoint and an export. ``resume`` is None, "latest" or a checkpoint folder;
    ``config`` a JSON file of field values loaded before the command-line flags (see :func:`resolve_config`).
    """

    latents: str | None = None
    out: str | None = None
    steps: int | None = None
    preset: str = "small"
    variant: str = "continuous"
    batch_size: int = 64
    lr: float = 1e-4
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_power: float = 0.75
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    mixed_precision: str = "auto"
    tau: float = 1.0
    min_snr_gamma: float | None = 5.0
    prediction: str = "epsilon"
    head: str = "logistic"
    mixtures: int = 10
    precondition: str = "none"
    sigma_data: float = 0.5
    nll_weight: float = 1.0
    eq24_weight: float = 0.0
    soft_sample: str = "gumbel"
    self_condition_estimate: str = "mean"
    self_condition: bool = True
    timesteps: int = 1000
    beta_schedule: str = "linear"
    seed: int = 0
    max_minutes: float | None = None
    max_cpu_minutes: float | None = None
    num_workers: int = 0
    resume: str | None = None
    config: str | None = None
    progress: bool = True

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check values; return self.

        Raises:
            ValueError: a missing required field or a value out of range (naming the flag).
        """
        for name in ("latents", "out", "steps"):
            if getattr(self, name) is None:
                raise ValueError(f"train: --{name.replace('_', '-')} is required (on the command line or in --config)")
        checks = [
            (self.variant in VARIANTS, f"--variant must be one of {VARIANTS}, got {self.variant!r}"),
            (self.mixed_precision in MIXED_PRECISION,
             f"--mixed-precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (isinstance(self.steps, int) and self.steps >= 1, f"--steps must be an integer >= 1, got {self.steps!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"--batch-size must be an integer >= 1, got {self.batch_size!r}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/--adam-beta2 must be in [0, 1)"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (0 <= self.ema_decay <= 1, f"--ema-decay must be in [0, 1], got {self.ema_decay}"),
            (self.ema_power > 0, f"--ema-power must be > 0, got {self.ema_power}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.tau > 0, f"--tau must be > 0, got {self.tau}"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0,
             f"--min-snr-gamma must be > 0, got {self.min_snr_gamma}"),
            (self.timesteps >= 2, f"--timesteps must be >= 2, got {self.timesteps}"),
            (self.max_minutes is None or self.max_minutes > 0, f"--max-minutes must be > 0, got {self.max_minutes}"),
            (self.max_cpu_minutes is None or self.max_cpu_minutes > 0,
             f"--max-cpu-minutes must be > 0, got {self.max_cpu_minutes}"),
            (self.prediction in PREDICTIONS, f"--prediction must be one of {PREDICTIONS}, got {self.prediction!r}"),
            (self.head in HEADS, f"--head must be one of {HEADS}, got {self.head!r}"),
            (isinstance(self.mixtures, int) and self.mixtures >= 1,
             f"--mixtures must be an integer >= 1, got {self.mixtures!r}"),
            (self.precondition in PRECONDITIONS,
             f"--precondition must be one of {PRECONDITIONS}, got {self.precondition!r}"),
            (self.sigma_data > 0, f"--sigma-data must be > 0, got {self.sigma_data}"),
            (self.nll_weight >= 0 and self.eq24_weight >= 0 and self.nll_weight + self.eq24_weight > 0,
             f"--nll-weight and --eq24-weight must be >= 0 and not both 0, got {self.nll_weight}, "
             f"{self.eq24_weight}"),
            (self.soft_sample in SOFT_SAMPLES, f"--soft-sample must be one of {SOFT_SAMPLES}, got {self.soft_sample!r}"),
            (self.self_condition_estimate in SELF_CONDITION_ESTIMATES,
             f"--self-condition-estimate must be one of {SELF_CONDITION_ESTIMATES}, got "
             f"{self.self_condition_estimate!r}"),
            (not (self.variant == "continuous" and self.precondition == "edm" and self.prediction != "x0"),
             "--precondition edm of the continuous variant needs --prediction x0 (EDM's F gives z_0); use "
             "--precondition none with epsilon or v"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train: {msg}")
        return self


def _config_values(raw: Any, file: Path) -> dict:
    """TrainConfig field values of a JSON dict (derived keys dropped; unknown keys raise)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object of training settings")
    known = set(TrainConfig.field_names())
    unknown = sorted(set(raw) - known - set(DERIVED_FIELDS))
    if unknown:
        raise ValueError(f"{file}: unknown training setting(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in raw.items() if k in known}


def _read_json_file(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def with_version1_values(cfg: dict) -> dict:
    """A saved run config with the fields it predates filled in (``VERSION1_VALUES``): on load, the artifact's own
    settings win, and settings it never had mean what the code did when it was written."""
    return {**VERSION1_VALUES, **cfg}


def read_run_config(run: str | os.PathLike) -> dict:
    """The dict of ``RUN/config.json`` (TrainConfig fields + derived fields), fields added after the run was written
    filled with their version-1 values (:func:`with_version1_values`).

    Raises:
        FileNotFoundError: no config.json.  ValueError: invalid JSON or not a training run's config.
    """
    file = Path(run) / "config.json"
    raw = _read_json_file(file)
    _config_values(raw, file)
    return with_version1_values(raw)


def check_shape_fields(given: dict, saved: dict, run_file: Path, source: str) -> None:
    """Refuse ``given`` values of ``SHAPE_FIELDS`` that differ from the ``saved`` ones of a resumed run."""
    for name in SHAPE_FIELDS:
        if name in given and name in saved and given[name] != saved[name]:
            raise ValueError(
                f"{run_file}: the run was trained with {name}={saved[name]!r} but {source} gives "
                f"{name}={given[name]!r}; a resumed run cannot change {name} (drop the flag or use a new --out)")


def resolve_config(flags: dict[str, Any]) -> TrainConfig:
    """Merge defaults, the run's own config.json (when resuming), a ``--config`` JSON file and explicit flags.

    Precedence, lowest first: TrainConfig defaults < RUN/config.json (only with ``resume`` set; fields in
    ``INVOCATION_FIELDS`` are not inherited) < the ``config`` file < ``flags``. ``flags`` must hold only the
    values the user gave explicitly (None values are ignored).

    Raises:
        ValueError: unknown keys, or a value from the file/flags that conflicts with the resumed run's
            ``SHAPE_FIELDS`` (e.g. another --preset), or invalid values (see :meth:`TrainConfig.validate`).
        FileNotFoundError: a missing ``config`` file.
    """
    known = set(TrainConfig.field_names())
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"train: unknown setting(s) {unknown}")
    explicit = {k: v for k, v in flags.items() if v is not None}
    if explicit.get("config"):
        file = Path(explicit["config"])
        explicit = {**_config_values(_read_json_file(file), file), **explicit}
    base: dict[str, Any] = {}
    out = explicit.get("out")
    if explicit.get("resume") and out and (Path(out) / "config.json").is_file():
        saved = _config_values(read_run_config(out), Path(out) / "config.json")
        check_shape_fields(explicit, saved, Path(out) / "config.json", "the command line / --config")
        base = {k: v for k, v in saved.items() if k not in INVOCATION_FIELDS}
    return TrainConfig(**{**base, **explicit}).validate()


def check_resumed_run(config: TrainConfig, run: Path, derived: dict) -> None:
    """When ``run`` already holds a config.json (resuming), check that the model's shape does not change.

    Raises:
        ValueError: a ``SHAPE_FIELDS`` value of ``config``, or the store's ``latent_shape`` / ``num_codewords``
            in ``derived``, differs from the saved run's.
    """
    if not (run / "config.json").is_file():
        return
    saved = read_run_config(run)
    check_shape_fields(config.to_dict(), saved, run / "config.json", "this configuration")
    for key in ("latent_shape", "num_codewords"):
        if key in saved and saved[key] != derived[key]:
            raise ValueError(f"{run / 'config.json'}: the run was trained on latents with {key}={saved[key]}, "
                             f"the store {config.latents} has {key}={derived[key]}")
