"""Shared by the benchmark scripts: replace one "## " section of a markdown report, keeping the others.

A section runs from its "## " heading line to the next "## " heading (not "### ") or the end of the file.
"""
from __future__ import annotations

import re
from pathlib import Path


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` (a markdown file) with the section headed ``heading`` replaced by ``section`` (or appended).

    Args:
        text: the current file contents ("" for a new file: it then gets a "# Benchmarks" title).
        heading: the section's heading line, e.g. "## Codec speed".
        section: the new section, starting with ``heading``.
    """
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if not text.strip():
        return "# Benchmarks\n\n" + section
    if pattern.search(text):
        return pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + section


def update_section(path: str | Path, heading: str, section: str) -> None:
    """Atomically rewrite the markdown file ``path`` with its ``heading`` section replaced by ``section``.

    The file is read just before the write so that sections written meanwhile by other scripts are kept.
    """
    from mbldm.io.atomic import write_text

    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text(path, replace_section(old, heading, section))
