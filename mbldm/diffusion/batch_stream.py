"""The deterministic data stream of training: what step ``n`` sees is a function of ``(seed, n, ...)`` only.

Every random draw of step ``n`` is derived from ``(seed, n, ...)`` by :func:`step_seed`, never from a running RNG:
the global batch of step n is positions ``[n*B, (n+1)*B)`` of a sequence of per-epoch random permutations of the
store (:func:`global_batch_indices`); the timestep and noise of global batch position j come from a generator
seeded with ``(seed, n, j)`` (:func:`noise_and_timesteps`); the self-conditioning coin from ``(seed, n)``
(:func:`use_self_condition`); the categorical Gumbel noise of position j has its own generator,
``(seed, n, "gumbel", j)`` (:func:`gumbel_generators`). Process r of n takes positions ``[r*B/n, (r+1)*B/n)``,
i.e. the same images, timesteps and noise as a single process at those positions. Hence a checkpoint needs no
data-loader state, and resuming gives the same weights as not stopping.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any

__all__ = [
    "step_seed",
    "global_batch_indices",
    "noise_and_timesteps",
    "use_self_condition",
    "gumbel_generators",
    "BatchLoader",
]

def step_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``(seed, step, position)``) by SHA-256: stable across runs,
    platforms and processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, count: int):
    import torch

    g = torch.Generator().manual_seed(step_seed(seed, "epoch", epoch))
    return torch.randperm(count, generator=g).numpy()


def global_batch_indices(seed: int, step: int, batch_size: int, count: int, start: int = 0,
                         stop: int | None = None):
    """Store indices of global batch positions ``[start, stop)`` of step ``step`` (0-based).

    The data stream is the concatenation of per-epoch permutations of ``range(count)`` (epoch e permuted with
    seed ``(seed, "epoch", e)``); step n takes stream positions ``[n*B, (n+1)*B)``, so every image is seen
    once per epoch and the batch depends only on (seed, step, B).
    Returns:
        int64 numpy array of length ``stop - start`` with values in [0, count).
    """
    import numpy as np

    stop = batch_size if stop is None else stop
    if count < 1:
        raise ValueError("global_batch_indices: empty latent store")
    positions = step * batch_size + np.arange(start, stop, dtype=np.int64)
    epochs, offsets = np.divmod(positions, count)
    out = np.empty(len(positions), dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(seed, int(e), count)[offsets[sel]]
    return out


def noise_and_timesteps(seed: int, step: int, positions: range, shape: tuple[int, int, int], T: int):
    """Per-image timestep t ~ U{0..T-1} and noise ~ N(0, I) of shape (c, h, w), from generator (seed, step, j)."""
    import torch

    ts, noises = [], []
    for j in positions:
        g = torch.Generator().manual_seed(step_seed(seed, step, "image", j))
        ts.append(torch.randint(0, T, (1,), generator=g))
        noises.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(noises)  # (b,) int64, (b, c, h, w) float32


def use_self_condition(seed: int, step: int) -> bool:
    """The per-step coin of self-conditioning (p = 1/2), identical on every process."""
    import torch

    g = torch.Generator().manual_seed(step_seed(seed, step, "self-condition"))
    return bool(torch.rand((), generator=g) < 0.5)


def gumbel_generators(seed: int, step: int, positions: range, device: Any) -> list:
    """One generator per image of the categorical Gumbel noise, seeded with ``(seed, step, "gumbel", j)``."""
    import torch

    return [torch.Generator(device=device).manual_seed(step_seed(seed, step, "gumbel", j)) for j in positions]


class BatchLoader:
    """The store batches of one process's global batch positions, optionally prefetched by threads.

    A batch depends only on its step (:func:`global_batch_indices`), so ``num_workers`` threads may load the next
    steps' batches ahead of time without changing what any step sees.
    """

    def __init__(self, store: Any, seed: int, batch_size: int, positions: range, steps: int, num_workers: int):
        self.store, self.seed, self.batch_size, self.positions = store, seed, batch_size, positions
        self.steps, self.num_workers = steps, num_workers
        self.pending: dict[int, Any] = {}
        self.pool = None
        if num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=num_workers)

    def load(self, step: int):
        """The batch of ``step``: (b, h, w, c) uint8/uint16 indices."""
        idx = global_batch_indices(self.seed, step, self.batch_size, len(self.store), self.positions.start,
                                   self.positions.stop)
        return self.store.batch(idx.tolist())  # (b, h, w, c) uint8/uint16

    def get(self, step: int):
        """The batch of ``step``, queueing the next ``num_workers`` steps' batches when prefetching."""
        if self.pool is None:
            return self.load(step)
        fut = self.pending.pop(step, None) or self.pool.submit(self.load, step)
        for s in range(step + 1, min(step + 1 + self.num_workers, self.steps)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.load, s)
        return fut.result()

    def close(self) -> None:
        """Stop the prefetching threads (pending loads are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
