"""``mbldm nearest``: memorisation check, each generated sample's nearest training image in Inception space."""
from __future__ import annotations

import argparse


def _quantile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``nearest`` sub-command."""
    p = subparsers.add_parser(
        "nearest",
        help="memorisation check: nearest training image of each sample (Inception features), near-copy fraction",
        description="For each generated sample, the distance of its InceptionV3 pool3 feature to the nearest "
        "training image's, compared with the training set's own leave-one-out nearest-neighbour distances. "
        "Reports the fraction of samples closer than the --quantile of those (near-copies; about the quantile "
        "itself for a model that does not copy) and both medians, and writes OUT/nearest.json (per-sample "
        "neighbours) and OUT/nearest.png (the closest samples, each beside its nearest training images).",
    )
    p.add_argument("--train", required=True,
                   help="folder of training images, or a statistics .npz with features (`mbldm fid --save-stats`)")
    p.add_argument("--fake", required=True, help="folder of generated images (an `mbldm sample` folder)")
    p.add_argument("--out", required=True, help="output folder for nearest.json and nearest.png")
    p.add_argument("--quantile", type=_quantile, default=0.05,
                   help="near-copy threshold: this quantile of the training-vs-training distances (default 0.05)")
    p.add_argument("--k", type=int, default=3, help="nearest training images per sample (default 3)")
    p.add_argument("--rows", type=int, default=8, help="samples in the figure, the closest ones (default 8)")
    p.add_argument("--tile", type=int, default=128, help="figure tile side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=50, help="images per network forward (default 50)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:1")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing outputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_nearest)


def run_nearest(args: argparse.Namespace) -> int:
    """Run the memorisation check, print its three numbers and where the files are."""
    import warnings

    from mbldm.cli import check_device, print_warnings
    from mbldm.eval.memorisation_report import memorisation_report

    device = None if args.device == "auto" else args.device
    check_device(device)
    with warnings.catch_warnings(record=True) as caught:
        report = memorisation_report(args.train, args.fake, args.out, k=args.k, quantile=args.quantile,
                                     rows=args.rows, tile=args.tile, batch_size=args.batch_size, device=device,
                                     progress=not args.no_progress, overwrite=args.overwrite)
    print_warnings(caught)
    s = report.summary()
    print(f"near-copies: {s['near_copy_fraction']:.1%} of {s['n_fake']} samples ({s['near_copies']}) are closer to a "
          f"training image than the {s['quantile'] * 100:g}% quantile of training-vs-training distances "
          f"({s['threshold']:.2f}; fresh draws: about {s['quantile'] * 100:g}%)")
    print(f"median nearest-neighbour distance: samples {s['median_fake_distance']:.2f}, training (leave-one-out) "
          f"{s['median_train_distance']:.2f} ({s['n_train']} training images)")
    print(f"wrote {report.json_path} and {report.figure_path}")
    return 0
