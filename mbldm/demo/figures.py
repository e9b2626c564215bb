"""Figures of the demo report (matplotlib, Agg backend): codec vs JPEG crops, the ordering effect (Fig. 3), loss
curves, the sampling trajectory (Fig. 7) and sample grids.

Computation and drawing are separate: ``ordering_effect`` and ``comparison_crop`` return arrays, the ``plot_*``
functions only draw arrays into a PNG file (written atomically).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "channel_codewords",
    "shift_indices",
    "ordering_effect",
    "center_crop",
    "plot_comparison",
    "plot_ordering",
    "read_metrics",
    "plot_loss_curves",
    "plot_trajectory",
    "save_grid",
]

DPI = 100


def _figure(width_in: float, height_in: float):
    """A matplotlib Figure not attached to pyplot (no global backend state; rendered by Agg on save)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    from mbldm.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------------ ordering effect
def channel_codewords(codec) -> np.ndarray:
    """K_j, the codebook size of every latent channel j (Y sub-quantizers first, then Cb, Cr): int64 (c,)."""
    return np.array([cq.k for cq in codec.spec.channels for _ in range(cq.m)], dtype=np.int64)


def shift_indices(z: np.ndarray, k_per_channel: np.ndarray, delta: int = 1) -> np.ndarray:
    """z + delta, clamped to [0, K_j - 1] per latent channel: integer (..., c) -> same dtype (Fig. 3b/c: delta=1)."""
    shifted = z.astype(np.int64) + int(delta)
    return np.clip(shifted, 0, np.asarray(k_per_channel) - 1).astype(z.dtype)


def ordering_effect(codec, image: np.ndarray) -> dict:
    """The three panels of Fig. 3 for one image and a codec (§3.2.1).

    (a) D(E(x)) (reconstruction noise only); (b) D(E(x) + 1) with the codewords in k-means order (the codec
    re-indexed with ``codec.reordered(False)``); (c) D(E(x) + 1) with the PCA ordering. Both codecs reconstruct x
    identically; only the meaning of "index + 1" differs.

    Args:
        codec: a fitted ``mbldm.codec.Codec``.
        image: uint8 (H, W, 3).

    Returns:
        {"original", "reconstruction", "shift_unordered", "shift_ordered"}: uint8 (H, W, 3) arrays, and
        "psnr": {panel: PSNR in dB against the original}, "ordinality": {"ordered", "unordered"}: mean ordinality
        over the c sub-codebooks (``ordering.ordinality``: 1 ~ random order, small = neighbours are similar).
    """
    from mbldm.eval.metrics import psnr

    size = image.shape[:2]
    ordered = codec.reordered(True)
    unordered = codec.reordered(False)
    k = channel_codewords(codec)
    z_o = ordered.encode(image)  # (h, w, c)
    z_u = unordered.encode(image)
    out = {
        "original": image,
        "reconstruction": ordered.decode(z_o, size=size),
        "shift_unordered": unordered.decode(shift_indices(z_u, k), size=size),
        "shift_ordered": ordered.decode(shift_indices(z_o, k), size=size),
    }
    out["psnr"] = {name: psnr(image, out[name]) for name in ("reconstruction", "shift_unordered", "shift_ordered")}
    out["ordinality"] = {"ordered": float(np.mean(ordered.ordinality())),
                         "unordered": float(np.mean(unordered.ordinality()))}
    return out


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central min(size, H) x min(size, W) window of an (H, W, ...) array."""
    H, W = img.shape[:2]
    h, w = min(size, H), min(size, W)
    top, left = (H - h) // 2, (W - w) // 2
    return img[top:top + h, left:left + w]


# ------------------------------------------------------------------------------------------------ image panels
def _panel_row(fig, rows: Sequence[Sequence[tuple[np.ndarray, str]]]) -> None:
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    for i, row in enumerate(rows):
        for j, (img, title) in enumerate(row):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])


def plot_comparison(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Crops side by side, one row per image: original | ours | JPEG at the same bit rate.

    Args:
        rows: dicts with "name", "original", "ours", "jpeg" (uint8 (h, w, 3) crops of the same window) and the
            numbers "bpp", "psnr", "jpeg_bpp", "jpeg_psnr", "jpeg_quality", "spec".
        path: PNG to write.
    """
    fig = _figure(9, 3 * len(rows))
    panels = []
    for r in rows:
        panels.append([
            (r["original"], f"{r['name']}: original"),
            (r["ours"], f"{r['spec']}: {r['bpp']:.3f} bpp, {r['psnr']:.2f} dB"),
            (r["jpeg"], f"JPEG q={r['jpeg_quality']}: {r['jpeg_bpp']:.3f} bpp, {r['jpeg_psnr']:.2f} dB"),
        ])
    _panel_row(fig, panels)
    return _save(fig, path)


def plot_ordering(effect: dict, path: str | os.PathLike) -> Path:
    """Fig. 3 of the paper from :func:`ordering_effect`'s result: original, (a), (b), (c) in one row."""
    p = effect["psnr"]
    fig = _figure(12, 3.4)
    _panel_row(fig, [[
        (effect["original"], "x"),
        (effect["reconstruction"], f"(a) D(E(x)): {p['reconstruction']:.2f} dB"),
        (effect["shift_unordered"], f"(b) D(E(x)+1), k-means order: {p['shift_unordered']:.2f} dB"),
        (effect["shift_ordered"], f"(c) D(E(x)+1), PCA order: {p['shift_ordered']:.2f} dB"),
    ]])
    return _save(fig, path)


def plot_trajectory(t: Sequence[int], x_t: np.ndarray, x0: np.ndarray, path: str | os.PathLike,
                    title: str = "") -> Path:
    """Fig. 7: the decoded state x_t (top row) and the model's x0 estimate (bottom row) at each recorded t.

    Args:
        t: the m recorded paper times (descending, e.g. 1000, 900, ..., 0).
        x_t, x0: uint8 (m, H, W, 3) decoded frames (``sample(..., trajectory=...)["trajectory"]`` of one image).
        path: PNG to write.
    """
    m = len(t)
    fig = _figure(1.3 * m, 3.2)
    _panel_row(fig, [[(x_t[i], f"x_t, t={t[i]}") for i in range(m)],
                          [(x0[i], f"x0 est., t={t[i]}") for i in range(m)]])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int | None = None) -> Path:
    """uint8 (N, H, W, 3) -> a grid PNG (``mbldm.diffusion.sampling.make_grid``), written atomically."""
    from mbldm.diffusion.sampling import make_grid
    from mbldm.io.images import save_png

    save_png(path, make_grid(images, ncol=ncol), overwrite=True)
    return Path(path)


# ------------------------------------------------------------------------------------------------ loss curves
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON rows of a ``metrics.jsonl`` file (a torn last line is skipped); [] if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curves(curves: Sequence[tuple[str, list[dict], Sequence[str]]], path: str | os.PathLike) -> Path:
    """One panel per run: the listed metric keys against "step", log-scaled y.

    Args:
        curves: (title, metrics rows, keys to plot) per panel, e.g. ("continuous", rows, ("loss", "loss_q0")).
        path: PNG to write.

    Raises:
        ValueError: no panel has any data.
    """
    curves = [c for c in curves if c[1]]
    if not curves:
        raise ValueError("plot_loss_curves: no metrics rows to plot")
    fig = _figure(4.2 * len(curves), 3.2)
    for i, (title, rows, keys) in enumerate(curves):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), label=key, lw=1.2 if key == "loss" else 0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)
