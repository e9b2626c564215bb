"""``mbldm`` command line: thin argparse front ends, one module per command group.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its sub-command(s) and sets
``func`` to a function ``run(args) -> int | None`` that parses nothing more and calls one library function.
Heavy imports (torch, faiss) happen inside ``run`` so that ``mbldm --help`` stays fast.

Top-level options: ``--debug`` (full tracebacks) and ``--threads N`` (or ``MBLDM_THREADS=N``), which limits the
CPU thread pools of torch, BLAS and OpenMP for the whole command (:func:`set_threads`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

COMMAND_MODULES = ("codec", "latents", "train", "sample", "refiner", "fid", "nearest", "demo")

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError, RuntimeError, KeyError, OSError)

#: Environment variable giving the default of ``--threads``.
THREADS_ENV = "MBLDM_THREADS"
#: Thread-count variables read by OpenMP / BLAS runtimes when they are loaded (e.g. faiss's own libgomp and
#: OpenBLAS, loaded lazily after the command starts) and inherited by launched worker processes.
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# threadpoolctl limiter of the last set_threads() call; held so the limits stay for the process lifetime.
_thread_limits = None

_ROLE = re.compile(r":(?:mod|func|class|data|meth|attr):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_OVERWRITE_HINT = re.compile(r"pass (?:overwrite=True(?: / --overwrite| \(--overwrite\))|--overwrite)")
_OVERWRITE_ARG = re.compile(r"\boverwrite=True\b")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def plain_text(text: str) -> str:
    """reST markup of a docstring -> help text: a double-back-quoted literal and a ``:func:`` (``:mod:``,
    ``:class:``, ``:data:``, ``:meth:``, ``:attr:``) reference become single-back-quoted text; a ``~a.b.c`` target
    keeps its last component, as Sphinx shows it."""
    def role(match: re.Match) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return _LITERAL.sub(r"`\1`", _ROLE.sub(role, text))


def _clean_help(parser: argparse.ArgumentParser) -> None:
    """Apply :func:`plain_text` to the description, epilog and every help string of ``parser`` and its
    sub-parsers (argparse keeps them in ``_actions`` / ``_choices_actions``; there is no public accessor)."""
    for attr in ("description", "epilog"):
        if getattr(parser, attr):
            setattr(parser, attr, plain_text(getattr(parser, attr)))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if isinstance(choice.help, str):
                    choice.help = plain_text(choice.help)
            for sub in action.choices.values():
                _clean_help(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbldm",
        description="Denoising diffusion models on a model-based (VQ/PQ/OPQ/RQ) latent space "
        "(Scribano et al., Algorithms 2023).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--threads", dest="global_threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for torch / BLAS / OpenMP (default: all cores; use 1 when other jobs share "
                        f"the machine); also set by the environment variable {THREADS_ENV}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mbldm.cli.{name}")
        except ModuleNotFoundError as exc:  # a command group not written yet
            if exc.name == f"mbldm.cli.{name}":
                continue
            raise
        module.register(sub)
    _clean_help(parser)
    return parser


def set_threads(n: int) -> None:
    """Limit this process to ``n`` CPU threads, for the rest of its life.

    Sets ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` (read by runtimes loaded later, such
    as faiss's OpenMP and BLAS, and by launched worker processes), ``torch.set_num_threads(n)``,
    ``torch.set_num_interop_threads(n)`` when torch still allows it (only before any inter-op work), and
    ``threadpoolctl.threadpool_limits(n)`` for the BLAS / OpenMP pools already loaded (numpy's OpenBLAS).

    Raises:
        ValueError: ``n`` is not a positive integer.
    """
    global _thread_limits
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive integer, got {n!r}")
    for var in _THREAD_ENV_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a scikit-learn dependency, normally installed
        return
    _thread_limits = threadpool_limits(limits=n)


def _threads_from_env() -> int | None:
    """``MBLDM_THREADS`` as a positive int, None when unset or empty.

    Raises:
        ValueError: the variable is not a positive integer.
    """
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"{THREADS_ENV}={text!r}: expected a positive integer (the default of --threads)") from None


def check_device(device) -> None:
    """Refuse a CUDA device up front when this torch build / machine has no CUDA.

    Args:
        device: None (auto), a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a ``torch.device``.
    Raises:
        ValueError: ``device`` starts with "cuda" and ``torch.cuda.is_available()`` is False.
    """
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available in this torch build/machine "
                         f"(torch {torch.__version__}); use --device cpu")


def print_warnings(caught: list) -> None:
    """Print recorded warnings (``warnings.catch_warnings(record=True)``) as one ``warning: ...`` line each on
    stderr, without Python's file:line + source-line format, duplicates once; deprecation notices of libraries
    are not for the user of the command and are dropped."""
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in shown):
        print(f"warning: {message}", file=sys.stderr)


def error_text(command: str, exc: BaseException) -> str:
    """The one-line message of ``exc`` for ``mbldm COMMAND: error: ...``: without a leading ``"COMMAND: "``
    (the prefix is printed once already) and with the library's ``overwrite=True`` hints in CLI words."""
    text = " ".join(str(exc).split())  # one line
    if text.startswith(f"{command}: "):
        text = text[len(command) + 2:]
    return _OVERWRITE_ARG.sub("--overwrite", _OVERWRITE_HINT.sub("use --overwrite", text))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mbldm`` console script and of ``python -m mbldm``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.global_threads is None:
            args.global_threads = _threads_from_env()
        if args.global_threads is not None:  # before the command; `demo --threads` then sets its own
            set_threads(args.global_threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mbldm: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"mbldm {args.command}: error: {error_text(args.command, exc)}", file=sys.stderr)
        return 2
