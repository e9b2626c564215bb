"""``mbldm nearest`` on files: Inception features of the training and generated sets, the memorisation statistics
of :mod:`mbldm.eval.memorisation`, a figure of the closest samples beside their nearest training images, JSON.

Outputs in ``OUT/``:

* ``nearest.json``: the summary (near-copy fraction, threshold, medians, sizes) and, per sample, its k nearest
  training images and distances;
* ``nearest.png``: one row per shown sample (the ``rows`` samples closest to the training set): the sample, then
  its k nearest training images, nearest first; every tile resized to ``tile x tile``
  (``mbldm.data.datasets.resize_center_crop``) and tiled with ``mbldm.diffusion.sampling.make_grid``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mbldm.eval.memorisation import DEFAULT_K, DEFAULT_QUANTILE, NearestNeighbours, nearest_neighbours, neighbour_rows

__all__ = ["JSON_FILE", "FIGURE_FILE", "MemorisationReport", "neighbour_figure", "memorisation_report"]

JSON_FILE = "nearest.json"
FIGURE_FILE = "nearest.png"
DEFAULT_ROWS = 8
DEFAULT_TILE = 128


@dataclass(frozen=True)
class MemorisationReport:
    """What :func:`memorisation_report` computed and wrote.

    Attributes:
        result: the :class:`~mbldm.eval.memorisation.NearestNeighbours` statistics.
        train_sources, fake_sources: the image of each training / sample feature row (paths as strings).
        shown: (rows,) int64 sample rows drawn in the figure. json_path, figure_path: the files written.
    """

    result: NearestNeighbours
    train_sources: list[str]
    fake_sources: list[str]
    shown: np.ndarray
    json_path: Path
    figure_path: Path

    def summary(self) -> dict[str, Any]:
        """The JSON summary fields (no per-sample list): sizes, k, quantile, threshold, fraction, medians."""
        r = self.result
        return {"n_train": len(self.train_sources), "n_fake": len(self.fake_sources), "k": int(r.indices.shape[1]),
                "quantile": r.quantile, "threshold": r.threshold, "near_copy_fraction": r.near_copy_fraction,
                "near_copies": int(np.sum(r.nearest < r.threshold)), "median_fake_distance": r.median_fake,
                "median_train_distance": r.median_train}


def neighbour_figure(samples: list[np.ndarray], neighbours: list[list[np.ndarray]], tile: int = DEFAULT_TILE
                     ) -> np.ndarray:
    """Tile each sample beside its nearest training images (pure array function).

    Args:
        samples: R uint8 (H, W, 3) images (sizes may differ). neighbours: R lists of k uint8 (H, W, 3) images.
        tile: side in pixels each image is resized to (short side scaled, centre crop).

    Returns:
        uint8 (R*(tile+2)+2, (k+1)*(tile+2)+2, 3) image: row r is ``samples[r]`` then ``neighbours[r]``.

    Raises:
        ValueError: no rows, rows with different k, or images that are not uint8 (H, W, 3).
    """
    from mbldm.data.datasets import resize_center_crop
    from mbldm.diffusion.sampling import make_grid

    if not samples or len(samples) != len(neighbours) or len({len(n) for n in neighbours}) != 1:
        raise ValueError(f"neighbour_figure needs R >= 1 samples and R lists of k neighbours each, got "
                         f"{len(samples)} samples and neighbour counts {[len(n) for n in neighbours]}")
    tiles = [resize_center_crop(im, tile) for s, row in zip(samples, neighbours) for im in (s, *row)]
    return make_grid(np.stack(tiles), ncol=1 + len(neighbours[0]))


def _check_outputs(out: Path, overwrite: bool) -> tuple[Path, Path]:
    json_path, figure_path = out / JSON_FILE, out / FIGURE_FILE
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: expected an output folder")
    for path in (json_path, figure_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (refusing to overwrite; pass overwrite=True / --overwrite)")
    return json_path, figure_path


def _image(source: str, what: str) -> np.ndarray:
    from mbldm.io.images import load_image

    if source.startswith("#"):
        raise ValueError(f"{what}: feature row {source} comes from an in-memory image, which cannot be drawn")
    return load_image(source)


def memorisation_report(
    train: str | os.PathLike,
    fake: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int = DEFAULT_K,
    quantile: float = DEFAULT_QUANTILE,
    rows: int = DEFAULT_ROWS,
    tile: int = DEFAULT_TILE,
    batch_size: int = 50,
    device: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> MemorisationReport:
    """Nearest training image of every generated sample, near-copy fraction, figure and JSON in ``out``.

    Args:
        train: folder of training images, or a statistics ``.npz`` with stored features and image paths
            (``mbldm fid --save-stats`` or :func:`mbldm.eval.fid.cache_features`; its images must still exist
            for the figure).
        fake: folder of generated images (an ``mbldm sample`` folder counts its ``img_*.png``), or such a file.
        out: output folder (created) for ``nearest.json`` and ``nearest.png``.
        k: training neighbours per sample (shown in the figure). quantile: near-copy quantile q in (0, 1).
        rows: samples in the figure (the closest ones). tile: figure tile side in pixels.
        batch_size, device, progress: as :func:`mbldm.eval.inception.extract_features` (network loaded once).
        overwrite: replace existing ``nearest.json`` / ``nearest.png``.

    Returns:
        :class:`MemorisationReport`.

    Raises:
        FileNotFoundError: ``train`` or ``fake`` missing (or a listed image gone when drawing). FileExistsError: an
        output exists and ``overwrite`` is False. ValueError: a statistics file without features or image paths,
        fewer than 2 training images, bad k / quantile / rows / tile (all but the vanished-image case before any
        feature extraction). Others as :func:`mbldm.eval.fid.compute_features`.
    """
    from mbldm.eval.fid import compute_features, has_features, missing_features_message
    from mbldm.eval.inception import InceptionFeatures
    from mbldm.io.atomic import write_json
    from mbldm.io.images import save_png

    out = Path(out)
    json_path, figure_path = _check_outputs(out, overwrite)
    if rows < 1 or tile < 1 or k < 1:
        raise ValueError(f"k, rows and tile must be >= 1, got k={k}, rows={rows}, tile={tile}")
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    for source in (train, fake):
        if not Path(source).exists():
            raise FileNotFoundError(f"{source}: neither an image folder nor a statistics .npz file")
        if Path(source).is_file() and not has_features(source):
            raise ValueError(missing_features_message(source))
    extractor = None
    if not (Path(train).is_file() and Path(fake).is_file()):
        extractor = InceptionFeatures(device)

    def features(source: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
        feats, sources = compute_features(source, batch_size=batch_size, progress=progress, extractor=extractor,
                                          return_sources=True)
        if sources is None:
            raise ValueError(f"{source}: statistics file stores features but not their image paths, which the "
                             f"figure needs; pass the image folder instead")
        return feats, sources

    train_features, train_sources = features(train)  # (N_train, 2048)
    if train_features.shape[0] < 2:
        raise ValueError(f"{train}: needs at least 2 usable training images, got {train_features.shape[0]}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be in [1, {train_features.shape[0]}] (training images), got {k}")
    fake_features, fake_sources = features(fake)  # (N_fake, 2048)
    if fake_features.shape[0] < 1:
        raise ValueError(f"{fake}: no usable generated images")
    result = nearest_neighbours(train_features, fake_features, k=k, quantile=quantile)
    shown = neighbour_rows(result, rows)
    report = MemorisationReport(result, train_sources, fake_sources, shown, json_path, figure_path)
    samples = [{"source": fake_sources[i], "distances": [float(d) for d in result.distances[i]],
                "neighbours": [train_sources[j] for j in result.indices[i]]} for i in range(len(fake_sources))]
    out.mkdir(parents=True, exist_ok=True)
    write_json(json_path, {"train": str(train), "fake": str(fake), **report.summary(),
                           "figure": FIGURE_FILE, "figure_rows": [fake_sources[i] for i in shown],
                           "samples": samples}, overwrite=overwrite)
    figure = neighbour_figure([_image(fake_sources[i], str(fake)) for i in shown],
                              [[_image(train_sources[j], str(train)) for j in result.indices[i]] for i in shown], tile)
    save_png(figure_path, figure, overwrite=overwrite)
    return report
