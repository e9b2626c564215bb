"""Steps 2 to 5 of ``mbldm demo``, the codec half of the paper: fit the codec (§3.1), benchmark it against JPEG at
the same bits per pixel (Table 1), show the effect of the PCA ordering (Fig. 3, §3.2.1) and encode the generative
training set into a latent store.

Each step takes the :class:`~mbldm.demo.context.DemoContext` and returns ``(one-line summary, commands, numbers)``.
"""
from __future__ import annotations

import numpy as np

from mbldm.demo.context import DemoContext, quote

__all__ = ["step_codec", "step_bench", "step_ordering", "step_latents"]


def step_codec(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """``codec fit`` on OUT/data/fit; sets ``ctx.codec``."""
    from mbldm.codec.files import fit_from_folder
    from mbldm.eval.metrics import bits_per_pixel, compression_ratio

    cfg, out = ctx.cfg, ctx.out
    codec = fit_from_folder(out / "data" / "fit", cfg.spec, out / "codec", max_patches=cfg.max_patches,
                            seed=cfg.seed, progress=cfg.progress)
    ctx.codec = codec
    patches = codec.config.training["patches"]
    bpp, cr = bits_per_pixel(codec.spec), compression_ratio(codec.spec)
    used = max(p["used_patches"] for p in patches.values())
    total = max(p["total_patches"] for p in patches.values())
    line = (f"{codec.spec.name}: c={codec.latent_channels} latent channels, K={codec.num_codewords}, "
            f"{bpp:.3f} bpp, 1:{cr:g}; fitted on {codec.config.training['num_images']} images "
            f"({used:,} of {total:,} patches per channel)")
    numbers = {"spec": codec.spec.name, "latent_channels": codec.latent_channels,
               "num_codewords": codec.num_codewords, "bpp": bpp, "compression_ratio": cr,
               "patches": patches, "num_images": codec.config.training["num_images"], "dir": "codec"}
    cmd = (f"mbldm codec fit --images {quote(out / 'data' / 'fit')} --spec {quote(cfg.spec)} "
           f"--out {quote(out / 'codec')} --max-patches {cfg.max_patches} --seed {cfg.seed}")
    return line, [cmd], numbers


def step_bench(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """Table 1 on the held-out images (OUT/bench.json) and the original | ours | JPEG crops figure."""
    from tqdm.auto import tqdm

    from mbldm.codec.bench import JPEG_FIELDS, NUMERIC_FIELDS, bench_codec
    from mbldm.io.atomic import write_json
    from mbldm.io.images import load_image, scan_images

    cfg, out, codec = ctx.cfg, ctx.out, ctx.codec
    bench_dir = ctx.bench_dir
    paths = scan_images(bench_dir)
    images = [(p.stem, load_image(p)) for p in paths]
    rows = [bench_codec(codec, [item])["images"][0]
            for item in tqdm(images, desc="bench", unit="img", disable=not cfg.progress)]
    mean = {f: float(np.mean([r[f] for r in rows])) for f in NUMERIC_FIELDS}
    mean["jpeg"] = {f: float(np.mean([r["jpeg"][f] for r in rows])) for f in JPEG_FIELDS}
    result = {"spec": codec.spec.name, "images": rows, "mean": mean}
    write_json(out / "bench.json", result)
    _plot_comparison(ctx, images, rows)
    ctx.ordering_image = images[0]
    j = mean["jpeg"]
    line = (f"{len(rows)} held-out images: ours {mean['psnr_db']:.2f} dB / SSIM {mean['ssim']:.3f} at "
            f"{mean['bpp']:.3f} bpp vs JPEG {j['psnr_db']:.2f} dB / SSIM {j['ssim']:.3f} at {j['bpp']:.3f} bpp")
    cmd = (f"mbldm codec bench --codec {quote(out / 'codec')} --images {quote(bench_dir)} "
           f"--json {quote(out / 'bench.json')}")
    return line, [cmd], {**result, "images_dir": str(bench_dir.relative_to(out))}


def _plot_comparison(ctx: DemoContext, images: list[tuple[str, np.ndarray]], rows: list[dict]) -> None:
    """Centre crops of the first three held-out images: original, our decode, JPEG at the same bpp."""
    from mbldm.codec.bench import jpeg_at_bpp
    from mbldm.demo.figures import center_crop, plot_comparison
    from mbldm.eval.metrics import psnr

    codec = ctx.codec
    crop = min(96, ctx.resolution * 2)
    panels = []
    for name, img in images[:3]:
        ours = codec.decode(codec.encode(img), size=img.shape[:2])
        row = next(r for r in rows if r["name"] == name)
        quality, j_bpp, jpeg = jpeg_at_bpp(img, row["bpp"])
        panels.append({"name": name, "spec": codec.spec.name, "original": center_crop(img, crop),
                       "ours": center_crop(ours, crop), "jpeg": center_crop(jpeg, crop), "bpp": row["bpp"],
                       "psnr": psnr(img, ours), "jpeg_bpp": j_bpp, "jpeg_psnr": psnr(img, jpeg),
                       "jpeg_quality": quality})
    plot_comparison(panels, ctx.files / "comparison.png")
    ctx.add_figure("comparison", "comparison.png")


def step_ordering(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """Fig. 3: D(E(x)) and D(E(x) + 1) in k-means order and in PCA order."""
    from mbldm.demo.figures import center_crop, ordering_effect, plot_ordering

    name, img = ctx.ordering_image
    effect = ordering_effect(ctx.codec, np.ascontiguousarray(center_crop(img, 256)))
    plot_ordering(effect, ctx.files / "ordering.png")
    ctx.add_figure("ordering", "ordering.png")
    p, o = effect["psnr"], effect["ordinality"]
    line = (f"ordinality {o['ordered']:.3f} (PCA order) vs {o['unordered']:.3f} (k-means order); PSNR of "
            f"D(E(x)+1): {p['shift_unordered']:.2f} dB unordered -> {p['shift_ordered']:.2f} dB ordered "
            f"(D(E(x)): {p['reconstruction']:.2f} dB)")
    return line, [], {"image": name, "psnr": p, "ordinality": o}


def step_latents(ctx: DemoContext) -> tuple[str, list[str], dict]:
    """``latents build`` of the training set at R x R into OUT/latents."""
    from mbldm.data.latent_store import LatentStore, build_latent_store

    cfg, out, R = ctx.cfg, ctx.out, ctx.resolution
    store_dir = build_latent_store(out / "codec", ctx.train_data, R, out / "latents", progress=cfg.progress)
    store = LatentStore(store_dir)
    hh, ww, c = store.latent_shape
    ctx.summary["choices"]["latent_shape"] = [hh, ww, c]
    line = f"{len(store)} latents {hh}x{ww}x{c} {store.dtype.name} (K={store.num_codewords}) of {R}x{R} images"
    cmd = (f"mbldm latents build --codec {quote(out / 'codec')} --data {quote(ctx.train_data)} --resolution {R} "
           f"--out {quote(out / 'latents')}")
    return line, [cmd], {"count": len(store), "latent_shape": [hh, ww, c], "dtype": store.dtype.name,
                         "resolution": R, "dir": "latents"}
