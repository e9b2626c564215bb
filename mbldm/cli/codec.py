"""``mbldm codec fit|encode|decode|bench``."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``codec fit|encode|decode|bench`` to the ``mbldm`` parser."""
    p = subparsers.add_parser("codec", help="fit, apply and benchmark the model-based codec (§3.1, Table 1)",
                              description="Fit, apply and benchmark the model-based codec (§3.1, Table 1).")
    sub = p.add_subparsers(dest="codec_command", metavar="ACTION", required=True)

    f = sub.add_parser(
        "fit", help="fit one FAISS quantizer per YCbCr channel on a folder of images",
        description="Fit the codec on every image under --images (recursive): RGB -> YCbCr (full-range BT.601), "
        "all stride-1 s x s patches of each channel (plus those of the vertically flipped images: the paper's 18 "
        "McMaster images give about 8.75M patches), one FAISS VQ/PQ/OPQ/RQ quantizer per channel, codewords ordered "
        "by their first principal component (§3.2.1). Writes OUT/config.json and OUT/codebooks.safetensors.")
    f.add_argument("--spec", default="OPQ-32-8-8", help="VQ|PQ|OPQ|RQ-Y-Cb-Cr bits per patch (default OPQ-32-8-8)")
    f.add_argument("--images", required=True, help="folder of training images (recursive), e.g. McMaster")
    f.add_argument("--out", required=True, help="codec directory to write")
    f.add_argument("--patch-size", type=int, default=8, help="patch side s (default 8, as in the paper)")
    f.add_argument("--max-patches", type=int, default=None, metavar="N",
                   help="train on a uniform random subset of N patches per channel (default: all patches)")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of the --max-patches subset and of FAISS's k-means (default 0)")
    f.add_argument("--no-flip", action="store_true", help="do not add vertically flipped images")
    f.add_argument("--overwrite", action="store_true", help="replace an existing codec in --out")
    f.set_defaults(func=run_fit)

    e = sub.add_parser(
        "encode", help="images -> .npy index latents (+ .json with the original size)",
        description="Encode image files (or every image under a folder) with a fitted codec. Writes OUT/NAME.npy, "
        "the index latent (ceil(H/s), ceil(W/s), c) in uint8 (uint16 when a codebook has more than 256 "
        "codewords), and OUT/NAME.json with the source path, the original size and the codec spec.")
    e.add_argument("--codec", required=True, help="codec directory (codec fit)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--overwrite", action="store_true", help="replace existing NAME.npy / NAME.json files")
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    e.set_defaults(func=run_encode)

    d = sub.add_parser(
        "decode", help=".npy index latents -> PNG",
        description="Decode .npy index latents (files, or every .npy under a folder) by table look-up (no FAISS "
        "needed) and write OUT/NAME.png, cropped to the original size recorded in NAME.json beside the latent "
        "(the full ceil(H/s)*s x ceil(W/s)*s image when there is none).")
    d.add_argument("--codec", required=True, help="codec directory (the one that encoded the latents)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--overwrite", action="store_true", help="replace existing NAME.png files")
    d.add_argument("inputs", nargs="+", metavar="LATENT", help=".npy files or folders")
    d.set_defaults(func=run_decode)

    b = sub.add_parser(
        "bench", help="PSNR / SSIM / bpp / compression ratio vs JPEG at equal bpp (Table 1)",
        description="Encode and decode each image with the codec and report PSNR (Eq. 22), SSIM, bits per pixel "
        "and compression ratio (Eq. 23), next to JPEG at the lowest quality reaching at least the same bpp "
        "(paper Table 1); prints a table and optionally writes the per-image and mean results as JSON.")
    b.add_argument("--codec", required=True, help="codec directory")
    b.add_argument("--images", required=True, help="image file or folder (recursive), e.g. Kodak or SIPI")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    b.set_defaults(func=run_bench)


def run_fit(args: argparse.Namespace) -> int:
    from mbldm.codec.files import fit_from_folder

    codec = fit_from_folder(args.images, args.spec, args.out, patch_size=args.patch_size,
                            max_patches=args.max_patches, seed=args.seed, flip=not args.no_flip,
                            overwrite=args.overwrite)
    print(f"wrote {args.out}: {codec!r}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from mbldm.codec.files import encode_files

    written = encode_files(args.codec, args.inputs, args.out, overwrite=args.overwrite)
    print(f"encoded {len(written)} image(s) into {args.out}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from mbldm.codec.files import decode_files

    written = decode_files(args.codec, args.inputs, args.out, overwrite=args.overwrite)
    print(f"decoded {len(written)} latent(s) into {args.out}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from mbldm.codec.bench import format_table, run_bench

    result = run_bench(args.codec, args.images, json_out=args.json, overwrite=args.overwrite)
    print(format_table(result))
    return 0
