"""``OUT/report.html``: one self-contained page (inline CSS, no scripts) built from the demo's summary dict.

Images are PNG files in ``OUT/report_files/`` referenced by relative paths, so the folder can be moved or served
as is. Every piece of text from the run (names, paths, commands, warnings) is HTML-escaped.
"""
from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_report", "write_report"]

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
pre, code { background: #f6f6f6; font-family: ui-monospace, 'SFMono-Regular', Menlo, monospace; font-size: .85em; }
pre { padding: .7em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; border: 1px solid #ddd; } figure { margin: 1em 0; }
figcaption { font-size: .85em; color: #555; } .note { color: #555; font-size: .9em; }
"""


def _e(value: Any) -> str:
    """HTML-escaped text of ``value`` (quotes too)."""
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("nan" if math.isnan(value) else "-inf")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return _e(value)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns are left-aligned."""
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(summary: dict, key: str, caption: str) -> str:
    src = summary.get("figures", {}).get(key)
    if not src:
        return ""
    return f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _section_data(s: dict) -> str:
    d = s.get("data", {})
    if d.get("mode") == "bundled":
        rows = [[_e(p["name"]), _e(p["package"]), _e(p["role"]), f"{p['size'][1]}x{p['size'][0]}",
                 f"<code>{_e(p['source'])}</code>"] for p in d.get("photos", [])]
        text = (f"<p>No <code>--data</code> given: the real colour photographs bundled with the installed packages "
                f"were used ({len(rows)} found; nothing was downloaded). Photos marked <em>fit</em> trained the "
                f"codec, <em>heldout</em> ones are the benchmark. The diffusion model trained on "
                f"{_e(d.get('crops'))} random crops ({_e(d.get('crop_rule'))}).</p>")
        return text + _table(["photo", "package", "role", "size (WxH)", "file"], rows)
    if d.get("mode") == "folder":
        return (f"<p>Image folder <code>{_e(d.get('folder'))}</code>: {_e(d.get('images'))} images; "
                f"{_e(d.get('fit'))} random ones fitted the codec, {_e(d.get('heldout'))} others are the benchmark, "
                f"all trained the diffusion model.</p>")
    return ""


def _section_bench(s: dict) -> str:
    b = s.get("bench")
    if not b:
        return ""
    rows = []
    for r in [*b["images"], {**b["mean"], "name": "mean"}]:
        j = r["jpeg"]
        rows.append([_e(r["name"]), _num(r["psnr_db"]), _num(r["ssim"], ".3f"), _num(r["psnr_paper_uint8_db"]),
                     _num(r["bpp"], ".4f"), f"1:{_num(r['compression_ratio'], 'g')}",
                     _num(j["quality"], ".0f" if r["name"] != "mean" else ".1f"), _num(j["bpp"], ".4f"),
                     _num(j["psnr_db"]), _num(j["ssim"], ".3f")])
    c = s.get("codec", {})
    text = (f"<p>Codec <code>{_e(b['spec'])}</code>: c = {_e(c.get('latent_channels'))} latent channels, "
            f"K = {_e(c.get('num_codewords'))} codewords, {_num(c.get('bpp'), '.3f')} bits per pixel, compression "
            f"ratio 1:{_num(c.get('compression_ratio'), 'g')} (Eq. 23). JPEG (Pillow, 4:2:0) at the lowest quality "
            f"whose bit rate reaches ours. PSNR is the standard one; PSNR-u8 reproduces the paper's Table 1 "
            f"(uint8 wraparound, a bug kept for comparison).</p>")
    table = _table(["image", "PSNR dB", "SSIM", "PSNR-u8", "bpp", "CR", "JPEG q", "JPEG bpp", "JPEG PSNR",
                    "JPEG SSIM"], rows)
    return text + table + _figure(s, "comparison", "Centre crops: original | ours | JPEG at the same bit rate "
                                  "(pixels enlarged, nearest neighbour)")


def _section_ordering(s: dict) -> str:
    o = s.get("ordering")
    if not o:
        return ""
    p, od = o["psnr"], o["ordinality"]
    rows = [["D(E(x))", _num(p["reconstruction"])], ["D(E(x)+1), k-means order", _num(p["shift_unordered"])],
            ["D(E(x)+1), PCA order (§3.2.1)", _num(p["shift_ordered"])]]
    return (f"<p>Adding 1 to every index of the latent of <em>{_e(o['image'])}</em>: with the arbitrary k-means "
            f"order the image is destroyed, with the PCA order it barely changes (the paper's Fig. 3). Mean "
            f"ordinality of the sub-codebooks (mean distance of consecutive codewords / mean distance of all pairs; "
            f"1 = random): {_num(od['ordered'], '.3f')} ordered vs {_num(od['unordered'], '.3f')} unordered.</p>"
            + _table(["panel", "PSNR vs x (dB)"], rows)
            + _figure(s, "ordering", "Fig. 3: x, (a) D(E(x)), (b) D(E(x)+1) before ordering, (c) after ordering"))


def _section_training(s: dict) -> str:
    rows = []
    for v in s.get("choices", {}).get("variants", []):
        t = s.get(f"train_{v}")
        if t:
            rows.append([_e(v), _e(t["preset"]), _num(t["parameters"], ","), _num(t["steps_done"], ","),
                         _num(t["batch_size"], "d"), _num(t["lr"], "g"), _num(t["seconds"], ".0f"),
                         _num(t["first_loss"], ".4f"), _num(t["last_loss"], ".4f")])
    r = s.get("refiner")
    text = _table(["variant", "preset", "parameters", "steps", "batch", "lr", "seconds", "first loss",
                   "last loss"], rows) if rows else ""
    if r:
        ev = [[_num(e["noise_std"], "g"), _num(e["psnr_before"]), _num(e["psnr_after"]), _num(e["ssim_before"], ".3f"),
               _num(e["ssim_after"], ".3f")] for e in r["eval"]]
        text += (f"<p>Refiner (§4.2.2): {_num(r['parameters'], ',')} parameters, {_num(r['steps_done'], ',')} steps. "
                 f"Held-out images degraded as D(E(x) + σ·N(0,1)) in index space, before / after refinement:</p>"
                 + _table(["σ (index units)", "PSNR before", "PSNR after", "SSIM before", "SSIM after"], ev, left=0))
        clean = [e for e in r["eval"] if e["noise_std"] == 0]
        if clean and clean[0]["psnr_after"] < clean[0]["psnr_before"]:
            text += (f"<p><b>Note:</b> on clean decodes (σ = 0) this refiner lowers PSNR from "
                     f"{clean[0]['psnr_before']:.2f} to {clean[0]['psnr_after']:.2f} dB: it is undertrained for this "
                     "budget. The sample grids below show the images before the refiner too.</p>")
    return text + _figure(s, "loss", "Training losses (log scale); loss_q0..q3: by timestep quartile")


def _section_samples(s: dict) -> str:
    parts = []
    for v in s.get("choices", {}).get("variants", []):
        smp = s.get("samples", {}).get(v)
        if not smp:
            continue
        size = smp["image_size"]
        parts.append(f"<h3>{_e(v)} variant</h3><p>{_e(smp['count'])} images of {size[1]}x{size[0]}, DDIM "
                     f"{_e(smp['steps'])} steps, seeds {_e(smp['seed'])}..{_e(smp['seed'] + smp['count'] - 1)} "
                     f"(image i uses seed + i), {_num(smp['seconds'], '.1f')} s"
                     f"{', refined' if smp['refiner'] else ''}.</p>")
        parts.append(_figure(s, f"trajectory_{v}", f"Sampling steps t = 1000 .. 0 of one sample (as in Fig. 7): "
                             f"top the decoded x_t, bottom the decoded x0 estimate"))
        parts.append(_figure(s, f"grid_{v}", f"{v} samples" + (" after the refiner" if smp["refiner"] else "")))
        parts.append(_figure(s, f"grid_{v}_raw", f"{v} samples before the refiner"))
    return "".join(parts)


def _section_fid(s: dict) -> str:
    f = s.get("fid")
    if not f:
        return ""
    if "skipped" in f:
        return f"<p>{_e(f['skipped'])}</p>"
    rows = [[_e(v), _num(r["fid"]), _num(r["n_real"], "d"), _num(r["n_fake"], "d")] for v, r in f.items()]
    warn = next((r.get("warning") for r in f.values() if r.get("warning")), None)
    return _table(["variant", "FID", "real images", "generated"], rows) + (
        f'<p class="note">{_e(warn)}</p>' if warn else "")


def _section_steps(s: dict) -> str:
    rows = [[_e(st["title"]), _num(st["seconds"], ".1f"), _num(st.get("cpu_seconds"), ".1f"), _e(st["summary"])]
            for st in s.get("steps", [])]
    total = s.get("total_seconds")
    m = s.get("machine", {})
    text = (f"<p>Total {_num(total, '.0f')} s on {_e(m.get('cpus'))} CPUs ({_e(m.get('threads'))} torch threads, "
            f"1-min load average {_num(m.get('load_average_start'), '.1f')} at start, "
            f"{_num(m.get('load_average_end'), '.1f')} at the end; CUDA: {_e(m.get('cuda'))}), torch "
            f"{_e(m.get('torch'))}.</p>")
    text += ("<p class=\"note\">CPU seconds are this process's user + system time; far fewer than the wall "
             "seconds means the machine was busy with other work.</p>")
    return text + _table(["step", "seconds", "CPU seconds", "result"], rows, left=1)


def _section_commands(s: dict) -> str:
    lines = [s.get("command", "")]
    hidden = s.get("hidden_settings") or {}
    if hidden:
        lines.append("# plus settings without a command-line flag (DemoConfig): "
                     + ", ".join(f"{k}={v}" for k, v in hidden.items()))
    lines.append("")
    lines.append("# the same steps one by one:")
    for st in s.get("steps", []):
        lines.extend(st.get("commands", []))
    rerun = s.get("rerun")
    text = "<pre>" + _e("\n".join(lines)) + "</pre>"
    if rerun:
        text += ("<p>The run folder holds everything needed to sample again later (config, codec, EMA weights):</p>"
                 f"<pre>{_e(rerun)}</pre>")
    return text + '<p>Every number of this page is in <a href="demo.json">demo.json</a>.</p>'


def render_report(summary: dict) -> str:
    """The report page (HTML text) for a demo summary dict (what ``OUT/demo.json`` holds)."""
    sections = [
        ("Command", f"<pre>{_e(summary.get('command', ''))}</pre>" + (
            "<p class=\"note\">Settings without a flag: "
            + _e(", ".join(f"{k}={v}" for k, v in summary["hidden_settings"].items())) + "</p>"
            if summary.get("hidden_settings") else "")),
        ("Steps and timing", _section_steps(summary)),
        ("Data", _section_data(summary)),
        ("Compression: codec vs JPEG (Table 1)", _section_bench(summary)),
        ("The ordering effect (Fig. 3)", _section_ordering(summary)),
        ("Training", _section_training(summary)),
        ("Samples", _section_samples(summary)),
        ("FID", _section_fid(summary)),
        ("Reproduce", _section_commands(summary)),
    ]
    body = "".join(f"<h2>{_e(title)}</h2>{content}" for title, content in sections if content)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>mbldm demo report</title>"
            f"<style>{CSS}</style></head><body><h1>mbldm demo: diffusion on a model-based latent space</h1>"
            "<p class=\"note\">Scribano et al., \"Denoising Diffusion Models on Model-Based Latent Space\", "
            "Algorithms 2023. A short CPU run: the numbers show the pipeline working, not the paper's results.</p>"
            f"{body}</body></html>\n")


def write_report(summary: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path.

    Raises:
        FileNotFoundError: a figure listed in ``summary["figures"]`` is missing under ``out_dir``.
    """
    from mbldm.io.atomic import write_text

    out = Path(out_dir)
    for key, rel in summary.get("figures", {}).items():
        if not (out / rel).is_file():
            raise FileNotFoundError(f"{out / rel}: figure {key!r} of the report is missing")
    path = out / "report.html"
    write_text(path, render_report(summary))
    return path
