"""Small helpers around HF Accelerate for the multi-process commands (no distributed code of our own).

Every ``mbldm`` command that can run as several processes (``train``, ``latents build``, ``sample``, ``fid``)
works the same way under any launcher that Accelerate understands (``accelerate launch``, ``torchrun``, MPI,
SLURM + torchrun): the process index and count, the device, barriers and object gathers all come from
:class:`accelerate.PartialState`. With a single process every helper is a no-op.

Launching several CPU processes. ``accelerate launch --cpu --num_processes N`` starts **one** process unless
MPI is used (``--mpirun_hostfile``): Accelerate's CPU launcher expects ``mpirun`` to start the N copies, and
without it only sets ``MASTER_ADDR``/``MASTER_PORT`` and runs the script once. :func:`check_launch` detects
that situation and stops with an explanation instead of silently running one process. Commands that work::

    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 -m mbldm train ...   # torchrun inside
    torchrun --nproc_per_node 2 -m mbldm train ...

On a machine without CUDA, ``--multi_gpu`` still starts the N processes (through ``torch.distributed.run``) and
mbldm then uses the CPU and the gloo backend (``PartialState(cpu=True)``: Accelerate's ``MULTI_CPU`` mode).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

__all__ = [
    "LAUNCH_HELP",
    "check_launch",
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
               "(or: torchrun --nproc_per_node N -m mbldm COMMAND ...)")
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
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and not any(v in env for v in _WORLD_VARS):
        raise RuntimeError(
            "`accelerate launch` was asked for several processes but started only this one: its CPU launcher "
            "(--cpu, or no --multi_gpu) needs MPI (--mpirun_hostfile) to start the others. Use "
            f"{LAUNCH_HELP}; on a machine without CUDA mbldm then runs the processes on the CPU (gloo). "
            "For one process drop --num_processes (or unset MASTER_ADDR).")


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

