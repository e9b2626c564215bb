"""``mbldm train``: train the latent diffusion U-Net on a latent store (continuous or categorical variant).

Runs as one CPU process, on one GPU, or on several with ``accelerate launch -m mbldm train ...``.
Only flags given on the command line override the ``--config`` file and, with ``--resume``, the run's own
``RUN/config.json``; everything else keeps the run's (or the default) value.
"""
from __future__ import annotations

import argparse

# (flag, type, metavar, help); the destination is the TrainConfig field of the same name (dashes -> underscores).
_VALUE_FLAGS: tuple[tuple[str, object, str, str], ...] = (
    ("--latents", str, "STORE", "latent store folder (`mbldm latents build`); required"),
    ("--out", str, "RUN", "run directory (config.json, codec/, metrics.jsonl, checkpoints/, model/); required"),
    ("--steps", int, "N", "total optimizer steps of the run (a resumed run continues up to N); required"),
    ("--preset", str, "P", "U-Net preset: paper (~50M), small, tiny"),
    ("--variant", str, "V", "continuous (Eq. 4, §4.2.2) or categorical (Eq. 24, §4.2.3)"),
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
    ("--min-snr-gamma", float, "G", "min-SNR-gamma loss weighting gamma"),
    ("--timesteps", int, "T", "diffusion timesteps"),
    ("--beta-schedule", str, "NAME", "linear (paper: 1e-4 .. 2e-2) or cosine"),
    ("--seed", int, "S", "seed of the model init, batches, timesteps and noise"),
    ("--max-minutes", float, "M", "wall-clock budget: stop cleanly with a checkpoint and an export after M minutes"),
    ("--num-workers", int, "N", "threads prefetching batches from the store"),
    ("--resume", str, "latest|CKPT", "continue from the newest checkpoint of --out (latest) or a checkpoint folder"),
    ("--config", str, "JSON", "JSON file of settings loaded first (flags override it)"),
)


def run_train(args: argparse.Namespace) -> int:
    from mbldm.diffusion.training import TrainConfig, resolve_config, train

    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    run = train(resolve_config(flags))
    print(run)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``mbldm`` parser. Every flag defaults to "not given" (argparse.SUPPRESS) so that
    :func:`mbldm.diffusion.training.resolve_config` can tell explicit values from defaults."""
    from mbldm.diffusion.training import TrainConfig

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
    parser.set_defaults(func=run_train)
