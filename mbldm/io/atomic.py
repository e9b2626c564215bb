"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file, and a crash leaves either the old file or the new one. The file gets
the permissions a plain ``open(path, "w")`` would give (0o666 minus the umask), not ``mkstemp``'s private 0o600.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _default_mode() -> int:
    """0o666 & ~umask: the mode of a file created by ``open()``. The umask can only be read by setting it, so it is
    set and restored at once (process-wide; the window is two system calls)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` with mode 0o666 & ~umask.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (refusing to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _default_mode())  # mkstemp created it 0o600 (the writer may have replaced the file)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)
