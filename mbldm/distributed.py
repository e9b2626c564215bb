"""Small helpers around HF Accelerate for the multi-process commands (no distributed code of our own).

Every ``mbldm`` command that can run as several processes (``train``, ``latents build``, ``sample``, ``fid``)
works the same way under any launcher that Accelerate understands (``accelerate launch``, ``torchrun``, MPI,
SLURM + torchrun): the process index and count, the device, barriers and object gathers all come from
:class:`accelerate.PartialState`. With a single process every helper is a no-op.

Launching several CPU processes. ``accelerate launch --cpu --num_processes N`` starts **one** process unless
MPI is used (``--mpirun_hostfile``): Accelerate's CPU launcher expects ``mpirun`` to start the N copies, and
without it only sets ``MASTER_ADDR``/``MASTER_PORT`` and runs the script once. mbldm completes that launch
(:func:`complete_cpu_launch`): the one process reads N (and ``--main_process_port``) from the command line of its
``accelerate launch`` parent with Accelerate's own argument parser, and starts the N processes through
``torch.distributed.run`` -- what ``accelerate launch --multi_gpu`` itself does -- with the same ``mbldm``
arguments; it then waits for them and returns their exit status. All of these start N real processes::

    accelerate launch --cpu --num_processes 2 -m mbldm train ...                            # completed by mbldm
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 -m mbldm train ...   # torchrun inside
    torchrun --nproc_per_node 2 -m mbldm train ...        # not `sample`: torchrun reads its --run as --run-path

The processes use the CPU and the gloo backend when CUDA is unavailable (``PartialState(cpu=True)``: Accelerate's
``MULTI_CPU`` mode). If the parent's command line cannot be read (not Linux, a wrapper in between),
:func:`check_launch` refuses the silent single process with the commands above.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping

__all__ = [
    "LAUNCH_HELP",
    "check_launch",
    "complete_cpu_launch",
    "torchrun_args",
    "get_state",
    "process_index",
    "num_processes",
    "is_main_process",
    "local_indices",
    "wait_for_everyone",
    "main_process_first",
    "gather_object",
]

#: The multi-process launch command that works on CPU-only machines as well as on GPUs.
LAUNCH_HELP = ("accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m mbldm COMMAND ... "
               "(or, except for `sample`: torchrun --nproc_per_node N -m mbldm COMMAND ...)")
# Variables one of which a real multi-process launcher sets in every process (torchrun, MPI implementations).
_WORLD_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(environ: Mapping[str, str] | None = None) -> None:
    """Refuse the silent single process of ``accelerate launch --cpu --num_processes N`` (N > 1) without MPI.

    Accelerate's simple launcher (used for ``--cpu``, and for ``--num_processes N`` without ``--multi_gpu`` on a
    machine without GPUs) always sets ``ACCELERATE_USE_CPU``, and sets ``MASTER_ADDR`` only when more than one
    process was requested; it then starts the command once, expecting ``mpirun`` to have started the others.
    So ``ACCELERATE_USE_CPU`` + ``MASTER_ADDR`` without any world-size variable means "N processes were asked
    for, one is running".

    Args:
        environ: the environment to inspect (default ``os.environ``).
    Raises:
        RuntimeError: in that situation, with the command to use instead (:data:`LAUNCH_HELP`).
    """
    env = os.environ if environ is None else environ
    if _single_process_of_many(env):
        raise RuntimeError(
            "`accelerate launch` was asked for several processes but started only this one: its CPU launcher "
            "(--cpu, or no --multi_gpu) needs MPI (--mpirun_hostfile) to start the others. Use "
            f"{LAUNCH_HELP}; on a machine without CUDA mbldm then runs the processes on the CPU (gloo). "
            "For one process drop --num_processes (or unset MASTER_ADDR).")


def _single_process_of_many(env: Mapping[str, str]) -> bool:
    return "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and not any(v in env for v in _WORLD_VARS)


def parse_accelerate_launch(cmdline: list[str]) -> tuple[int, int | None] | None:
    """``(num_processes, main_process_port)`` of an ``accelerate launch ...`` command line, else None.

    Args:
        cmdline: the launcher's argv, e.g. ``["python", ".../accelerate", "launch", "--cpu", "--num_processes",
            "2", "-m", "mbldm", "train", ...]`` (everything after the word ``launch`` is parsed with Accelerate's
            ``launch_command_parser``).
    Returns:
        None when ``launch`` is missing, the arguments do not parse, or no process count was given.
    """
    from accelerate.commands.launch import launch_command_parser

    if "launch" not in cmdline:
        return None
    rest = cmdline[cmdline.index("launch") + 1:]
    parser = launch_command_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints usage on errors; failure is just "no"
            args = parser.parse_args(rest)
    except (SystemExit, TypeError, ValueError):
        return None
    if not args.num_processes:
        return None
    return int(args.num_processes), (None if args.main_process_port is None else int(args.main_process_port))


def _parent_cmdline() -> list[str] | None:
    from pathlib import Path

    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()  # Linux; elsewhere check_launch refuses
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def torchrun_args(n: int, port: int | None, argv: list[str]):
    """The ``torch.distributed.run`` namespace that runs ``python -m mbldm ARGV`` in ``n`` local processes.

    ``--standalone`` (a local rendezvous on a free port) unless a port > 0 is given. The mbldm arguments are set
    after parsing, not parsed: torch's parser would take ``--run`` (of ``mbldm sample``) for an abbreviation of
    its own ``--run-path``.
    """
    from torch.distributed.run import get_args_parser

    where = ["--standalone"] if not port else ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    targs = get_args_parser().parse_args(["--nproc_per_node", str(n), *where, "-m", "mbldm"])
    targs.training_script_args = list(argv)
    return targs


def complete_cpu_launch(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
                        parent_cmdline: list[str] | None = None) -> int | None:
    """Start the N processes that ``accelerate launch --cpu --num_processes N`` (without MPI) did not start.

    Call it first in every multi-process command. In every other situation (one process, torchrun, ``--multi_gpu``,
    MPI) it returns None at once and the command goes on. In that one situation (see :func:`check_launch` for how
    it is recognised) it reads N and ``--main_process_port`` from the parent ``accelerate launch`` command line,
    runs ``torch.distributed.run --nproc_per_node N --standalone -m mbldm ARGV`` (``--master_port P`` instead of
    ``--standalone`` when a port P > 0 was given to Accelerate), waits, and returns the exit status (0 when every
    process succeeded).
    The N processes inherit the environment (``ACCELERATE_USE_CPU``, ``OMP_NUM_THREADS``, mixed precision).

    Args:
        argv: the mbldm arguments to run in each process (default ``sys.argv[1:]``).
        environ: the environment to inspect (default ``os.environ``).
        parent_cmdline: the launcher's argv (default: read from ``/proc/<parent pid>/cmdline``).
    Returns:
        None (go on in this process) or the exit status of the N processes.
    Raises:
        RuntimeError: a single process of N was started and N cannot be read from the parent (from
        :func:`check_launch`).
    """
    import sys

    env = os.environ if environ is None else environ
    if not _single_process_of_many(env):
        return None
    parsed = parse_accelerate_launch(parent_cmdline if parent_cmdline is not None else (_parent_cmdline() or []))
    if parsed is None or parsed[0] < 2:
        check_launch(env)  # raises with the commands that work
        return None
    n, port = parsed
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    targs = torchrun_args(n, port, list(sys.argv[1:] if argv is None else argv))
    print(f"mbldm: `accelerate launch --cpu` started 1 of {n} processes (no MPI); starting all {n} through "
          "torch.distributed.run", file=sys.stderr, flush=True)
    try:
        run(targs)
    except ChildFailedError as exc:
        print(f"mbldm: {len(exc.failures)} of {n} processes failed (their errors are printed above)",
              file=sys.stderr, flush=True)
        return 1
    return 0


def get_state():
    """The process-wide :class:`accelerate.PartialState` (created on first use).

    ``cpu=True`` when CUDA is unavailable, so that a ``torchrun``-style launch on a CPU-only machine becomes
    Accelerate's ``MULTI_CPU`` mode (gloo), as :func:`mbldm.diffusion.training.train` does with its Accelerator.
    ``state.device`` is the device of this process (``cuda:LOCAL_RANK`` with several GPUs, else ``cpu``).
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_index() -> int:
    """Index of this process in [0, num_processes)."""
    return int(get_state().process_index)


def num_processes() -> int:
    """Number of processes of the job (1 without a launcher)."""
    return int(get_state().num_processes)


def is_main_process() -> bool:
    """True on process 0 (the one that writes shared files)."""
    return bool(get_state().is_main_process)


def local_indices(count: int) -> list[int]:
    """This process's share of the global indices ``range(count)``: one contiguous block, no padding.

    Accelerate's ``PartialState.split_between_processes(list(range(count)), apply_padding=False)``: blocks of
    ``count // n`` or ``count // n + 1`` indices (the first ``count % n`` processes take one more), in process
    order, so the blocks partition ``range(count)``: every index exactly once, none repeated, whatever n. A
    process may get an empty list when ``count < n``.

    Raises:
        ValueError: ``count`` is not an integer >= 0.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    state = get_state()
    if count == 0:
        return []
    with state.split_between_processes(list(range(count)), apply_padding=False) as mine:
        return list(mine)


def wait_for_everyone() -> None:
    """Barrier: return once every process has reached it (no-op with one process)."""
    get_state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (e.g. create a folder, then use it)."""
    with get_state().main_process_first():
        yield


def gather_object(items: list) -> list:
    """Concatenate the lists ``items`` of all processes, in process order, on every process.

    Accelerate's ``gather_object`` (``torch.distributed.all_gather_object``: the objects are pickled in memory
    between the processes of this job; nothing is written). With one process ``items`` is returned as is.

    Raises:
        TypeError: ``items`` is not a list.
    """
    from accelerate.utils import gather_object as _gather

    if not isinstance(items, list):
        raise TypeError(f"gather_object expects a list, got {type(items).__name__}")
    get_state()
    return list(_gather(items))

