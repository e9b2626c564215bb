"""``mbldm`` command line: thin argparse front ends, one module per command group.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its sub-command(s) and sets
``func`` to a function ``run(args) -> int | None`` that parses nothing more and calls one library function.
Heavy imports (torch, faiss) happen inside ``run`` so that ``mbldm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("codec", "latents", "train", "sample", "refiner", "fid", "demo")

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError, RuntimeError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbldm",
        description="Denoising diffusion models on a model-based (VQ/PQ/OPQ/RQ) latent space "
        "(Scribano et al., Algorithms 2023).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mbldm.cli.{name}")
        except ModuleNotFoundError as exc:  # a command group not written yet
            if exc.name == f"mbldm.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mbldm`` console script and of ``python -m mbldm``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mbldm: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"mbldm {args.command}: error: {exc}", file=sys.stderr)
        return 2
