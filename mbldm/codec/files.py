"""File-level codec operations behind ``mbldm codec fit|encode|decode``.

An encoded image is written as ``NAME.npy`` (the (h, w, c) index latent, uint8/uint16) plus ``NAME.json``
(``{"source", "size": [H, W], "spec"}``) so that decoding restores the original size.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mbldm.codec.codec import Codec
from mbldm.io.atomic import write_bytes, write_json
from mbldm.io.images import load_image, save_png, scan_images


def fit_from_folder(images: str | Path, spec: str, out: str | Path, patch_size: int = 8,
                    max_patches: int | None = None, seed: int = 0, flip: bool = True, overwrite: bool = False,
                    progress: bool = True) -> Codec:
    """Fit a codec on every image under ``images`` (recursive) and save it to ``out``.

    Raises:
        FileExistsError: ``out`` already holds a codec and ``overwrite`` is False (checked before fitting).
    """
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a codec (pass --overwrite to replace it)")
    paths = scan_images(images)
    root = Path(images)
    codec = Codec.fit((load_image(p) for p in paths), spec=spec, patch_size=patch_size, max_patches=max_patches,
                      seed=seed, flip=flip, progress=progress,
                      sources=[str(p.relative_to(root)) if root.is_dir() else p.name for p in paths])
    codec.save(out, overwrite=overwrite)
    return codec


def _inputs(inputs: list[str | Path], suffixes: tuple[str, ...] | None) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if suffixes is None:
            found.extend(scan_images(p))
        elif p.is_dir():
            hits = sorted(q for q in p.rglob("*") if q.suffix.lower() in suffixes and not q.name.startswith("."))
            if not hits:
                raise ValueError(f"{p}: no {'/'.join(suffixes)} files found")
            found.extend(hits)
        elif not p.exists():
            raise FileNotFoundError(f"{p}: no such file")
        else:
            found.append(p)
    return found


def encode_files(codec_dir: str | Path, inputs: list[str | Path], out: str | Path,
                 overwrite: bool = False) -> list[Path]:
    """Encode image files / folders to ``out/NAME.npy`` index latents (+ ``NAME.json`` with the original size).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False (nothing is written in that case).
    """
    codec = Codec.load(codec_dir)
    paths = _inputs(inputs, None)
    out = Path(out)
    targets = [out / f"{p.stem}.npy" for p in paths]
    if len(set(targets)) != len(targets):
        raise ValueError("two inputs share a file name; encode them into different --out folders")
    if not overwrite:
        clash = [t for t in targets if t.exists()]
        if clash:
            raise FileExistsError(f"{clash[0]}: already exists (pass --overwrite)")
    for p, target in zip(paths, targets):
        img = load_image(p)
        z = codec.encode(img)
        buf = io.BytesIO()
        np.save(buf, z, allow_pickle=False)
        write_bytes(target, buf.getvalue())
        write_json(target.with_suffix(".json"), {"source": str(p), "size": list(img.shape[:2]), "spec": codec.spec.name})
    return targets


def decode_files(codec_dir: str | Path, inputs: list[str | Path], out: str | Path,
                 overwrite: bool = False) -> list[Path]:
    """Decode ``.npy`` index latents (files or folders) to ``out/NAME.png`` (cropped to the size in NAME.json).

    Raises:
        ValueError: a file that is not an (h, w, c) integer latent of this codec (the message names it).
    """
    codec = Codec.load(codec_dir)
    paths = _inputs(inputs, (".npy",))
    out = Path(out)
    written = []
    for p in paths:
        try:
            z = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{p}: not a .npy index latent ({exc})") from None
        if z.ndim != 3 or not np.issubdtype(z.dtype, np.integer):
            raise ValueError(f"{p}: expected an integer (h, w, c) latent, got {z.dtype} {z.shape}")
        size = None
        meta = p.with_suffix(".json")
        if meta.exists():
            size = tuple(json.loads(meta.read_text())["size"])
        try:
            img = codec.decode(z, size=size)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
        target = out / f"{p.stem}.png"
        save_png(target, img, overwrite=overwrite)
        written.append(target)
    return written
