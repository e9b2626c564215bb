"""Reproduce the paper's Table 1 (§4.1) cell by cell and write the "## Table 1" section of BENCHMARKS.md.

For each codec (fitted with `mbldm codec fit --spec SPEC --images ../shared/data/mcm --out DIR`), benchmark
baboon / peppers / lena from ../shared/data/sipi and report, beside the paper's numbers:
- the paper-compatible PSNR (MSE on uint8 arrays that wrap modulo 256, ``psnr_paper_uint8``),
- SSIM (scikit-image, data_range 255, colour channels),
- the correct PSNR (Eq. 22 in float64, mean over H*W*3 values),
and, with ``--kodak``, the means over the 24 Kodak images beside Pillow JPEG at the same bits per pixel.

Usage:
    python benchmarks/table1.py --codecs out/codecs/VQ-8-8-8 out/codecs/PQ-32-8-8 out/codecs/OPQ-32-8-8 \
        out/codecs/RQ-32-8-8 [--kodak] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import update_section  # noqa: E402

from mbldm.codec import Codec  # noqa: E402
from mbldm.codec.bench import bench_codec  # noqa: E402
from mbldm.io.images import load_image, scan_images  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Table 1 of the paper: (PSNR, SSIM) for baboon, peppers, lena, and the compression ratio as printed.
PAPER = {
    "VQ-8-8-8": ("1:64", {"baboon": (28.83, 0.40), "peppers": (30.75, 0.63), "lena": (31.23, 0.67)}),
    "PQ-32-8-8": ("1:32", {"baboon": (29.07, 0.60), "peppers": (31.28, 0.69), "lena": (31.80, 0.74)}),
    "OPQ-32-8-8": ("1:32", {"baboon": (29.12, 0.62), "peppers": (31.56, 0.72), "lena": (32.35, 0.78)}),
    "RQ-32-8-8": ("1:23", {"baboon": (29.22, 0.64), "peppers": (31.97, 0.75), "lena": (32.81, 0.81)}),
}
# The prototype mentioned in the issue (OPQ-32-8-8 fitted on 300k McM patches), correct RGB PSNR.
PROTOTYPE_OPQ = {"baboon": 21.9, "peppers": 27.5, "lena": 29.6}
IMAGES = ("baboon", "peppers", "lena")


def _row_table1(spec: str, rows: dict) -> list[str]:
    ratio, paper = PAPER.get(spec, ("?", {}))
    out = []
    for name in IMAGES:
        r = rows[name]
        p_psnr, p_ssim = paper.get(name, (float("nan"), float("nan")))
        out.append(
            f"| {spec} | {name} | {p_psnr:.2f} | {r['psnr_paper_uint8_db']:.2f} | {r['psnr_paper_uint8_db'] - p_psnr:+.2f} "
            f"| {p_ssim:.2f} | {r['ssim']:.3f} | {r['psnr_db']:.2f} | {ratio} | 1:{r['compression_ratio']:g} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", required=True, help="codec directories (one per spec)")
    ap.add_argument("--sipi", default=str(DATA / "sipi"), help="folder holding baboon.png, peppers.png, lena.png")
    ap.add_argument("--kodak", action="store_true", help="also benchmark the 24 Kodak images vs JPEG")
    ap.add_argument("--kodak-dir", default=str(DATA / "kodak"))
    ap.add_argument("--json", default=None, help="write all results as JSON here")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args(argv)

    sipi = [(n, load_image(Path(args.sipi) / f"{n}.png")) for n in IMAGES]
    kodak = [(p.stem, load_image(p)) for p in scan_images(args.kodak_dir)] if args.kodak else []
    results, lines, kodak_lines = {}, [], []
    for codec_dir in args.codecs:
        codec = Codec.load(codec_dir)
        spec = codec.spec.name
        res = bench_codec(codec, sipi)
        rows = {r["name"]: r for r in res["images"]}
        lines += _row_table1(spec, rows)
        results[spec] = {"codec": str(codec_dir), "training": codec.config.training, "sipi": res}
        if kodak:
            kres = bench_codec(codec, kodak)
            m = kres["mean"]
            j = m["jpeg"]
            kodak_lines.append(
                f"| {spec} | {m['bpp']:.3f} | {m['psnr_db']:.2f} | {m['ssim']:.3f} | {j['bpp']:.3f} | {j['quality']:.1f} "
                f"| {j['psnr_db']:.2f} | {j['ssim']:.3f} | {j['psnr_db'] - m['psnr_db']:+.2f} | {j['ssim'] - m['ssim']:+.3f} |"
            )
            results[spec]["kodak"] = kres
        print(f"{spec}: done", file=sys.stderr)

    cmd = "python benchmarks/table1.py " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        "## Table 1 (compression)",
        "",
        f"Measured {when} with `{cmd}`. Codecs fitted with `mbldm codec fit --spec SPEC --images ../shared/data/mcm` "
        "(18 McMaster images + vertical flips = 8,749,764 stride-1 8x8 patches per channel; FAISS samples "
        "its own k-means / OPQ training subsets from them with its defaults: at most 256 points per centroid, "
        "65,536 points for the OPQ rotation). RQ-32-8-8 was fitted with `--max-patches 1000000`: FAISS's "
        "residual-quantizer training encodes every training vector with a beam search and ran out of the "
        "machine's 24 GB on all 8.75M patches (killed at 22.8 GB).",
        "",
        "| codec | image | paper PSNR | ours, uint8 PSNR | diff | paper SSIM | ours SSIM | ours, correct PSNR | paper CR | CR (Eq. 23) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *lines,
        "",
        "**The paper's PSNR column is an overflow artefact.** Every cell is reproduced (within 0.07 dB) only "
        "when the MSE of Eq. 22 is computed on uint8 arrays without widening, so that differences and their "
        "squares wrap modulo 256 (`psnr_paper_uint8_db` in `mbldm codec bench`). The correct PSNR "
        "(`psnr_db`, float64) is 3-9 dB lower; the SSIM column matches a correct computation. "
        f"Correct PSNR of a 300k-patch OPQ prototype, for reference: {PROTOTYPE_OPQ}.",
        "",
        "**Compression ratio of RQ.** Eq. 23 gives 3*8*64/48 = 1:32 for RQ-32-8-8, as for PQ/OPQ; the paper prints "
        "1:23 (about 67 bits per patch). We store exactly 4 + 1 + 1 bytes per patch (FAISS's `ST_decompress` "
        "search type, no norm bits); we could not find an RQ variant that gives 1:23.",
        "",
    ]
    if kodak_lines:
        section += [
            "**Kodak (24 images, 768x512), means; JPEG = Pillow, 4:2:0, lowest quality with bpp >= ours.**",
            "",
            "| codec | bpp | PSNR | SSIM | JPEG bpp | JPEG q (mean) | JPEG PSNR | JPEG SSIM | JPEG - ours PSNR | JPEG - ours SSIM |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *kodak_lines,
            "",
            "JPEG wins at equal rate, as expected of a fixed-rate, entropy-free codec: the point of the latent is a "
            "fixed-size, spatially aligned grid of small integers for the diffusion model, not the best rate.",
            "",
        ]
    update_section(args.out, "## Table 1 (compression)", "\n".join(section) + "\n")
    if args.json:
        from mbldm.io.atomic import write_json

        write_json(args.json, results)
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
