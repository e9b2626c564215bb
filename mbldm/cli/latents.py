"""mbldm latents build / info: encode a dataset once into a latent store (paper §4.2.1), or describe one."""
from __future__ import annotations

import argparse


def run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mbldm import distributed as dist
    from mbldm.data.latent_store import STORE_JSON, build_latent_store, remove_latent_store, store_summary

    launched = dist.complete_cpu_launch()
    if launched is not None:  # `accelerate launch --cpu --num_processes N`: the N processes have run
        return launched
    n, r = dist.num_processes(), dist.process_index()
    overwrite = args.overwrite
    if n > 1:  # under `accelerate launch` / torchrun process r builds shards r, r+n, ...; deletion happens once
        if overwrite and r == 0 and (Path(args.out) / STORE_JSON).is_file():
            remove_latent_store(args.out)
        overwrite = False
        dist.wait_for_everyone()
    out = build_latent_store(args.codec, args.data, args.resolution, args.out, shard_size=args.shard_size,
                             batch_size=args.batch_size, num_workers=args.num_workers, overwrite=overwrite,
                             progress=not args.quiet, process_index=r, num_processes=n, hflip=args.hflip)
    dist.wait_for_everyone()
    if r == 0:
        print(store_summary(out))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from mbldm.data.latent_store import store_summary

    print(store_summary(args.store))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``latents build`` and ``latents info`` to the ``mbldm`` parser."""
    parser = subparsers.add_parser("latents", help="encode a dataset into a latent store; describe a store",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="latents_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build", help="encode an image folder or LSUN LMDB into a latent store (resumable)",
        description="Resize each image's short side to R, centre-crop R x R, encode with the codec and write "
        "memory-mapped index shards + sources.jsonl. Re-running an interrupted build with the same arguments "
        "resumes it. Under `accelerate launch` / torchrun process r of n encodes shards r, r+n, ... (same store).")
    build.add_argument("--codec", required=True, metavar="DIR", help="codec artifact folder (codec fit)")
    build.add_argument("--data", required=True, metavar="DIR_OR_LMDB",
                       help="image folder (recursive) or LMDB (folder holding data.mdb, or a .mdb file)")
    build.add_argument("--resolution", required=True, type=int, metavar="R",
                       help="image side after resize + centre crop; a multiple of the codec's patch size")
    build.add_argument("--out", required=True, metavar="STORE", help="latent store folder to write")
    build.add_argument("--shard-size", type=int, default=1024, metavar="S", help="images per shard (default 1024)")
    build.add_argument("--batch-size", type=int, default=32, help="images per codec.encode call (default 32)")
    build.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    build.add_argument("--hflip", action="store_true",
                       help="also encode each image's horizontal mirror (2N latents): training with flips")
    build.add_argument("--overwrite", action="store_true", help="delete an existing store at STORE and rebuild")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)

    info = sub.add_parser(
        "info", help="print a one-line summary of a latent store",
        description="Print one line describing a latent store (complete or not): the number of latents, their "
        "shape and dtype, K and the codec spec, the image resolution, the source data and the shards written.")
    info.add_argument("store", metavar="STORE", help="latent store folder")
    info.set_defaults(func=run_info)
