"""The model-based codec (§3.1, Fig. 1): RGB -> YCbCr -> s x s patches -> one quantizer per channel.

An image (H, W, 3) becomes an index latent (h, w, c) with h = ceil(H/s), w = ceil(W/s) and c latent channels (one
per sub-quantizer: Y's first, then Cb's, then Cr's). Codewords are ordered by their first principal component
(§3.2.1) once at fit time.

Decoding is pure table look-up, without faiss: every quantizer here is additive in pixel space (PQ = sum of
zero-padded sub-codewords, OPQ adds the inverse rotation R^T, RQ sums codewords), and YCbCr -> RGB is affine, so
each latent channel j owns a table T_j of shape (K, s, s, 3) holding the RGB contribution of each codeword, and

    x_rgb(patch) = bias + sum_j T_j[z_j]                                              (decode, Eq. 8)
    x_rgb(patch) = bias + sum_j sum_k w_jk T_j[k]                                     (decode_soft, Eq. 21)

Artifacts: a directory with ``config.json`` (CodecConfig) and ``codebooks.safetensors`` (per channel
``{Y,Cb,Cr}.codebooks`` (M, K, dsub), ``{ch}.rotation`` (d, d) for OPQ, ``{ch}.permutation`` (M, K): the ordering
applied, ordered[k] = unordered[permutation[k]]).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mbldm.codec import color, ordering, patches
from mbldm.codec.codebooks import TrainedQuantizer
from mbldm.codec.spec import CHANNELS, CodecSpec, parse_spec

FORMAT = "mbldm-codec"
VERSION = 1
CONFIG_FILE = "config.json"
ARRAYS_FILE = "codebooks.safetensors"
COLOR_CONVENTION = "YCbCr full-range BT.601 (JPEG/JFIF, ITU-T T.871)"
ORDERING = "pca-first-component-descending"


@dataclasses.dataclass
class CodecConfig:
    """JSON-serialised description of a codec artifact (``config.json``)."""

    spec: str
    patch_size: int = 8
    format: str = FORMAT
    version: int = VERSION
    color: str = COLOR_CONVENTION
    ordering: str | None = ORDERING
    latent_channels: int = 0
    num_codewords: int = 0
    index_dtype: str = "uint8"
    padding: str = "edge replication at bottom/right to a multiple of s; decode(size=...) crops"
    training: dict = dataclasses.field(default_factory=dict)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[codec] {msg}", file=sys.stderr, flush=True)


def _as_batch(x: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(x)
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"expected uint8 (H, W, 3) or (B, H, W, 3) images, got shape {x.shape}")


def _training_patches(images: list[np.ndarray], ch: int, s: int, flip: bool) -> np.ndarray:
    """All stride-1 patches of YCbCr channel ``ch`` of every image (+ vertical flips) -> float32 (N, s*s)."""
    parts = []
    for img in images:
        p = patches.stride1_patches(color.rgb_to_ycbcr_planes(img)[ch], s)
        parts.append(p)
        if flip:  # patches of the vertically flipped image = patches with their rows reversed
            parts.append(np.ascontiguousarray(p.reshape(-1, s, s)[:, ::-1, :].reshape(-1, s * s)))
    return np.concatenate(parts) if parts else np.empty((0, s * s), np.float32)


class Codec:
    """A fitted model-based codec. Build with ``Codec.fit`` or ``Codec.load``.

    Attributes:
        spec: the parsed CodecSpec; ``patch_size`` (s); ``latent_channels`` (c); ``num_codewords`` (K, the
        largest codebook size); ``codebook_sizes`` ((c,) K_j of each latent channel); ``index_dtype`` (np.uint8 when K <= 256 else np.uint16); ``config`` (CodecConfig).
    """

    def __init__(self, config: CodecConfig, quantizers: list[TrainedQuantizer], permutations: list[np.ndarray]):
        self.config = config
        self.spec: CodecSpec = parse_spec(config.spec, config.patch_size)
        self.patch_size = self.spec.patch_size
        self.latent_channels = self.spec.latent_channels
        self.num_codewords = self.spec.max_k
        self.codebook_sizes = self.spec.codebook_sizes
        self.index_dtype = np.uint8 if self.num_codewords <= 256 else np.uint16
        self.quantizers = quantizers  # list of 3 TrainedQuantizer (Y, Cb, Cr), codebooks already ordered
        self.permutations = permutations  # list of 3 int64 (M, K)
        self._encoders = None
        self._tables, self._plane_of = self._build_tables()  # (c, K, s, s) pixel codewords, (c,) YCbCr plane
        self._torch_cache: dict = {}

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        images: Iterable[np.ndarray],
        spec: str = "OPQ-32-8-8",
        patch_size: int = 8,
        max_patches: int | None = None,
        seed: int = 0,
        flip: bool = True,
        progress: bool = True,
        order: bool = True,
        sources: list[str] | None = None,
    ) -> Codec:
        """Fit one FAISS quantizer per YCbCr channel on all stride-1 s x s patches (§4.1).

        Args:
            images: iterable of uint8 (H, W, 3) RGB arrays (e.g. ``load_image`` of the 18 McM images).
            spec: codec spec such as "OPQ-32-8-8" (see ``mbldm.codec.spec``).
            patch_size: s (the paper uses 8).
            max_patches: optional cap on training patches per channel (a uniform random subset, ``seed``).
            seed: seed for the subset and for faiss's k-means.
            flip: add vertically flipped images (§4.1: 18 McM images -> 36, about 8.75M patches).
            progress: print progress lines to stderr.
            order: apply the §3.2.1 PCA ordering (False only for studying its effect, e.g. Fig. 3b).
            sources: optional names of the images, recorded in the config.
        Raises:
            ValueError: bad spec, non-uint8/RGB images, or fewer training patches than a codebook's K
                (the message names the codebook and the count it needs).
        """
        from mbldm.codec import quantizers as q

        parsed = parse_spec(spec, patch_size)
        s = parsed.patch_size
        imgs = []
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"Codec.fit: image {i} must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
            imgs.append(img)
        if not imgs:
            raise ValueError("Codec.fit: no training images given")
        rng = np.random.default_rng(seed)
        trained, perms, counts = [], [], {}
        for ch, (name, cq) in enumerate(zip(CHANNELS, parsed.channels, strict=True)):
            x = _training_patches(imgs, ch, s, flip)
            total = len(x)
            if max_patches is not None and total > max_patches:
                x = x[np.sort(rng.choice(total, size=max_patches, replace=False))]
            if len(x) < cq.k:
                raise ValueError(
                    f"Codec.fit: too few patches for the {name} codebook of {parsed.name}: it has K={cq.k} "
                    f"codewords and needs at least {cq.k} training patches (faiss recommends {39 * cq.k}), got "
                    f"{len(x)} from {len(imgs)} image(s) with patch size {s}"
                )
            _log(progress, f"{name}: training {parsed.method} M={cq.m} K={cq.k} on {len(x):,} of {total:,} patches")
            tq = q.train(parsed.method, x, cq.m, cq.nbits, seed=seed)
            del x
            perm = np.stack([ordering.pca_order(cb) for cb in tq.codebooks]) if order else (
                np.tile(np.arange(cq.k, dtype=np.int64), (cq.m, 1)))
            tq.codebooks = np.ascontiguousarray(np.stack([cb[p] for cb, p in zip(tq.codebooks, perm)]))
            trained.append(tq)
            perms.append(perm)
            counts[name] = {"total_patches": int(total), "used_patches": int(min(total, max_patches or total))}
        config = CodecConfig(
            spec=parsed.name,
            patch_size=s,
            ordering=ORDERING if order else None,
            latent_channels=parsed.latent_channels,
            num_codewords=parsed.max_k,
            index_dtype="uint8" if parsed.max_k <= 256 else "uint16",
            training={
                "num_images": len(imgs),
                "image_sizes": sorted({f"{im.shape[1]}x{im.shape[0]}" for im in imgs}),
                "sources": list(sources) if sources is not None else None,
                "vertical_flip": flip,
                "max_patches": max_patches,
                "seed": seed,
                "patches": counts,
                "faiss_version": q.FAISS_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        _log(progress, f"done: {parsed.name}, latent channels c={parsed.latent_channels}, K={parsed.max_k}")
        return cls(config, trained, perms)

    # ------------------------------------------------------------------ ordering
    def reordered(self, order: bool) -> Codec:
        """The same codec with (order=True) or without (order=False) the §3.2.1 ordering.

        Both encode an image to the same reconstruction; only the index assigned to each codeword differs.
        """
        quantizers, perms = [], []
        for tq, perm in zip(self.quantizers, self.permutations, strict=True):
            unordered = np.empty_like(tq.codebooks)
            for m in range(tq.m):  # undo: unordered[perm[k]] = ordered[k]
                unordered[m, perm[m]] = tq.codebooks[m]
            new_perm = (np.stack([ordering.pca_order(cb) for cb in unordered]) if order
                        else np.tile(np.arange(tq.k, dtype=np.int64), (tq.m, 1)))
            cbs = np.stack([cb[p] for cb, p in zip(unordered, new_perm)])
            quantizers.append(dataclasses.replace(tq, codebooks=np.ascontiguousarray(cbs)))
            perms.append(new_perm)
        config = dataclasses.replace(self.config, ordering=ORDERING if order else None)
        return Codec(config, quantizers, perms)

    def ordinality(self) -> list[float]:
        """Ordinality (``ordering.ordinality``) of every sub-codebook, latent-channel order (c values)."""
        return [ordering.ordinality(cb) for tq in self.quantizers for cb in tq.codebooks]

    # ------------------------------------------------------------------ tables
    def _pixel_codewords(self, tq) -> np.ndarray:
        """(M, K, d): each sub-codeword's contribution to the patch in channel (pixel) space."""
        m, k, dsub = tq.codebooks.shape
        if tq.method == "RQ":
            return tq.codebooks.astype(np.float32)
        d = m * dsub
        out = np.zeros((m, k, d), np.float32)
        for j in range(m):
            out[j, :, j * dsub:(j + 1) * dsub] = tq.codebooks[j]
        if tq.rotation is not None:  # x = R^T y  <=>  x_row = y_row @ R
            out = out @ tq.rotation.astype(np.float32)
        return out

    def _build_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-space codeword tables: float32 (c, K, s, s) and the YCbCr plane (c,) of each latent channel."""
        s, k_max = self.patch_size, self.num_codewords
        tables = np.zeros((self.latent_channels, k_max, s, s), np.float32)
        plane_of = np.zeros(self.latent_channels, np.int64)
        j = 0
        for ch, tq in enumerate(self.quantizers):
            pix = self._pixel_codewords(tq)  # (M, K, d)
            for mm in range(tq.m):
                tables[j, : tq.k] = pix[mm].reshape(tq.k, s, s)
                plane_of[j] = ch
                j += 1
        return tables, plane_of

    # ------------------------------------------------------------------ encode / decode
    def _get_encoders(self):
        if self._encoders is None:
            from mbldm.codec.quantizers import Encoder

            self._encoders = [Encoder(tq) for tq in self.quantizers]
        return self._encoders

    def encode(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Encode images to index latents (§3.1).

        Args:
            x: uint8 RGB (H, W, 3) or (B, H, W, 3). Sizes not divisible by s are padded by edge replication.
        Returns:
            ``index_dtype`` (h, w, c) or (B, h, w, c), h = ceil(H/s), w = ceil(W/s).
        Raises:
            ValueError: not uint8 RGB.
        """
        batch, single = _as_batch(x)
        if batch.dtype != np.uint8 or batch.shape[-1] != 3:
            raise ValueError(f"Codec.encode expects uint8 RGB images (..., 3), got {batch.dtype} {batch.shape}")
        s = self.patch_size
        encoders = self._get_encoders()
        out = []
        for start in range(0, len(batch), batch_size):
            ycc = color.rgb_to_ycbcr_planes(patches.pad_to_multiple(batch[start:start + batch_size], s))
            codes = []
            for ch, enc in enumerate(encoders):
                p = patches.to_patches(ycc[ch], s)  # (B, h, w, d)
                b, h, w, d = p.shape
                codes.append(enc.encode(p.reshape(-1, d)).reshape(b, h, w, -1))
            out.append(np.concatenate(codes, axis=-1).astype(self.index_dtype))
        z = np.concatenate(out)
        return z[0] if single else z

    def _check_indices(self, z: np.ndarray) -> None:
        """Every index of latent channel j must lie in [0, K_j - 1] (its own codebook, not the largest one).

        Raises:
            ValueError: wrong channel count, or an index outside its channel's codebook (naming the channel, its K
                and the offending value).
        """
        if z.shape[-1] != self.latent_channels:
            raise ValueError(f"latent has {z.shape[-1]} channels, codec {self.spec.name} expects {self.latent_channels}")
        if not z.size:
            return
        flat = z.reshape(-1, self.latent_channels)
        low, high = flat.min(axis=0), flat.max(axis=0)  # (c,)
        for j, (k, name) in enumerate(zip(self.codebook_sizes, self.spec.channel_names)):
            if low[j] < 0 or high[j] >= k:
                bad = low[j] if low[j] < 0 else high[j]
                raise ValueError(f"latent channel {j} ({name}) holds index {bad}, outside its codebook's range "
                                 f"[0, {k - 1}] (K={k}) in codec {self.spec.name}")

    def decode_float(self, z: np.ndarray) -> np.ndarray:
        """Index latents (B, h, w, c) -> float32 RGB (B, H, W, 3), not rounded or clipped (table look-up).

        Reference implementation of ``decode`` in numpy: per YCbCr plane, sum the selected pixel-space codewords
        (PQ: concatenation, OPQ: + inverse rotation, RQ: sum), then convert to RGB.
        """
        z = np.asarray(z)
        if z.ndim != 4:
            raise ValueError(f"decode_float expects (B, h, w, c) indices, got shape {z.shape}")
        self._check_indices(z)
        b, h, w, c = z.shape
        s = self.patch_size
        ycc = np.zeros((3, b, h, w, s, s), np.float32)
        for j in range(c):
            ycc[self._plane_of[j]] += self._tables[j][z[..., j]]  # (B, h, w, s, s)
        ycc = ycc.transpose(1, 2, 4, 3, 5, 0).reshape(b, h * s, w * s, 3)
        return color.ycbcr_to_rgb(ycc)

    def decode(self, z: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode index latents to uint8 RGB by table look-up (no faiss needed).

        Args:
            z: integer (h, w, c) or (B, h, w, c) indices in [0, K-1].
            size: optional original (H, W) to crop the padding away.
        Returns:
            uint8 (H, W, 3) or (B, H, W, 3) (values rounded and clipped to [0, 255]).
        Raises:
            ValueError: wrong channel count or out-of-range indices.
        """
        from mbldm.codec.lookup import decode_lookup

        z = np.asarray(z)
        if z.ndim not in (3, 4):
            raise ValueError(f"decode expects (h, w, c) or (B, h, w, c) indices, got shape {z.shape}")
        batch, single = _as_batch(z)
        self._check_indices(batch)
        out = decode_lookup(batch.astype(np.int64, copy=False), self._tables, self._plane_of,
                            color.YCBCR_OFFSET.astype(np.float32), color.YCBCR_TO_RGB.astype(np.float32))
        if size is not None:
            out = np.ascontiguousarray(out[:, : size[0], : size[1]])
        return out[0] if single else out

    # ------------------------------------------------------------------ torch
    def to(self, device: torch.device | str) -> Codec:
        """Move the torch tables used by decode_torch / decode_soft to ``device`` (returns self)."""
        self._torch_tables(torch.device(device), torch.float32)
        return self

    def _torch_tables(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._torch_cache:
            s = self.patch_size
            # RGB contribution of each codeword: YCBCR_TO_RGB[:, plane] (3,) x pixel codeword (s, s)
            rgb_cols = color.YCBCR_TO_RGB.T[self._plane_of].astype(np.float32)  # (c, 3)
            fused = rgb_cols[:, None, :, None, None] * self._tables[:, :, None]  # (c, K, 3, s, s)
            t = torch.from_numpy(fused.reshape(self.latent_channels, self.num_codewords, 3 * s * s))
            bias_rgb = (-color.YCBCR_TO_RGB @ color.YCBCR_OFFSET).astype(np.float32)  # (3,)
            bias = torch.from_numpy(bias_rgb).repeat_interleave(s * s)
            self._torch_cache[key] = (t.to(device=device, dtype=dtype).contiguous(), bias.to(device=device, dtype=dtype))
        return self._torch_cache[key]

    def _unpatch_torch(self, flat: torch.Tensor) -> torch.Tensor:
        # flat: (B, 3*s*s, h, w) with channel order (rgb, i, j) -> (B, 3, H, W)
        return torch.nn.functional.pixel_shuffle(flat, self.patch_size)

    def decode_torch(self, z: torch.Tensor) -> torch.Tensor:
        """Torch hard decode: LongTensor (B, c, h, w) -> float32 RGB (B, 3, H, W), clamped to [0, 255], same device.

        Raises:
            ValueError: wrong shape, or an index outside its channel's codebook (see ``_check_indices``).
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode_torch expects (B, {self.latent_channels}, h, w) indices, got {tuple(z.shape)}")
        sizes = torch.as_tensor(self.codebook_sizes, device=z.device)
        if z.numel() and (bool((z.amin(dim=(0, 2, 3)) < 0).any()) or bool((z.amax(dim=(0, 2, 3)) >= sizes).any())):
            self._check_indices(z.permute(0, 2, 3, 1).cpu().numpy())  # raises, naming the channel and its K
        tables, bias = self._torch_tables(z.device, torch.float32)
        acc = bias.view(1, 1, 1, -1).expand(z.shape[0], z.shape[2], z.shape[3], -1).clone()  # (B, h, w, 3*s*s)
        for j in range(self.latent_channels):
            acc += tables[j][z[:, j].long()]  # (B, h, w, 3*s*s)
        return self._unpatch_torch(acc.permute(0, 3, 1, 2)).clamp(0, 255)

    def decode_soft(self, weights: torch.Tensor) -> torch.Tensor:
        """Differentiable decode from per-position weights over each codebook (Eq. 21).

        Args:
            weights: float (B, c, K, h, w), e.g. Gumbel-softmax samples (Eq. 20) or softmax probabilities.
        Returns:
            float (B, 3, H, W) RGB in [0, 255] (clamped), differentiable w.r.t. ``weights``; equals the hard
            decode (before rounding) for one-hot weights.
        Raises:
            ValueError: wrong shape, or a codec whose sub-quantizers have different K (e.g. VQ-12-8-8).
        """
        c, k = self.latent_channels, self.num_codewords
        if weights.ndim != 5 or weights.shape[1] != c or weights.shape[2] != k:
            raise ValueError(f"decode_soft expects (B, {c}, {k}, h, w) weights, got {tuple(weights.shape)}")
        if any(tq.k != k for tq in self.quantizers):
            raise ValueError(f"decode_soft needs the same K for every sub-quantizer; {self.spec.name} mixes sizes")
        tables, bias = self._torch_tables(weights.device, weights.dtype)
        flat = torch.einsum("bckhw,ckf->bfhw", weights, tables) + bias.view(1, -1, 1, 1)  # (B, 3*s*s, h, w)
        return self._unpatch_torch(flat).clamp(0, 255)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``codebooks.safetensors`` into ``directory`` (atomically, file by file).

        Raises:
            FileExistsError: the directory already holds a codec and ``overwrite`` is False.
        """
        from safetensors.numpy import save as st_save

        from mbldm.io.atomic import write_bytes, write_json

        directory = Path(directory)
        if (directory / CONFIG_FILE).exists() and not overwrite:
            raise FileExistsError(f"{directory}: already holds a codec (pass overwrite=True / --overwrite)")
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, tq, perm in zip(CHANNELS, self.quantizers, self.permutations, strict=True):
            arrays[f"{name}.codebooks"] = np.ascontiguousarray(tq.codebooks, np.float32)
            arrays[f"{name}.permutation"] = np.ascontiguousarray(perm, np.int64)
            if tq.rotation is not None:
                arrays[f"{name}.rotation"] = np.ascontiguousarray(tq.rotation, np.float32)
        write_bytes(directory / ARRAYS_FILE, st_save(arrays, metadata={"format": FORMAT, "spec": self.spec.name}))
        write_json(directory / CONFIG_FILE, dataclasses.asdict(self.config))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Codec:
        """Load and validate a codec directory written by ``save``.

        Raises:
            FileNotFoundError: missing directory or files.
            ValueError: a damaged or foreign artifact (the message names the file and what is wrong).
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        cfg_path, arr_path = directory / CONFIG_FILE, directory / ARRAYS_FILE
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: codec directory not found")
        for p in (cfg_path, arr_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; {directory} is not a complete mbldm codec")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: not an mbldm codec config (format is {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r})")
        if raw.get("version") != VERSION:
            raise ValueError(f"{cfg_path}: codec format version {raw.get('version')} is not supported (expected {VERSION})")
        known = {f.name for f in dataclasses.fields(CodecConfig)}
        try:
            config = CodecConfig(**{k: v for k, v in raw.items() if k in known})
            spec = parse_spec(config.spec, config.patch_size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cfg_path}: invalid codec config ({exc})") from None
        try:
            arrays = load_file(str(arr_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{arr_path}: damaged or not a safetensors file ({exc})") from None
        d = spec.patch_size**2
        quantizers, perms = [], []
        for name, cq in zip(CHANNELS, spec.channels, strict=True):
            dsub = d if spec.method == "RQ" else d // cq.m
            cb = arrays.get(f"{name}.codebooks")
            perm = arrays.get(f"{name}.permutation")
            rot = arrays.get(f"{name}.rotation")
            problems = []
            if cb is None or cb.shape != (cq.m, cq.k, dsub):
                problems.append(f"{name}.codebooks has shape {None if cb is None else cb.shape}, expected {(cq.m, cq.k, dsub)}")
            elif not np.isfinite(cb).all():
                problems.append(f"{name}.codebooks holds non-finite values")
            if perm is None or perm.shape != (cq.m, cq.k):
                problems.append(f"{name}.permutation has shape {None if perm is None else perm.shape}, expected {(cq.m, cq.k)}")
            if spec.method == "OPQ" and (rot is None or rot.shape != (d, d)):
                problems.append(f"{name}.rotation has shape {None if rot is None else rot.shape}, expected {(d, d)}")
            if problems:
                raise ValueError(f"{arr_path}: does not match spec {spec.name}: " + "; ".join(problems))
            quantizers.append(TrainedQuantizer(spec.method, cb.astype(np.float32), None if rot is None else rot.astype(np.float32)))
            perms.append(perm.astype(np.int64))
        return cls(config, quantizers, perms)

    def __repr__(self) -> str:
        return (f"Codec({self.spec.name}, s={self.patch_size}, c={self.latent_channels}, K={self.num_codewords}, "
                f"ordering={self.config.ordering})")
