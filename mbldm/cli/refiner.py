"""``mbldm refiner train|apply``: the image-space refiner of the continuous model (§4.2.2)."""
from __future__ import annotations

import argparse


def run_train(args: argparse.Namespace) -> int:
    import json

    from mbldm.cli import check_device
    from mbldm.diffusion.refiner import RefinerConfig, train_refiner

    check_device(args.device)
    cfg = RefinerConfig(codec=args.codec, data=args.data, out=args.out, resolution=args.resolution,
                        crop_size=args.crop_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps,
                        noise_std=args.noise_std, l1_weight=args.l1_weight, ssim_weight=args.ssim_weight,
                        seed=args.seed, holdout=args.holdout, eval_images=args.eval_images,
                        max_minutes=args.max_minutes, log_every=args.log_every, device=args.device)
    out = train_refiner(cfg, overwrite=args.overwrite, progress=not args.quiet)
    for r in json.loads((out / "eval.json").read_text())["results"]:
        print(f"noise_std {r['noise_std']:.2f}: PSNR {r['psnr_before']:.2f} -> {r['psnr_after']:.2f} dB, "
              f"SSIM {r['ssim_before']:.3f} -> {r['ssim_after']:.3f}")
    print(f"refiner written to {out}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from mbldm.cli import check_device
    from mbldm.diffusion.refiner import refine_files

    check_device(args.device)
    written = refine_files(args.refiner, args.inputs, args.out, overwrite=args.overwrite, device=args.device)
    print(f"wrote {len(written)} refined images to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``refiner train`` and ``refiner apply`` to the ``mbldm`` parser."""
    parser = subparsers.add_parser("refiner", help="train or apply the image-space refiner (§4.2.2)",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="refiner_command", metavar="ACTION", required=True)

    t = sub.add_parser(
        "train", help="train a refiner on (D(E(x) + noise), x) pairs",
        description="Train a small U-Net (preset 'refiner', ~1.7M parameters) mapping x_n = D(E(x) + gamma) "
        "back to x with an L1 + SSIM loss; gamma is Gaussian noise in index space with a per-crop std drawn from "
        "[0, --noise-std]. Writes R/model, R/config.json, R/metrics.jsonl and R/eval.json (PSNR before/after on "
        "held-out images).")
    t.add_argument("--codec", required=True, metavar="C", help="codec artifact folder")
    t.add_argument("--data", required=True, metavar="DIR", help="folder of training images (recursive)")
    t.add_argument("--out", required=True, metavar="R", help="refiner directory to write")
    t.add_argument("--resolution", type=int, default=None, metavar="RES",
                   help="resize short side + centre crop to RES first (use the diffusion run's resolution)")
    t.add_argument("--crop-size", type=int, default=128, help="training crop side (default 128)")
    t.add_argument("--steps", type=int, default=5000, help="optimizer steps (default 5000)")
    t.add_argument("--batch-size", type=int, default=16, help="crops per step (default 16)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    t.add_argument("--warmup-steps", type=int, default=100,
                   help="linear learning-rate warm-up steps (default 100; 1 = none)")
    t.add_argument("--noise-std", type=float, default=2.0,
                   help="max index-space noise std (default 2: the final DDPM steps' noise at K=256)")
    t.add_argument("--l1-weight", type=float, default=0.16, help="L1 loss weight (default 0.16)")
    t.add_argument("--ssim-weight", type=float, default=0.84, help="(1 - SSIM) loss weight (default 0.84)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the held-out split, the crops and the noise (default 0)")
    t.add_argument("--holdout", type=float, default=0.05, help="fraction of images held out (default 0.05)")
    t.add_argument("--eval-images", type=int, default=16, help="held-out images evaluated (default 16)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    t.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines (default 50)")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty R")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    a = sub.add_parser("apply", help="refine image files",
                       description="Refine images (files or folders) and write DIR/<name>.png.")
    a.add_argument("--refiner", required=True, metavar="R", help="refiner directory (refiner train)")
    a.add_argument("--out", required=True, metavar="DIR", help="output folder")
    a.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    a.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    a.set_defaults(func=run_apply)
