"""Image-space refiner of the continuous-style model (§4.2.2, Fig. 5): training, evaluation and application.

The continuous model's last reverse steps leave index-level noise that the decoder turns into blocky
high-frequency artefacts. The paper trains "a trimming model ... on noisy images x_n = D(E(x) + gamma), where
gamma is scaled-down Gaussian noise", with "a combination of L1 and SSIM losses", using "the same U-Net
architecture with a smaller configuration with only 1.7 M parameters". Here:

* Model: ``build_unet("refiner", 3, 3, crop_size)`` (a diffusers ``UNet2DModel``) predicting the residual in
  [-1, 1] image space, ``x_hat = x_n + unet(x_n, t=0)``; its output convolution starts at zero, so the untrained
  refiner is the identity. Inputs are padded (edge replication) to a multiple of the U-Net's downsampling factor.
* Corruption: ``z_n = clamp(round(E(x) + sigma * N(0, 1)), 0, K_j - 1)`` per latent channel j (index units),
  ``x_n = D(z_n)``; sigma is drawn per crop uniformly from [0, ``noise_std``] so the refiner sees the whole range
  from pure codec error (sigma = 0) to the maximum.
  Default ``noise_std = 2`` index units: in the paper's setting (linear betas 1e-4 .. 0.02, K = 256) the forward
  noise at the final reverse steps t = 1, 2, 3 is sqrt(1 - abar_t) (K - 1) / 2 = 1.28, 1.89, 2.42 index units
  (0.0100, 0.0148, 0.0190 in [-1, 1] units), the level the continuous model fails to resolve (§4.2.2).
* Loss: ``l1_weight * L1 + ssim_weight * (1 - SSIM)`` on [0, 1] images; defaults 0.16 / 0.84 as in Zhao et al.
  2017 ("Loss Functions for Image Restoration with Neural Networks"; the paper gives no weights). SSIM is the
  Gaussian-window SSIM of Wang et al. 2004 (11 x 11 window, sigma 1.5, K1 0.01, K2 0.03) written in torch
  (:func:`ssim_torch`) since no installed library offers a differentiable one; it equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
* Data: images of a folder (``mbldm.io.images.scan_images``), optionally resized + centre-cropped to the diffusion
  run's resolution first (``resolution``; use the same value as ``latents build``), random ``crop_size`` crops
  at offsets that are multiples of the patch size s (so the codec's block grid matches generated images'), random
  horizontal flips. A fraction ``holdout`` of the files (at least one) is kept out for evaluation.

A refiner directory ``R`` holds ``model/`` (``save_pretrained``, safetensors), ``config.json`` (RefinerConfig +
facts), ``metrics.jsonl`` (training log) and ``eval.json`` (PSNR / SSIM before/after on held-out images).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "REFINER_FORMAT",
    "RefinerConfig",
    "gaussian_window",
    "ssim_torch",
    "refiner_loss",
    "corrupt_latents",
    "degrade_images",
    "Refiner",
    "train_refiner",
    "evaluate_refiner",
    "refine_files",
]

REFINER_FORMAT = "mbldm-refiner"
REFINER_VERSION = 1
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WIN, SSIM_SIGMA = 11, 1.5


# ---------------------------------------------------------------------------------------------------- SSIM (torch)
def gaussian_window(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps g_i ~ exp(-i^2 / (2 sigma^2)), i = -(size-1)/2 .. (size-1)/2, sum 1.

    Same taps as ``scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5)`` (radius 5, size 11).

    Raises:
        ValueError: even or non-positive size, sigma <= 0.
    """
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"gaussian_window needs an odd size >= 1 and sigma > 0, got size={size}, sigma={sigma}")
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid positions only: (B, C, H, W) -> (B, C, H-n+1, W-n+1)."""
    C = x.shape[1]
    n = g.numel()
    x = F.conv2d(x, g.view(1, 1, n, 1).expand(C, 1, n, 1), groups=C)  # (B, C, H-n+1, W)
    return F.conv2d(x, g.view(1, 1, 1, n).expand(C, 1, 1, n), groups=C)  # (B, C, H-n+1, W-n+1)


def ssim_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = SSIM_WIN,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Differentiable mean SSIM per image (Wang et al. 2004, Eq. 13; the SSIM formula of §4.1).

    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, local statistics weighted by a ``win_size`` Gaussian window of std ``sigma``
    (population covariance), evaluated where the window fits inside the image and averaged over positions and
    channels. Matches ``skimage.metrics.structural_similarity(x, y, data_range=L, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Args:
        x, y: float (B, C, H, W) tensors, same shape, H and W >= ``win_size``.
        data_range: L, the value range (1 for [0, 1] images, 255 for [0, 255]).

    Returns:
        (B,) SSIM values in [-1, 1].

    Raises:
        ValueError: different shapes, not 4-D, or images smaller than the window.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim_torch expects two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim_torch: images {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    g = gaussian_window(win_size, sigma, x.dtype).to(x.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _blur(x, g), _blur(y, g)  # (B, C, H', W')
    s_xx = _blur(x * x, g) - mu_x * mu_x
    s_yy = _blur(y * y, g) - mu_y * mu_y
    s_xy = _blur(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * s_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (s_xx + s_yy + c2)
    return (num / den).mean(dim=(1, 2, 3))  # (B,)


def refiner_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float, ssim_weight: float) -> dict:
    """``l1_weight * mean|pred - target| + ssim_weight * (1 - mean SSIM)`` on [0, 1] images (B, 3, H, W).

    Returns:
        {"loss": scalar tensor (differentiable), "l1": float, "ssim": float}.
    """
    l1 = (pred - target).abs().mean()
    ssim = ssim_torch(pred, target, data_range=1.0).mean()
    return {"loss": l1_weight * l1 + ssim_weight * (1.0 - ssim), "l1": float(l1.detach()),
            "ssim": float(ssim.detach())}


# ---------------------------------------------------------------------------------------------------- corruption
def _channel_k(codec) -> np.ndarray:
    """K_j of every latent channel j (Y sub-quantizers first, then Cb, Cr): int64 (c,)."""
    return np.array([cq.k for cq in codec.spec.channels for _ in range(cq.m)], dtype=np.int64)


def corrupt_latents(z: np.ndarray, sigma: np.ndarray, k_per_channel: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """z_n = clamp(round(z + sigma_b * N(0, 1)), 0, K_j - 1): Gaussian noise in index space (§4.2.2's E(x) + gamma).

    Args:
        z: integer (B, h, w, c) indices.
        sigma: (B,) noise std per image, in index units (>= 0).
        k_per_channel: (c,) codebook sizes K_j.
        rng: numpy generator.

    Returns:
        array of z's dtype (B, h, w, c).
    """
    noise = rng.standard_normal(z.shape) * np.asarray(sigma, np.float64).reshape(-1, 1, 1, 1)
    zn = np.rint(z.astype(np.float64) + noise)
    return np.clip(zn, 0, k_per_channel - 1).astype(z.dtype)


def degrade_images(codec, images: np.ndarray, sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x_n = D(clamp(round(E(x) + sigma N(0, 1)))) for uint8 (B, H, W, 3) images -> uint8 (B, H, W, 3)."""
    z = codec.encode(images)  # (B, h, w, c)
    zn = corrupt_latents(z, sigma, _channel_k(codec), rng)
    return codec.decode(zn, size=images.shape[1:3])


# ---------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class RefinerConfig:
    """Settings of ``mbldm refiner train`` (saved as ``R/config.json``).

    Attributes:
        codec: codec artifact folder (E and D of §3.1).
        data: folder of training images (recursive).
        out: refiner directory to write.
        resolution: resize short side + centre crop to this size first (the diffusion run's resolution); None keeps
            native sizes.
        crop_size: side of the random training crops (a multiple of the codec patch size and of the U-Net's
            downsampling factor).
        steps: optimizer steps.
        batch_size: crops per step.
        lr: AdamW learning rate (constant after ``warmup_steps`` of linear warm-up).
        warmup_steps: steps of linear learning-rate warm-up from lr / warmup_steps to lr (>= 1; 1 = none).
        noise_std: maximum sigma (index units) of the index-space noise; sigma ~ U[0, noise_std] per crop.
        l1_weight, ssim_weight: loss weights (Zhao et al. 2017: 0.16 / 0.84).
        seed: seeds model init, the split, crops and noise.
        holdout: fraction of the image files kept for evaluation (at least one file).
        eval_images: at most this many held-out images are evaluated.
        max_minutes: stop training after this wall time (None: no limit); the model is saved either way.
        log_every: steps between metrics.jsonl lines.
        preset: U-Net preset of ``build_unet``.
        device: torch device (None: cuda if available, else cpu).
    """

    codec: str
    data: str
    out: str
    resolution: int | None = None
    crop_size: int = 128
    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 100
    noise_std: float = 2.0
    l1_weight: float = 0.16
    ssim_weight: float = 0.84
    seed: int = 0
    holdout: float = 0.05
    eval_images: int = 16
    max_minutes: float | None = None
    log_every: int = 50
    preset: str = "refiner"
    device: str | None = None

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        checks = [
            (self.crop_size >= 16, f"crop_size must be >= 16, got {self.crop_size}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 1, f"warmup_steps must be >= 1, got {self.warmup_steps}"),
            (self.noise_std >= 0, f"noise_std must be >= 0, got {self.noise_std}"),
            (self.l1_weight >= 0 and self.ssim_weight >= 0 and self.l1_weight + self.ssim_weight > 0,
             f"loss weights must be >= 0 and not both 0, got l1={self.l1_weight}, ssim={self.ssim_weight}"),
            (0 < self.holdout < 1, f"holdout must lie in (0, 1), got {self.holdout}"),
            (self.eval_images >= 1, f"eval_images must be >= 1, got {self.eval_images}"),
            (self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.resolution is None or self.resolution >= self.crop_size,
             f"resolution {self.resolution} is smaller than crop_size {self.crop_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"RefinerConfig: {msg}")


# ---------------------------------------------------------------------------------------------------- the refiner
def _down_factor(model) -> int:
    """Spatial downsampling factor of a UNet2DModel: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(model.config.down_block_types) - 1)


def _to_unit(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) (rounded, clipped)."""
    v = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).cpu().numpy()


class Refiner:
    """A trained refiner: ``x_hat = x_n + unet(x_n, 0)`` in [-1, 1] image space (§4.2.2).

    Build with :meth:`load` (or by ``train_refiner``); ``apply`` works on uint8 RGB batches of any size.
    """

    def __init__(self, model, config: dict | None = None):
        self.model = model.eval()
        self.config = config or {}
        self.factor = _down_factor(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> Refiner:
        """Load ``R/config.json`` and ``R/model`` (written by :func:`train_refiner`).

        Raises:
            FileNotFoundError: missing folder / files.  ValueError: a foreign or damaged config.
        """
        from diffusers import UNet2DModel

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: refiner directory not found")
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: missing; {directory} is not a refiner (mbldm refiner train)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict) or cfg.get("format") != REFINER_FORMAT:
            raise ValueError(f"{cfg_path}: not an mbldm refiner config (expected format {REFINER_FORMAT!r})")
        if not (directory / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{directory / 'model'}: missing refiner weights (save_pretrained folder)")
        model = UNet2DModel.from_pretrained(str(directory / "model"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device), cfg)

    def forward_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Refine float (B, 3, H, W) images in [-1, 1] -> (B, 3, H, W), not clipped; differentiable.

        Pads bottom/right by edge replication to a multiple of the downsampling factor, crops back.
        """
        H, W = x.shape[-2:]
        f = self.factor
        ph, pw = (-H) % f, (-W) % f
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x  # (B, 3, H+ph, W+pw)
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        res = self.model(xp, t).sample  # (B, 3, H+ph, W+pw) residual
        return x + res[..., :H, :W]

    @torch.no_grad()
    def apply(self, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Refine decoded images.

        Args:
            images: uint8 (B, H, W, 3) or (H, W, 3) RGB.
            batch_size: images per forward pass.

        Returns:
            uint8 array of the input's shape.

        Raises:
            ValueError: not uint8 RGB.
        """
        arr = np.asarray(images)
        single = arr.ndim == 3
        batch = arr[None] if single else arr
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"Refiner.apply expects uint8 (B, H, W, 3) or (H, W, 3) images, got {arr.dtype} "
                             f"{arr.shape}")
        out = []
        for i in range(0, len(batch), batch_size):
            x = _to_unit(batch[i:i + batch_size], self.device)  # (b, 3, H, W)
            out.append(_to_uint8(self.forward_unit(x)))
        res = np.concatenate(out) if out else batch.copy()
        return res[0] if single else res


# ---------------------------------------------------------------------------------------------------- training
def _split_files(paths: list[Path], holdout: float, seed: int) -> tuple[list[Path], list[Path]]:
    if len(paths) < 2:
        raise ValueError(f"refiner training needs at least 2 images (train + held-out), found {len(paths)}")
    perm = np.random.default_rng(seed).permutation(len(paths))
    n_hold = min(len(paths) - 1, max(1, round(holdout * len(paths))))
    held = sorted(paths[i] for i in perm[:n_hold])
    train = sorted(paths[i] for i in perm[n_hold:])
    return train, held


def _load(path: Path, resolution: int | None) -> np.ndarray:
    from mbldm.data.datasets import resize_center_crop
    from mbldm.io.images import load_image

    img = load_image(path)
    return resize_center_crop(img, resolution) if resolution else img


def _random_crop(img: np.ndarray, size: int, s: int, rng: np.random.Generator, path: Path) -> np.ndarray:
    """A size x size crop at offsets that are multiples of s, randomly flipped left-right."""
    H, W = img.shape[:2]
    if H < size or W < size:
        raise ValueError(f"{path}: image {H}x{W} is smaller than crop_size {size}; lower --crop-size or set "
                         "--resolution")
    top = s * int(rng.integers(0, (H - size) // s + 1))
    left = s * int(rng.integers(0, (W - size) // s + 1))
    crop = img[top:top + size, left:left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def evaluate_refiner(refiner: Refiner, codec, images: Sequence[np.ndarray], noise_levels: Sequence[float],
                     seed: int = 0) -> list[dict]:
    """PSNR / SSIM of x_n = D(E(x) + sigma N(0,1)) before and after refinement, on whole images.

    Args:
        refiner: the refiner to test.
        codec: the codec giving E and D.
        images: uint8 (H, W, 3) held-out images (sizes may differ).
        noise_levels: sigmas (index units) to test; 0 means pure codec reconstruction D(E(x)).
        seed: seeds the noise (same noise for before and after).

    Returns:
        one dict per sigma: {"noise_std", "psnr_before", "psnr_after", "ssim_before", "ssim_after"} (means over
        images; PSNR of ``mbldm.eval.metrics.psnr``, SSIM of ``mbldm.eval.metrics.ssim``).
    """
    from mbldm.eval.metrics import psnr, ssim

    results = []
    for sigma in noise_levels:
        rng = np.random.default_rng(seed)
        rows = []
        for img in images:
            xn = degrade_images(codec, img[None], np.array([sigma]), rng)[0]  # (H, W, 3)
            xr = refiner.apply(xn)
            rows.append((psnr(xn, img), psnr(xr, img), ssim(xn, img), ssim(xr, img)))
        m = np.mean(np.array(rows, dtype=np.float64), axis=0)
        results.append({"noise_std": float(sigma), "psnr_before": float(m[0]), "psnr_after": float(m[1]),
                        "ssim_before": float(m[2]), "ssim_after": float(m[3])})
    return results


def train_refiner(config: RefinerConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Train a refiner (§4.2.2) and write ``config.out``: model/, config.json, metrics.jsonl, eval.json.

    Args:
        config: see :class:`RefinerConfig`.
        overwrite: replace an existing non-empty output folder.
        progress: tqdm bar over steps.

    Returns:
        The refiner directory (``config.out``).

    Raises:
        ValueError: bad config, fewer than 2 images, an image smaller than the crop, or a crop size that is not a
        multiple of the patch size / downsampling factor.  FileNotFoundError: missing codec or data folder.
        FileExistsError: non-empty ``out`` without ``overwrite``.
    """
    from tqdm.auto import tqdm

    from mbldm.codec import Codec
    from mbldm.diffusion.models import build_unet, count_parameters
    from mbldm.io.atomic import write_json
    from mbldm.io.images import scan_images

    config.validate()
    codec = Codec.load(config.codec)
    data = Path(config.data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: image folder not found")
    paths = list(scan_images(data))
    train_paths, held_paths = _split_files(paths, config.holdout, config.seed)
    s = codec.patch_size
    if config.crop_size % s:
        raise ValueError(f"crop_size {config.crop_size} must be a multiple of the codec patch size {s}")
    out = Path(config.out)
    _prepare_out(out, overwrite)

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    model = build_unet(config.preset, in_channels=3, out_channels=3, sample_size=config.crop_size)
    torch.nn.init.zeros_(model.conv_out.weight)  # residual starts at 0: the untrained refiner is the identity
    torch.nn.init.zeros_(model.conv_out.bias)
    refiner = Refiner(model.to(device).train(), {})
    if config.crop_size % refiner.factor:
        raise ValueError(f"crop_size {config.crop_size} must be a multiple of the U-Net downsampling factor "
                         f"{refiner.factor}")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = config.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    rng = np.random.default_rng(config.seed)
    k_per_channel = _channel_k(codec)

    start = time.time()
    step, stopped_early = 0, False
    bar = tqdm(total=config.steps, desc="refiner", disable=not progress)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as log:
        while step < config.steps:
            if config.max_minutes is not None and time.time() - start > 60 * config.max_minutes:
                stopped_early = True
                break
            picks = rng.integers(0, len(train_paths), size=config.batch_size)
            clean = np.stack([_random_crop(_load(train_paths[i], config.resolution), config.crop_size, s, rng,
                                           train_paths[i]) for i in picks])  # (B, S, S, 3) uint8
            sigma = rng.uniform(0.0, config.noise_std, size=config.batch_size)  # (B,) index units
            z = codec.encode(clean)  # (B, S/s, S/s, c)
            noisy = codec.decode(corrupt_latents(z, sigma, k_per_channel, rng))  # (B, S, S, 3) uint8
            x_n = _to_unit(noisy, device)  # (B, 3, S, S) in [-1, 1]
            x = _to_unit(clean, device)
            pred = refiner.forward_unit(x_n)  # (B, 3, S, S)
            terms = refiner_loss((pred + 1) / 2, (x + 1) / 2, config.l1_weight, config.ssim_weight)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                rec = {"step": step, "loss": float(terms["loss"].detach()), "l1": terms["l1"],
                       "ssim": terms["ssim"], "lr": sched.get_last_lr()[0], "seconds": round(time.time() - start, 2)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
    bar.close()

    model.eval()
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    facts = {"format": REFINER_FORMAT, "version": REFINER_VERSION, **dataclasses.asdict(config),
             "codec_spec": codec.spec.name, "patch_size": s, "parameters": count_parameters(model),
             "downsampling_factor": refiner.factor, "steps_done": step, "stopped_early": stopped_early,
             "train_images": len(train_paths), "heldout_images": len(held_paths),
             "residual": "x_hat = x_n + unet(x_n, t=0) in [-1, 1]"}
    write_json(out / "config.json", facts)
    refiner.config = facts

    held = held_paths[: config.eval_images]
    imgs = [_load(p, config.resolution) for p in held]
    results = evaluate_refiner(refiner, codec, imgs, [0.0, config.noise_std / 2, config.noise_std],
                               seed=config.seed + 1)
    write_json(out / "eval.json", {"images": [str(p) for p in held], "resolution": config.resolution,
                                   "metric": "psnr: mbldm.eval.metrics.psnr (per-value MSE); ssim: "
                                             "mbldm.eval.metrics.ssim; means over images",
                                   "results": results, "seconds_training": round(time.time() - start, 2)})
    return out


# ---------------------------------------------------------------------------------------------------- apply to files
def refine_files(refiner_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                 overwrite: bool = False, device: str | None = None) -> list[Path]:
    """Refine image files (or every image under folders) and write ``out_dir/<stem>.png``.

    Raises:
        FileNotFoundError: a missing input.  ValueError: no images, or two inputs with the same stem.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    from mbldm.io.images import load_image, save_png, scan_images

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(scan_images(p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image or folder")
    if not files:
        raise ValueError("refine_files: no images found in the inputs")
    stems = [f.stem for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"refine_files: several inputs share the output name(s) {dup[:5]}; refine them separately")
    out = Path(out_dir)
    targets = [out / f"{f.stem}.png" for f in files]
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]}: already exists (pass overwrite=True / --overwrite)")
    ref = Refiner.load(refiner_dir, device=device)
    for f, t in zip(files, targets, strict=True):
        save_png(t, ref.apply(load_image(f)), overwrite=overwrite)
    return targets
