"""The latent store: a dataset encoded once into codec indices (§4.2.1), read memory-mapped by training.

Layout (shared contract 5)::

    STORE/store.json      {"format": "mbldm-latent-store", "version": 1, "resolution": R,
                           "latent_shape": [h, w, c], "dtype": "uint8"|"uint16", "num_codewords": K,
                           "spec": "...", "count": N, "shard_size": S, "num_shards": n,
                           "complete": true|false, "data": "<source>", "codec_sha256": "<hex>"}
    STORE/codec/          a byte-for-byte copy of the codec artifact (the store is self-contained)
    STORE/shards/shard_00000.npy ...   shard k: latents of images [k*S, min((k+1)*S, N)), (n_k, h, w, c)
    STORE/sources.jsonl   one {"index": i, "source": "<path relative to data, or LMDB key>"} per image

Shards are independent: each is encoded from its own images only (batches never cross a shard boundary) and
written atomically, so a build can be interrupted and resumed, or split across processes (process i of n builds
shards i, i+n, i+2n, ...) and gives the same bytes. ``"complete"`` becomes true only once every shard exists.
Training reads only the store and never decodes an image.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mbldm.io.atomic import atomic_path, write_json, write_text

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "build_latent_store",
    "LatentStore",
    "LatentDataset",
    "read_store_config",
    "remove_latent_store",
    "shard_path",
    "store_summary",
]

STORE_FORMAT = "mbldm-latent-store"
STORE_VERSION = 1
STORE_JSON = "store.json"
SOURCES_JSONL = "sources.jsonl"
CODEC_DIR = "codec"
SHARDS_DIR = "shards"
_DTYPES = ("uint8", "uint16")
# store.json keys that must match for an interrupted build to be resumed ("complete" may differ).
_BUILD_KEYS = ("format", "version", "resolution", "latent_shape", "dtype", "num_codewords", "spec", "count",
               "shard_size", "num_shards", "data", "codec_sha256", "hflip")


# ----------------------------------------------------------------------------------------------- layout helpers

def shard_path(store: str | os.PathLike, k: int) -> Path:
    """Path of shard ``k``: ``STORE/shards/shard_{k:05d}.npy``."""
    return Path(store) / SHARDS_DIR / f"shard_{k:05d}.npy"


def _shard_range(k: int, shard_size: int, count: int) -> tuple[int, int]:
    """Image indices ``[start, stop)`` covered by shard ``k``."""
    return k * shard_size, min((k + 1) * shard_size, count)


def _shard_len(k: int, shard_size: int, count: int) -> int:
    """Number of images n_k in shard ``k``."""
    start, stop = _shard_range(k, shard_size, count)
    return stop - start


def _dir_sha256(path: Path) -> str:
    """SHA-256 over every file under ``path`` (sorted relative POSIX names and contents): the codec's identity."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_config(cfg: Any, file: Path) -> dict:
    """Check a parsed store.json; raise ValueError naming ``file`` on anything foreign or inconsistent."""
    if not isinstance(cfg, dict) or cfg.get("format") != STORE_FORMAT:
        raise ValueError(f"{file}: not an mbldm latent store (\"format\" is not {STORE_FORMAT!r})")
    if cfg.get("version") != STORE_VERSION:
        raise ValueError(f"{file}: unsupported latent store version {cfg.get('version')!r} "
                         f"(this mbldm reads version {STORE_VERSION})")
    problems = []
    for key in ("resolution", "num_codewords", "count", "shard_size", "num_shards"):
        if not _is_int(cfg.get(key)) or cfg[key] <= 0:
            problems.append(f"{key!r} must be a positive integer")
    shape = cfg.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        problems.append("'latent_shape' must be [h, w, c] positive integers")
    if cfg.get("dtype") not in _DTYPES:
        problems.append(f"'dtype' must be one of {_DTYPES}")
    for key in ("spec", "data"):
        if not isinstance(cfg.get(key), str):
            problems.append(f"{key!r} must be a string")
    if not isinstance(cfg.get("complete"), bool):
        problems.append("'complete' must be true or false")
    if not problems:
        if cfg["num_shards"] != math.ceil(cfg["count"] / cfg["shard_size"]):
            problems.append("'num_shards' != ceil(count / shard_size)")
        if cfg["dtype"] == "uint8" and cfg["num_codewords"] > 256:
            problems.append("'num_codewords' > 256 does not fit 'dtype' uint8")
        if cfg["num_codewords"] > 65536:
            problems.append("'num_codewords' > 65536 does not fit uint16")
    if problems:
        raise ValueError(f"{file}: damaged latent store config: " + "; ".join(problems))
    return cfg


def read_store_config(store: str | os.PathLike) -> dict:
    """Read and validate ``STORE/store.json`` (complete or not).

    Raises:
        FileNotFoundError: no store.json.  ValueError: unreadable JSON, a foreign file or a damaged config
        (the message names the file).
    """
    file = Path(store) / STORE_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (not a latent store, or `latents build` never started)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc
    return _validate_config(cfg, file)


def _sources_text(sources: Sequence[str]) -> str:
    return "".join(json.dumps({"index": i, "source": s}, ensure_ascii=False) + "\n" for i, s in enumerate(sources))


def _shard_ok(store: Path, k: int, cfg: dict) -> bool:
    """True when shard ``k`` exists with the expected shape and dtype (shards are written atomically)."""
    path = shard_path(store, k)
    if not path.is_file():
        return False
    start, stop = _shard_range(k, cfg["shard_size"], cfg["count"])
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.shape == (stop - start, *cfg["latent_shape"]) and arr.dtype == np.dtype(cfg["dtype"])


def _write_shard(path: Path, latents: np.ndarray) -> None:
    """Atomically ``np.save`` ``latents`` (n_k, h, w, c) to ``path``."""
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare temp name
            np.save(f, latents, allow_pickle=False)


def remove_latent_store(store: str | os.PathLike) -> None:
    """Delete a latent store (store.json, sources.jsonl, codec/, shards/) and the folder if then empty.

    Only a folder whose store.json names the store format is touched; other files in it are left alone.

    Raises:
        FileNotFoundError: no store.json.  ValueError: store.json is not a latent store's.
    """
    store = Path(store)
    file = store / STORE_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (refusing to delete a folder that is not a latent store)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        cfg = None
    if not isinstance(cfg, dict) or cfg.get("format") != STORE_FORMAT:
        raise ValueError(f"{file}: not an mbldm latent store (refusing to delete {store})")
    for name in (SHARDS_DIR, CODEC_DIR):
        shutil.rmtree(store / name, ignore_errors=True)
    (store / SOURCES_JSONL).unlink(missing_ok=True)
    file.unlink()
    if not any(store.iterdir()):
        store.rmdir()


def _is_empty_dir(path: Path) -> bool:
    """True for a folder holding nothing but leftover atomic-write temporaries (``.name.XXXX.tmp``)."""
    return all(p.name.startswith(".") and p.name.endswith(".tmp") for p in path.iterdir())


# ------------------------------------------------------------------------------------------------------- build

def _load_codec(codec_dir: Path):
    from mbldm.codec import Codec

    return Codec.load(codec_dir)


def _copy_codec(codec_dir: Path, dest: Path, sha256: str) -> None:
    """Copy the codec artifact to ``dest`` atomically (copy to a temporary folder, then rename), or check it."""
    if not dest.exists():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(codec_dir, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    if _dir_sha256(dest) != sha256:
        raise ValueError(f"{dest}: the store's codec copy differs from {codec_dir} (damaged store; "
                         f"rebuild with overwrite=True)")


def _int_arg(name: str, value: Any, low: int) -> int:
    """``value`` as a Python int >= ``low`` (numpy integers accepted), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _shard_batches(shards: Iterable[int], shard_size: int, count: int, batch_size: int) -> list[list[int]]:
    """Index batches of the given shards, in order; a batch never crosses a shard boundary."""
    batches = []
    for k in shards:
        start, stop = _shard_range(k, shard_size, count)
        batches.extend(list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size))
    return batches


def build_latent_store(
    codec_dir: str | os.PathLike,
    data: str | os.PathLike,
    resolution: int,
    out: str | os.PathLike,
    shard_size: int = 1024,
    batch_size: int = 32,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    hflip: bool = False,
) -> Path:
    """Encode every image of ``data`` once into codec indices and write the latent store ``out`` (§4.2.1).

    Images come from :func:`mbldm.data.datasets.open_image_dataset` (folder or LMDB, short side resized to R,
    centre crop R x R), are decoded by a DataLoader with ``num_workers`` workers and encoded in batches of at
    most ``batch_size`` with ``codec.encode``: uint8 (B, R, R, 3) -> indices (B, h, w, c), h = w = R / s,
    stored as ``codec.index_dtype`` (uint8 when K <= 256, else uint16).

    Shard k holds images ``[k*S, min((k+1)*S, N))`` and is written atomically. Re-running an interrupted build
    with the same arguments skips the shards already written (``batch_size``, ``num_workers`` and
    ``progress`` may change). With ``num_processes = n > 1`` process ``process_index = i`` builds shards
    i, i+n, ...; all processes produce the same bytes as one process, and the one finishing last marks the
    store complete. ``overwrite=True`` deletes an existing store first (single process only: with several
    processes, call :func:`remove_latent_store` once before starting them).

    Args:
        codec_dir: a codec artifact (``Codec.save``), copied into ``out/codec``.
        data: an image folder (recursive) or an LMDB (folder holding data.mdb, or a .mdb file).
        resolution: R, a multiple of the codec's patch size s.
        out: the store folder (created; must be empty or a store of this build).
        shard_size: S, images per shard.  batch_size: images per ``codec.encode`` call (within one shard).
        num_workers: DataLoader worker processes decoding images (0: in this process).
        overwrite: delete an existing store at ``out`` and start over.  progress: show a tqdm bar.
        process_index, num_processes: build only shards k with k % num_processes == process_index.
        hflip: also encode every image's horizontal mirror (:class:`mbldm.data.datasets.MirroredDataset`):
            the store holds 2N latents, entries N..2N-1 the mirrors (source ``"<source>#hflip"``), so that
            training sees horizontal flips; store.json records ``"hflip": true``.

    Returns:
        ``Path(out)``.

    Raises:
        ValueError: R not divisible by s, bad arguments, a store of different arguments or data at ``out``,
        a non-empty folder that is not a store, a damaged store.
        FileExistsError: ``out`` is already a complete store and ``overwrite`` is False.
        FileNotFoundError: ``codec_dir`` or ``data`` missing.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mbldm.data.datasets import MirroredDataset, collate_images, open_image_dataset

    R = _int_arg("resolution", resolution, 1)
    shard_size = _int_arg("shard_size", shard_size, 1)
    batch_size = _int_arg("batch_size", batch_size, 1)
    num_workers = _int_arg("num_workers", num_workers, 0)
    num_processes = _int_arg("num_processes", num_processes, 1)
    process_index = _int_arg("process_index", process_index, 0)
    if process_index >= num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    codec_dir, out = Path(codec_dir), Path(out)
    if not codec_dir.is_dir():
        raise FileNotFoundError(f"{codec_dir}: no such codec folder")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")

    existing: dict | None = None
    if (out / STORE_JSON).exists():
        if overwrite:
            if num_processes > 1:
                raise ValueError(f"{out}: overwrite=True with num_processes > 1 would let processes delete "
                                 f"each other's shards; call remove_latent_store({str(out)!r}) once first")
            remove_latent_store(out)
        else:
            existing = read_store_config(out)
            if existing["complete"]:
                raise FileExistsError(f"{out}: a complete latent store already exists "
                                      f"(pass overwrite=True / --overwrite to rebuild it)")
    elif out.is_dir() and not _is_empty_dir(out):
        raise ValueError(f"{out}: folder is not empty and holds no {STORE_JSON} (not a latent store; "
                         f"refusing to write into it)")

    codec = _load_codec(codec_dir)
    s = int(codec.patch_size)
    if R % s != 0:
        raise ValueError(f"resolution {R} is not divisible by the codec's patch size {s} ({codec_dir}); "
                         f"use a multiple of {s}, e.g. {max(s, R // s * s)}")
    dtype = np.dtype(codec.index_dtype)
    if dtype.name not in _DTYPES:
        raise ValueError(f"{codec_dir}: codec index dtype {dtype} is not uint8/uint16")

    dataset = open_image_dataset(data, R)
    if hflip:
        dataset = MirroredDataset(dataset)
    N = len(dataset)
    sources = [dataset.source(i) for i in range(N)]
    latent_shape = [R // s, R // s, int(codec.latent_channels)]
    cfg = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "resolution": R, "latent_shape": latent_shape,
        "dtype": dtype.name, "num_codewords": int(codec.num_codewords), "spec": str(codec.spec.name), "count": N,
        "shard_size": shard_size, "num_shards": math.ceil(N / shard_size), "complete": False,
        "data": str(Path(data).resolve()), "codec_sha256": _dir_sha256(codec_dir), "hflip": bool(hflip),
    }
    _validate_config(cfg, out / STORE_JSON)

    # -- set up, or check that the interrupted build had the same arguments
    if existing is not None:
        diff = [k for k in _BUILD_KEYS if existing.get(k, False if k == "hflip" else None) != cfg[k]]
        if diff:
            detail = ", ".join(f"{k}: store {existing.get(k)!r} vs now {cfg[k]!r}" for k in diff)
            raise ValueError(f"{out / STORE_JSON}: an unfinished latent store built with different arguments "
                             f"({detail}); re-run with the same arguments to resume, or overwrite=True")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / STORE_JSON, cfg)
    sources_file, text = out / SOURCES_JSONL, _sources_text(sources)
    if not sources_file.exists():
        write_text(sources_file, text)
    elif sources_file.read_text(encoding="utf-8") != text:
        raise ValueError(f"{sources_file}: the images of {data} changed since this store was started "
                         f"(re-run with overwrite=True to start over)")
    _copy_codec(codec_dir, out / CODEC_DIR, cfg["codec_sha256"])
    (out / SHARDS_DIR).mkdir(exist_ok=True)

    # -- encode the missing shards of this process
    mine = range(process_index, cfg["num_shards"], num_processes)
    todo = [k for k in mine if not _shard_ok(out, k, cfg)]
    total = sum(_shard_len(k, shard_size, N) for k in mine)
    remaining = sum(_shard_len(k, shard_size, N) for k in todo)
    batches = _shard_batches(todo, shard_size, N, batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers if batches else 0,
                        collate_fn=collate_images)
    bar = tqdm(total=total, initial=total - remaining, unit="img", disable=not progress,
               desc=f"encoding {out.name}" + (f" [{process_index}/{num_processes}]" if num_processes > 1 else ""))
    pending = iter(todo)
    k = next(pending, None)
    parts: list[np.ndarray] = []
    filled = 0
    with bar:
        for images, _ in loader:  # images: uint8 (B, R, R, 3)
            z = np.asarray(codec.encode(images))  # (B, h, w, c)
            if z.shape != (len(images), *latent_shape):
                raise RuntimeError(f"{codec_dir}: codec.encode returned {z.shape}, expected "
                                   f"{(len(images), *latent_shape)}")
            if z.min() < 0 or z.max() >= cfg["num_codewords"]:
                raise RuntimeError(f"{codec_dir}: codec.encode returned indices outside [0, K)")
            parts.append(z.astype(dtype, copy=False))
            filled += len(images)
            bar.update(len(images))
            if filled == _shard_len(k, shard_size, N):
                _write_shard(shard_path(out, k), np.concatenate(parts))
                parts, filled, k = [], 0, next(pending, None)

    if all(_shard_ok(out, j, cfg) for j in range(cfg["num_shards"])):
        write_json(out / STORE_JSON, {**cfg, "complete": True})
    return out


# ------------------------------------------------------------------------------------------------------ reading

class LatentStore:
    """Read a complete latent store: memory-mapped shards, ``len(store)``, ``store[i] -> (h, w, c)``.

    Shards are opened on first use with ``np.load(mmap_mode="r")`` (per process; pickling the store, e.g. into
    DataLoader workers, does not carry the maps) and checked against store.json.

    Attributes:
        path, config (the store.json dict), codec_dir (``path / "codec"``), num_codewords (K),
        latent_shape ((h, w, c)), resolution (R), dtype (numpy uint8/uint16), spec (codec spec name).

    Raises:
        FileNotFoundError: no store.json.  ValueError: a foreign or damaged store.json, an incomplete build, or
        (on access) a shard missing or of the wrong shape/dtype, naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_store_config(self.path)
        if not self.config["complete"]:
            raise ValueError(f"{self.path / STORE_JSON}: the latent store is incomplete (interrupted build? "
                             f"re-run `mbldm latents build` with the same arguments to finish it)")
        self._shards: list[np.ndarray | None] = [None] * self.config["num_shards"]
        self._sources: list[str] | None = None

    # -- metadata
    @property
    def codec_dir(self) -> Path:
        return self.path / CODEC_DIR

    @property
    def num_codewords(self) -> int:
        return int(self.config["num_codewords"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h, w, c = self.config["latent_shape"]
        return int(h), int(w), int(c)

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config["dtype"])

    @property
    def spec(self) -> str:
        return self.config["spec"]

    def __len__(self) -> int:
        return int(self.config["count"])

    def __repr__(self) -> str:
        return f"LatentStore({str(self.path)!r}, count={len(self)}, latent_shape={self.latent_shape})"

    @property
    def sources(self) -> list[str]:
        """Source of each image (path relative to ``config["data"]`` or LMDB key), from sources.jsonl."""
        if self._sources is None:
            file = self.path / SOURCES_JSONL
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no such file (damaged latent store)")
            sources = []
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
                try:
                    row = json.loads(line)
                    ok = row["index"] == n and isinstance(row["source"], str)
                except (json.JSONDecodeError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(f"{file}: line {n + 1} is not {{\"index\": {n}, \"source\": \"...\"}}")
                sources.append(row["source"])
            if len(sources) != len(self):
                raise ValueError(f"{file}: {len(sources)} entries, store.json says {len(self)}")
            self._sources = sources
        return self._sources

    def load_codec(self):
        """The store's own codec (``Codec.load(store.codec_dir)``)."""
        return _load_codec(self.codec_dir)

    # -- data
    def shard(self, k: int) -> np.ndarray:
        """Shard ``k`` memory-mapped read-only: (n_k, h, w, c) uint8/uint16."""
        if self._shards[k] is None:
            path = shard_path(self.path, k)
            if not path.is_file():
                raise ValueError(f"{path}: missing shard (damaged latent store)")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: unreadable shard ({exc})") from exc
            start, stop = _shard_range(k, self.config["shard_size"], len(self))
            expected = (stop - start, *self.latent_shape)
            if arr.shape != expected or arr.dtype != self.dtype:
                raise ValueError(f"{path}: shard is {arr.dtype} {arr.shape}, store.json expects "
                                 f"{self.dtype} {expected}")
            self._shards[k] = arr
        return self._shards[k]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"latent index {i} out of range for a store of {n}")
        i %= n
        return divmod(i, self.config["shard_size"])

    def __getitem__(self, i: int) -> np.ndarray:
        """Latent ``i`` as an in-memory array (h, w, c) of the store dtype (integer indices in [0, K))."""
        k, j = self._locate(int(i))
        return np.array(self.shard(k)[j])

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """Latents of ``indices`` stacked: (B, h, w, c), store dtype, in the given order."""
        out = np.empty((len(indices), *self.latent_shape), dtype=self.dtype)
        for b, i in enumerate(indices):
            k, j = self._locate(int(i))
            out[b] = self.shard(k)[j]
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._shards)
        return state


class LatentDataset:
    """A torch map-style dataset over a :class:`LatentStore`: item ``i`` is a LongTensor (c, h, w) in [0, K).

    ``store`` may be a :class:`LatentStore` or its path.
    """

    def __init__(self, store: LatentStore | str | os.PathLike):
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        import torch

        z = self.store[i].astype(np.int64)  # (h, w, c)
        return torch.from_numpy(z).permute(2, 0, 1).contiguous()  # (c, h, w)


def store_summary(store: str | os.PathLike) -> str:
    """One line describing the store at ``store`` (complete or not): count, shapes, codec, shards.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_store_config`.
    """
    store = Path(store)
    cfg = read_store_config(store)
    h, w, c = cfg["latent_shape"]
    done = sum(_shard_ok(store, k, cfg) for k in range(cfg["num_shards"]))
    n, count = cfg["num_shards"], cfg["count"]
    state = "complete" if cfg["complete"] else f"INCOMPLETE ({done}/{n} {_plural(n, 'shard')} written)"
    return (f"{store}: {count} {_plural(count, 'latent')} {h}x{w}x{c} {cfg['dtype']} (K={cfg['num_codewords']}, "
            f"{cfg['spec']}) of {cfg['resolution']}x{cfg['resolution']} images"
            f"{' and their mirrors' if cfg.get('hflip') else ''} from {cfg['data']}, "
            f"{n} {_plural(n, 'shard')} of {cfg['shard_size']}, {state}")


def _plural(n: int, word: str) -> str:
    """``word`` for n == 1, else ``word + "s"``."""
    return word if n == 1 else word + "s"
