"""Fixtures shared across the test suite.

Real images are read from ``../shared/data`` beside the repository (never copied into it); tests that need one
skip with a clear reason when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(os.environ.get("MBLDM_TEST_DATA")  # real images: ../shared/data by default
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def real_image():
    """``real_image("sipi/lena.png") -> uint8 (H, W, 3)`` via ``mbldm.load_image``; skips if the file is absent."""
    from mbldm.io.images import load_image

    def load(relative: str) -> np.ndarray:
        path = SHARED_DATA / relative
        if not path.is_file():
            pytest.skip(f"real test image {path} not available (see MBLDM_TEST_DATA in README)")
        return load_image(path)

    return load


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (use with ``pytest.mark.usefixtures``): on a shared 2-core
    machine several threads only spin against each other on tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss's OpenMP threads busy-wait; on a shared 2-core machine one thread is ~10x faster."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
