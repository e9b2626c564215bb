"""``mbldm sample``: generate images from a training run (DDPM / DDIM, per-image seeds, optional refiner)."""
from __future__ import annotations

import argparse


def _times(text: str) -> list[int]:
    """Parse ``1000,900,...,0`` into a list of ints."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one timestep")
    return values


def run_sample(args: argparse.Namespace) -> int:
    from mbldm.cli import check_device
    from mbldm.diffusion.sample_sharding import sample_sharded
    from mbldm.distributed import complete_cpu_launch

    check_device(args.device)  # before launching processes or loading the run

    launched = complete_cpu_launch()
    if launched is not None:  # `accelerate launch --cpu --num_processes N`: the N processes have run
        return launched
    # one process: sample(); under `accelerate launch` / torchrun: each process samples its block of the N indices
    result = sample_sharded(args.run, args.num, out_dir=args.out, sampler=args.sampler, steps=args.steps,
                            eta=args.eta, seed=args.seed, batch_size=args.batch_size, temperature=args.temperature,
                            estimate=args.estimate, spacing=args.spacing, decode=args.decode, refiner=args.refiner, use_ema=not args.no_ema, device=args.device,
                            progress=not args.quiet, overwrite=args.overwrite, trajectory=args.trajectory)
    if result is None:  # not the main process of a multi-process job: process 0 reports
        return 0
    s = result["summary"]
    print(f"wrote {s['count']} images ({s['image_size'][0]}x{s['image_size'][1]}, {s['variant']}, {s['sampler']} "
          f"{s['steps']} steps, {s['seconds']:.1f} s) to {args.out}; grid: {result['grid']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sample`` to the ``mbldm`` parser."""
    p = subparsers.add_parser(
        "sample", help="generate images from a training run",
        description="Generate N images from a training run (EMA weights by default), decode them with the run's "
        "codec and write img_000000.png ..., grid.png and samples.json. Image i depends only on seed + i (not on "
        "the batch size). DDPM runs all T steps; DDIM runs S <= T steps. Under `accelerate launch` / torchrun each "
        "process samples its own block of the N indices (exactly N images in all, the same files as one process).")
    p.add_argument("--run", required=True, metavar="RUN", help="training run directory (mbldm train)")
    p.add_argument("--num", required=True, type=int, metavar="N", help="number of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="reverse process (default ddim)")
    p.add_argument("--steps", type=int, default=None, metavar="S",
                   help="DDIM steps, 1 <= S <= T (default 50); DDPM always runs all T steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic, default)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed + i (default 0)")
    p.add_argument("--temperature", type=float, default=None, metavar="GAMMA",
                   help="categorical runs: z0 ~ softmax(logits / GAMMA) (Eq. 25), 0 = argmax (default: 0 for runs "
                   "of format version 2, 1 for version 1 (the paper's Algorithm 2))")
    p.add_argument("--estimate", choices=("sample", "mean"), default=None,
                   help="categorical runs: the z0 each intermediate step starts from: sample (Eq. 25, Algorithm 2) "
                   "or mean (the expected index); the last step always samples at GAMMA (default: mean for "
                   "version-2 runs, sample for version 1)")
    p.add_argument("--spacing", choices=("trailing", "quadratic"), default=None,
                   help="DDIM timesteps: trailing (evenly spaced from T-1) or quadratic (dense at small t, ending at "
                   "t = 0) (default: quadratic for categorical runs of format version 2, else trailing)")
    p.add_argument("--decode", choices=("hard", "soft"), default=None,
                   help="categorical runs: hard (look up the sampled indices) or soft (the expected image under the "
                   "last step's distribution, Eq. 21 with its probabilities) (default: hard)")
    p.add_argument("--refiner", default=None, metavar="R",
                   help="refiner directory (mbldm refiner train) applied after decoding; raw decodes go to DIR/raw")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per forward pass (default 16)")
    p.add_argument("--trajectory", nargs="?", type=_times, const=True, default=None, metavar="T,T,...",
                   help="also write x_t and x0-estimate strips at these paper times to DIR/trajectory "
                   "(without a value: T, 0.9T, ..., 0, i.e. 1000,900,...,0 as in Fig. 7)")
    p.add_argument("--no-ema", action="store_true", help="use the latest checkpoint's raw weights instead of EMA")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_sample)
