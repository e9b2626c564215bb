"""Numpy representation of one channel's trained quantizer (what crosses the faiss boundary)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrainedQuantizer:
    """Numpy view of a trained quantizer of one image channel.

    Attributes:
        method: "VQ", "PQ", "OPQ" or "RQ".
        codebooks: float32 (M, K, dsub).
        rotation: float32 (d, d) orthogonal R (OPQ only, rotated = x @ R.T), else None.
    """

    method: str
    codebooks: np.ndarray
    rotation: np.ndarray | None = None

    @property
    def m(self) -> int:
        return self.codebooks.shape[0]

    @property
    def k(self) -> int:
        return self.codebooks.shape[1]

    @property
    def nbits(self) -> int:
        return int(np.log2(self.k))

    @property
    def d(self) -> int:
        return self.codebooks.shape[2] * (1 if self.method == "RQ" else self.m)
