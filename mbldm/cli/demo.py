"""``mbldm demo``: run the whole pipeline (codec, benchmark, latents, training, refiner, sampling, FID) and write
``OUT/report.html``."""
from __future__ import annotations

import argparse


def run_demo(args: argparse.Namespace) -> int:
    from mbldm.demo.pipeline import DemoConfig, demo_command, run_demo

    # the demo's own --threads wins; else the top-level `mbldm --threads N` / MBLDM_THREADS; else free cores
    threads = args.threads if args.threads is not None else getattr(args, "global_threads", None)
    config = DemoConfig(data=args.data, out=args.out, minutes=args.minutes, spec=args.spec, variant=args.variant,
                        resolution=args.resolution, preset=args.preset, seed=args.seed, overwrite=args.overwrite,
                        threads=threads, progress=not args.quiet)
    config.command = demo_command(config)
    run_demo(config)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``mbldm`` parser."""
    p = subparsers.add_parser(
        "demo", help="run the whole paper pipeline in about --minutes and write OUT/report.html",
        description="Fit the codec, benchmark it against JPEG, build the latent store, train the diffusion model "
        "(and the categorical one with --variant both) and the refiner, sample, compute FID when the sample count "
        "allows, and write OUT/report.html (+ OUT/demo.json with every number and the command of each step). "
        "Without --data it uses real photographs bundled with scikit-image, scikit-learn and matplotlib. "
        "Choices by --minutes M: resolution 64 below 30 min (else 128), U-Net preset cpu below 60 min (else "
        "small), 64 samples below 20 min (else 10 per minute, at most 1000); FID needs at least 100 samples.")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder (recursive); default: the photos bundled with the installed packages")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
    p.add_argument("--minutes", type=float, default=10.0, metavar="M", help="wall-time budget (default 10)")
    p.add_argument("--spec", default="OPQ-32-8-8", help="codec spec (default OPQ-32-8-8)")
    p.add_argument("--variant", choices=("continuous", "both"), default="continuous",
                   help="train the continuous variant, or both continuous and categorical (default continuous)")
    p.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="image side for generative training (default: 64 below 30 minutes, else 128)")
    p.add_argument("--preset", default=None, metavar="P",
                   help="U-Net preset of mbldm.diffusion.models (default: cpu below 60 minutes, else small)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch/faiss (default: `mbldm --threads N` if given, else free cores = CPUs - "
                   "load average, at least 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of a previous demo in --out (other files there are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (step summaries are still printed)")
    p.set_defaults(func=run_demo)
