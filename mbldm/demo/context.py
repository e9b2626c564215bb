"""What the steps of one ``mbldm demo`` run share: :class:`DemoContext` (the resolved settings, the output folder,
the demo.json summary being built, the deadline and the results of earlier steps), and how a step shows a path in
a shell command or a duration in its summary line.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbldm.demo.config import DemoConfig

__all__ = ["DemoContext", "PATCH_SIZE", "quote", "format_seconds"]

PATCH_SIZE = 8  # s of the demo's codecs: image side R = 8 h


def quote(path: Any) -> str:
    """``path`` as one shell word (for the commands shown in the report)."""
    return shlex.quote(str(path))


def format_seconds(seconds: float) -> str:
    """"12.3 s" below two minutes, else "4.5 min"."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@dataclass
class DemoContext:
    """One demo run: settings, folders, the summary (demo.json) and what the earlier steps produced.

    Attributes:
        cfg: the resolved :class:`DemoConfig`.  out: the output folder.  summary: the demo.json dict.
        t0, deadline: ``time.monotonic()`` at the start and at the end of the ``--minutes`` budget.
        variants: the trained variants, ("continuous",) or ("continuous", "categorical").
        rng: the generator of every random choice of the data step.
        train_data: the generative training folder (OUT/crops or DIR).  real_pool: images for FID's real side.
        bench_dir: the held-out benchmark folder.  codec: the fitted Codec.  ordering_image: (name, image) of Fig. 3.
        plan: :func:`mbldm.demo.budget.plan_budget`'s split of the remaining time.  do_fid: whether FID is computed.
    """

    cfg: DemoConfig
    out: Path
    summary: dict
    t0: float
    deadline: float
    variants: tuple[str, ...]
    rng: np.random.Generator
    train_data: Path | None = None
    real_pool: list = field(default_factory=list)
    bench_dir: Path | None = None
    codec: Any = None
    ordering_image: tuple[str, np.ndarray] | None = None
    plan: dict = field(default_factory=dict)
    do_fid: bool = False

    @property
    def files(self) -> Path:
        """OUT/report_files: the report's figures."""
        return self.out / "report_files"

    @property
    def resolution(self) -> int:
        """R, the image side of the generative steps."""
        return self.cfg.resolution

    @property
    def latent_side(self) -> int:
        """h = R / s."""
        return self.cfg.resolution // PATCH_SIZE

    def add_figure(self, key: str, name: str) -> None:
        """Record ``report_files/NAME`` as the report's figure ``key``."""
        self.summary["figures"][key] = f"report_files/{name}"
