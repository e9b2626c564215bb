"""``mbldm train``: train the latent diffusion U-Net on a latent store (continuous or categorical variant).

Runs as one CPU process, on one GPU, or as several processes with ``accelerate launch --multi_gpu --num_processes N
-m mbldm train ...`` (GPUs, or CPU processes on a machine without CUDA) or ``accelerate launch --cpu --num_processes
N -m mbldm train ...`` (CPU processes; see :mod:`mbldm.distributed`).
Only flags given on the command line override the ``--config`` file and, with ``--resume``, the run's own
``RUN/config.json``; everything else keeps the run's (or the default) value. ``--dry-run`` sizes a job without
training (``mbldm train --config configs/lsun_church_512_continuous.json --dry-run``; see docs/scaling.md).
"""
from __future__ import annotations

import argparse
import os
import sys

#: Denoiser presets of ``mbldm.diffusion.models.UNET_PRESETS`` (all but "refiner", the refiner's own) with their
#: parameter counts for OPQ-32-8-8 latents, continuous variant (12 -> 6 channels). Kept here rather than computed
#: so that ``mbldm --help`` does not import torch and diffusers; a test checks the keys against UNET_PRESETS.
PRESET_SIZES: dict[str, str] = {"paper": "48.5M, §4.2.1", "small": "4.2M", "cpu": "1.1M", "tiny": "0.17M, tests only"}

_PRESET_HELP = "U-Net preset (parameters): " + ", ".join(f"{name} ({size})" for name, size in PRESET_SIZES.items())

# (flag, type, metavar, help); the destination is the TrainConfig field of the same name (dashes -> underscores).
_VALUE_FLAGS: tuple[tuple[str, object, str, str], ...] = (
    ("--latents", str, "STORE", "latent store folder (`mbldm latents build`); required"),
    ("--out", str, "RUN", "run directory (config.json, codec/, metrics.jsonl, checkpoints/, model/); required"),
    ("--steps", int, "N", "total optimizer steps of the run (a resumed run continues up to N); required"),
    ("--preset", str, "P", _PRESET_HELP),
    ("--variant", str, "V", "continuous (DDPM on the ordered indices, Eq. 4; §3.2) or categorical (the categorical "
     "reverse process, Eq. 20-25; §3.2.2)"),
    ("--batch-size", int, "B", "global batch size (split across processes)"),
    ("--lr", float, "LR", "AdamW peak learning rate"),
    ("--lr-schedule", str, "NAME", "constant | constant_with_warmup | linear | cosine"),
    ("--lr-warmup-steps", int, "N", "linear LR warm-up steps"),
    ("--adam-beta1", float, "B1", "AdamW beta1"),
    ("--adam-beta2", float, "B2", "AdamW beta2"),
    ("--adam-eps", float, "EPS", "AdamW epsilon"),
    ("--weight-decay", float, "WD", "AdamW weight decay"),
    ("--grad-clip", float, "NORM", "gradient clipping max norm"),
    ("--ema-decay", float, "D", "final EMA decay"),
    ("--ema-power", float, "P", "EMA warm-up power: decay = 1 - (1 + step)^-P, capped at --ema-decay"),
    ("--checkpoint-every", int, "N", "write a checkpoint (and export RUN/model) every N steps"),
    ("--keep-checkpoints", int, "N", "keep the newest N checkpoints"),
    ("--log-every", int, "N", "append a metrics.jsonl line every N steps"),
    ("--mixed-precision", str, "MP", "auto | no | fp16 | bf16 (auto: bf16/fp16 on CUDA, no on CPU)"),
    ("--tau", float, "TAU", "Gumbel-softmax temperature (categorical, Eq. 20)"),
    ("--min-snr-gamma", float, "G", "min-SNR-gamma loss weighting gamma (continuous loss and the Eq. 24 terms)"),
    ("--prediction", str, "P", "continuous output: epsilon (Eq. 4) | x0 | v"),
    ("--head", str, "H", "categorical output: logits (c*K free logits, the paper's head) | logistic (a "
     "discretised logistic mixture over the ordered codebook, c*3L channels)"),
    ("--mixtures", int, "L", "components of the logistic head"),
    ("--precondition", str, "P", "none | edm (EDM's c_skip/c_out around z_t: continuous x0 output (needs "
     "--prediction x0), logistic means/scales, or the Gaussian evidence of z_t added to the logits)"),
    ("--sigma-data", float, "S", "std of the clean latents in unit space, for --precondition edm"),
    ("--nll-weight", float, "W", "categorical: weight of the negative log-likelihood of the true index "
     "(auxiliary cross-entropy)"),
    ("--eq24-weight", float, "W", "categorical: weight of the paper's Eq. 24 (image + eps terms)"),
    ("--soft-sample", str, "S", "categorical Eq. 24 decode weights: gumbel (Eq. 20) | straight-through | softmax"),
    ("--self-condition-estimate", str, "E", "categorical self-conditioning input: mean (expected index under "
     "the predicted distribution) | gumbel (expected index under Eq. 20 weights)"),
    ("--timesteps", int, "T", "diffusion timesteps"),
    ("--beta-schedule", str, "NAME", "linear (paper: 1e-4 .. 2e-2) or cosine"),
    ("--seed", int, "S", "seed of the model init, batches, timesteps and noise"),
    ("--max-minutes", float, "M", "wall-clock budget: stop cleanly with a checkpoint and an export after M minutes"),
    ("--max-cpu-minutes", float, "M", "CPU-time budget of this process (user + system, all threads): stop cleanly "
     "after M CPU-minutes"),
    ("--num-workers", int, "N", "threads prefetching batches from the store"),
    ("--resume", str, "latest|CKPT", "continue from the newest checkpoint of --out (latest) or a checkpoint folder"),
    ("--config", str, "JSON", "JSON file of settings loaded first (flags override it)"),
)


def run_train(args: argparse.Namespace) -> int:
    from mbldm.diffusion.train_config import TrainConfig, resolve_config
    from mbldm.diffusion.training import train
    from mbldm.distributed import complete_cpu_launch

    launched = complete_cpu_launch()
    if launched is not None:  # `accelerate launch --cpu --num_processes N`: the N processes have run
        return launched
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    config = resolve_config(flags)
    if getattr(args, "dry_run", False):
        from mbldm.distributed import is_main_process
        from mbldm.dry_run import dry_run

        def announce(line: str) -> None:  # the steps can take minutes on a CPU: say so before the silence
            if os.environ.get("RANK", "0") == "0":  # process 0 of an `accelerate launch` / torchrun job
                print(line, file=sys.stderr, flush=True)

        report = dry_run(config, steps=getattr(args, "dry_run_steps", 3),
                         batch_size=getattr(args, "dry_run_batch", None), progress=False, announce=announce)
        if is_main_process():
            print("\n".join(report.lines()))
        return 0
    run = train(config)
    from mbldm.distributed import is_main_process

    if is_main_process():
        print(run)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``mbldm`` parser. Every flag defaults to "not given" (argparse.SUPPRESS) so that
    :func:`mbldm.diffusion.train_config.resolve_config` can tell explicit values from defaults."""
    from mbldm.diffusion.train_config import TrainConfig

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train", help="train the latent diffusion U-Net on a latent store", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for flag, typ, metavar, text in _VALUE_FLAGS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        suffix = f" (default: {default})" if default is not None else ""
        parser.add_argument(flag, type=typ, metavar=metavar, help=text + suffix)
    parser.add_argument("--self-condition", action=argparse.BooleanOptionalAction,
                        help=f"self-conditioning on half of the steps (default: {defaults.self_condition})")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help=f"show a progress bar (default: {defaults.progress})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the model size, latent shape, a memory estimate and the measured time of a few "
                        "steps on a synthetic batch (needs neither the data nor the store: the --config file's "
                        "latent_shape / num_codewords / codec_spec / resolution are used), then exit")
    parser.add_argument("--dry-run-steps", type=int, metavar="N",
                        help="steps of the dry run: 1 warm-up + N-1 timed (default: 3)")
    parser.add_argument("--dry-run-batch", type=int, metavar="B",
                        help="global batch of the dry run's steps (default: --batch-size on CUDA, one image per "
                        "process on a CPU); the report extrapolates per-image time and memory to --batch-size")
    parser.set_defaults(func=run_train)
