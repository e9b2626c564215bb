"""Codec speed: encode / decode throughput (megapixels per second) of OPQ-32-8-8 on a batch of 512x512 photos,
beside, in the same run, the Stable Diffusion v1 VAE (diffusers AutoencoderKL, random weights: timing only) and
Pillow JPEG at the same bits per pixel.

Targets (acceptance): our encode+decode >= 1000x the VAE's encode+decode throughput, and our decode >= Pillow's
JPEG decode throughput at our bit rate.

    .venv/bin/python benchmarks/codec_speed.py --codec runs/codec_opq --batch 16 --vae-batch 1 --repeats 3

Writes (or replaces) the section "## Codec speed" of ``--out`` (default BENCHMARKS.md at the repo root), keeping
the other sections. Without ``--codec`` an OPQ-32-8-8 codec is fitted on the spot on the McM images with
``--fit-max-patches`` patches per channel (the speed does not depend on how well it was fitted).

Timing: ours and JPEG are timed ``--repeats`` times after one warm-up call and the best (shortest) time is
reported, which is the least disturbed by other processes on a shared machine. MP/s = images * H * W / 1e6 / s.
The VAE is slow on CPU, so it is timed on ``--vae-batch`` images (default 1) with ``--vae-repeats`` repeats; its
MP/s is per pixel and therefore comparable, but the batch sizes are stated in the table. The VAE gets no
warm-up call (a pass takes about a minute on 2 cores; first-call overhead is negligible beside that).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_report.py, shared with train_step.py
import _report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SECTION = "## Codec speed"
SIZE = 512
VAE_SD_V1 = dict(  # Stable Diffusion v1 VAE (CompVis/stable-diffusion-v1-4, subfolder "vae"), built locally
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
TARGET_VS_VAE = 1000.0
TARGET_VS_JPEG = 1.0


def log(msg: str) -> None:
    print(f"[codec_speed] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs
def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Central size x size crop of uint8 (H, W, 3); raises ValueError when the image is smaller."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image of {h}x{w} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def load_batch(images_dir: Path, batch: int) -> tuple[np.ndarray, list[str]]:
    """``batch`` 512x512 centre crops of the (sorted) photos in ``images_dir``, cycling if there are fewer."""
    from mbldm.io.images import load_image, scan_images

    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found (expected ../shared/data/kodak or sipi)")
    paths = list(scan_images(images_dir))
    if not paths:
        raise ValueError(f"{images_dir}: no images")
    crops = [center_crop(load_image(p), SIZE) for p in paths[:batch]]
    names = [p.name for p in paths[:batch]]
    while len(crops) < batch:
        crops.append(crops[len(crops) % len(paths)])
    return np.stack(crops[:batch]), names  # (B, 512, 512, 3) uint8


def get_codec(codec_dir: str | None, max_patches: int):
    from mbldm.codec import Codec

    if codec_dir:
        codec = Codec.load(codec_dir)
        return codec, f"`{codec_dir}` ({codec.spec.name})"
    from mbldm.io.images import load_image, scan_images

    mcm = DATA / "mcm"
    paths = list(scan_images(mcm))
    if not paths:
        raise FileNotFoundError(f"{mcm}: no McM images to fit a codec on; pass --codec DIR")
    log(f"no --codec given: fitting OPQ-32-8-8 on {len(paths)} McM images, max_patches={max_patches:,}")
    t = time.perf_counter()
    codec = Codec.fit([load_image(p) for p in paths], spec="OPQ-32-8-8", max_patches=max_patches, progress=True)
    log(f"fitted in {time.perf_counter() - t:.1f} s")
    return codec, f"OPQ-32-8-8 fitted for this run on the {len(paths)} McM images ({max_patches:,} patches/channel)"


# ------------------------------------------------------------------ timing
def best_time(fn, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of ``repeats`` calls of ``fn()`` (after one untimed warm-up call).

    cpu is this process's CPU time (all threads) during that call: on a shared machine, wall >> cpu / threads
    shows that the pipeline waited for the CPU.
    """
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t, time.process_time() - c))
    return min(times)


def mps(num_images: int, seconds: float) -> float:
    return num_images * SIZE * SIZE / 1e6 / seconds


def time_ours(codec, batch: np.ndarray, repeats: int) -> dict:
    z = codec.encode(batch)  # (B, 64, 64, c); also builds the faiss encoders
    t_enc, c_enc = best_time(lambda: codec.encode(batch), repeats)
    t_dec, c_dec = best_time(lambda: codec.decode(z), repeats)
    b = len(batch)
    bits = codec.spec.bits_per_patch * z.shape[1] * z.shape[2]
    return {"images": b, "spec": codec.spec.name, "encode_s": t_enc, "decode_s": t_dec, "encode_cpu": c_enc,
            "decode_cpu": c_dec, "bpp": bits / (SIZE * SIZE),
            "encode": mps(b, t_enc), "decode": mps(b, t_dec), "roundtrip": mps(b, t_enc + t_dec)}


def time_jpeg(batch: np.ndarray, bpp: float, repeats: int) -> dict:
    import warnings

    from mbldm.codec.bench import jpeg_at_bpp, jpeg_decode, jpeg_encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qualities = [jpeg_at_bpp(img, bpp)[0] for img in batch]  # not timed: choosing q per image
    files = [jpeg_encode(img, q) for img, q in zip(batch, qualities)]
    t_enc, c_enc = best_time(lambda: [jpeg_encode(img, q) for img, q in zip(batch, qualities)], repeats)
    t_dec, c_dec = best_time(lambda: [jpeg_decode(f) for f in files], repeats)
    b = len(batch)
    return {"images": b, "encode_s": t_enc, "decode_s": t_dec, "encode_cpu": c_enc, "decode_cpu": c_dec,
            "qualities": qualities,
            "bpp": float(np.mean([8 * len(f) / (SIZE * SIZE) for f in files])),
            "encode": mps(b, t_enc), "decode": mps(b, t_dec), "roundtrip": mps(b, t_enc + t_dec)}


def time_vae(batch: np.ndarray, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_SD_V1).eval()
    params = sum(p.numel() for p in vae.parameters())
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, 512, 512) in [-1, 1]

    @torch.inference_mode()
    def roundtrip():
        latent = vae.encode(x).latent_dist.mode()  # (B, 4, 64, 64)
        return vae.decode(latent).sample  # (B, 3, 512, 512)

    log(f"VAE: {params / 1e6:.1f}M parameters, timing {len(batch)} image(s) x {repeats}; slow on CPU")
    t, cpu = best_time(roundtrip, repeats, warmup=False)  # no warm-up: one pass takes about a minute on 2 cores
    return {"images": len(batch), "repeats": repeats, "roundtrip_s": t, "roundtrip_cpu": cpu,
            "roundtrip": mps(len(batch), t),
            "params": params}


# ------------------------------------------------------------------ report
def machine_line() -> str:
    import torch

    try:
        import faiss
        faiss_threads = faiss.omp_get_max_threads()
    except Exception:  # noqa: BLE001 - informational only
        faiss_threads = "?"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return (f"{cpu}; {usable} usable of {os.cpu_count()} logical CPUs, {load}; "
            f"torch threads {torch.get_num_threads()}, "
            f"faiss OpenMP threads {faiss_threads}; Python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_section(ours: dict, jpeg: dict, vae: dict | None, codec_desc: str, image_desc: str, repeats: int,
                   command: str) -> str:
    import PIL

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    b = ours["images"]
    rows = [
        (f"ours ({ours['spec']}) encode", b, f"{ours['bpp']:.3f}", ours["encode_s"], ours["encode_cpu"],
         ours["encode"]),
        ("ours decode", b, f"{ours['bpp']:.3f}", ours["decode_s"], ours["decode_cpu"], ours["decode"]),
        ("ours encode + decode", b, f"{ours['bpp']:.3f}", ours["encode_s"] + ours["decode_s"],
         ours["encode_cpu"] + ours["decode_cpu"], ours["roundtrip"]),
    ]
    if vae is not None:
        rows.append(("SD v1 VAE encode + decode (random weights)", vae["images"], "n/a", vae["roundtrip_s"],
                     vae["roundtrip_cpu"], vae["roundtrip"]))
    rows += [
        ("Pillow JPEG encode (4:2:0, q per image)", b, f"{jpeg['bpp']:.3f}", jpeg["encode_s"], jpeg["encode_cpu"],
         jpeg["encode"]),
        ("Pillow JPEG decode", b, f"{jpeg['bpp']:.3f}", jpeg["decode_s"], jpeg["decode_cpu"], jpeg["decode"]),
    ]
    lines = [
        SECTION, "",
        f"Measured {date} with `{command}`.",
        f"Machine: {machine_line()}; Pillow {PIL.__version__}. Everything on CPU, in one process.",
        f"Images: {image_desc}. Codec: {codec_desc}. Ours and JPEG: best of {repeats} timed repeats after a "
        "warm-up call" + (f"; VAE: best of {vae['repeats']} without warm-up." if vae is not None else "."),
        "",
        "| pipeline | images | bpp | wall s | CPU s | MP/s (wall) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {n} | {bpp} | {sec:.4f} | {cpu:.3f} | {rate:.4g} |" for name, n, bpp, sec, cpu, rate in rows),
        "",
        "| target | measured | required | result |",
        "|---|---:|---:|---|",
    ]
    if vae is not None:
        ratio = ours["roundtrip"] / vae["roundtrip"]
        lines.append(f"| ours encode+decode / VAE encode+decode (MP/s) | {ratio:,.0f}x | >= {TARGET_VS_VAE:,.0f}x | "
                     f"{verdict(ratio >= TARGET_VS_VAE)} |")
    else:
        lines.append(f"| ours encode+decode / VAE encode+decode (MP/s) | not run (--no-vae) | >= {TARGET_VS_VAE:,.0f}x "
                     "| not measured |")
    ratio_j = ours["decode"] / jpeg["decode"]
    lines.append(f"| ours decode / JPEG decode at our bpp (MP/s) | {ratio_j:.2f}x | >= {TARGET_VS_JPEG:g}x | "
                 f"{verdict(ratio_j >= TARGET_VS_JPEG)} |")
    notes = [
        "",
        f"JPEG qualities chosen per image as the lowest q with bpp >= ours ({ours['bpp']:.3f}): "
        f"{', '.join(map(str, jpeg['qualities']))}.",
    ]
    if vae is not None and vae["images"] != b:
        notes.append(f"The VAE was timed on {vae['images']} image(s) instead of {b} (it takes minutes per batch on "
                     "CPU); MP/s is per pixel, so the ratio compares throughputs, not batch wall times.")
    notes.append("Ours: decode is table look-up (`Codec.decode`), encode is faiss nearest-codeword search "
                 "(`Codec.encode`). MP/s and the ratios use wall time; CPU s is this process's CPU time during the "
                 "same call (all threads), shown because the machine may be shared (see the load average).")
    if vae is not None:
        notes.append(f"The VAE runs with torch in inference mode (SD v1 config, {vae['params'] / 1e6:.1f}M "
                     "parameters, random weights: the speed does not depend on them).")
    return "\n".join(lines + notes) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` (a markdown file) with its "## Codec speed" section replaced by ``section`` (or appended).

    A section runs from its "## " heading to the next "## " heading (not "### ") or the end of the file.
    """
    return _report.replace_section(text, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", help="an OPQ-32-8-8 codec directory (default: fit one now on ../shared/data/mcm)")
    parser.add_argument("--images", default=str(DATA / "kodak"), help="folder of photos, centre-cropped to 512x512")
    parser.add_argument("--batch", type=int, default=16, help="images in the batch for ours and JPEG (default 16)")
    parser.add_argument("--vae-batch", type=int, default=1, help="images for the VAE timing (default 1: slow on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for ours and JPEG (best is reported)")
    parser.add_argument("--vae-repeats", type=int, default=1, help="timed repeats for the VAE (default 1)")
    parser.add_argument("--no-vae", action="store_true", help="skip the VAE (the ratio is then not measured)")
    parser.add_argument("--fit-max-patches", type=int, default=300_000, help="patches per channel when fitting")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    if min(args.batch, args.vae_batch, args.repeats, args.vae_repeats) < 1:
        parser.error("--batch, --vae-batch, --repeats and --vae-repeats must be >= 1")

    from mbldm.io.atomic import write_text

    batch, names = load_batch(Path(args.images), args.batch)
    image_desc = (f"{args.batch} centre crops of 512x512 from `{Path(args.images).name}/` "
                  f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    codec, codec_desc = get_codec(args.codec, args.fit_max_patches)
    if codec.spec.name != "OPQ-32-8-8":
        log(f"note: the codec is {codec.spec.name}, the targets are stated for OPQ-32-8-8")

    log(f"ours: {codec.spec.name} on {len(batch)} images x {args.repeats}")
    ours = time_ours(codec, batch, args.repeats)
    log(f"ours: encode {ours['encode']:.2f} MP/s, decode {ours['decode']:.2f} MP/s, round trip {ours['roundtrip']:.2f}")
    jpeg = time_jpeg(batch, ours["bpp"], args.repeats)
    log(f"JPEG at {jpeg['bpp']:.3f} bpp: encode {jpeg['encode']:.2f} MP/s, decode {jpeg['decode']:.2f} MP/s")
    vae = None
    if not args.no_vae:
        vae = time_vae(batch[: args.vae_batch], args.vae_repeats)
        log(f"VAE: encode+decode {vae['roundtrip']:.4f} MP/s ({vae['roundtrip_s']:.1f} s for {vae['images']} image(s))")

    command = "python benchmarks/codec_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render_section(ours, jpeg, vae, codec_desc, image_desc, args.repeats, command.strip())
    out = Path(args.out)
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    write_text(out, replace_section(old, section))
    print(section)
    log(f"wrote section {SECTION!r} of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
