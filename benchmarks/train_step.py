"""Training step cost: seconds and peak memory per training step of the latent denoiser (§4.2.1) beside the same
U-Net trained on pixels, and of the categorical variant (§3.2.2) beside the continuous one, in the same run.

The paper's cost argument (§4.2.1): a 512x512 image is a 64x64x6 latent under OPQ-32-8-8, so the ~50M-parameter
U-Net ("paper" preset) works on 64x smaller feature maps than the same U-Net on 512x512x3 pixels.

    .venv/bin/python benchmarks/train_step.py --batches 1,2,4 --resolutions 512,256 --steps 2

Configurations (every one runs in its own fresh subprocess, so peak memory is per configuration):

* ``latents``: preset ``--preset`` on (B, 2c, h, h) -> (B, c, h, h), c = 6, h = ``--latent-size`` (64): input z_t
  with the self-conditioning channels (``schedule.self_condition_input``), loss ``losses.continuous_loss``
  (Eq. 4, min-SNR gamma 5) on random indices mapped to [-1, 1].
* ``categorical``: the same U-Net with c*K = 1536 output channels, viewed as logits (B, c, K, h, h)
  (``categorical.logits_from_model_output``); loss ``losses.categorical_loss`` (Eq. 24: Gumbel-softmax Eq. 20 +
  ``Codec.decode_soft`` Eq. 21 + eps_z); the target image is ``Codec.decode_torch`` of the random indices (as in
  ``training.train``). The codec is ``--codec`` (default out/codecs/OPQ-32-8-8); when that is absent an
  OPQ-32-8-8 codec is fitted once on the McM images with ``--fit-max-patches`` patches (speed does not depend on
  the fit quality).
* ``pixels``: the same U-Net configuration (block_out_channels, layers, attention) on RGB, 2*3 = 6 input channels
  (x_t and a zero self-conditioning estimate, exactly as the latent model) -> 3 output channels, sample size R
  for every R in ``--resolutions``, loss ``losses.continuous_loss`` on random images in [-1, 1].

One training step = forward + loss + backward + gradient-norm clipping (1.0) + AdamW step (lr 1e-4, weight decay
1e-6, as ``TrainConfig``), in float32. Not included, identically for every configuration: the EMA update, data
loading, and the extra no-grad forward pass that ``train`` makes on half of the steps for self-conditioning
(``--self-cond-pass`` includes it in every timed step). Data are random tensors (the cost does not depend on
them), made before the timing.

Timing: ``--warmup`` untimed steps, then ``--steps`` timed steps; the table gives the mean wall seconds and the
mean CPU seconds (this process, all threads) per step. On a shared machine (see the load average) the wall time
includes waiting for a CPU; the CPU time does not, so the ratios are given for both.

Memory: peak RSS of the subprocess (``resource.getrusage().ru_maxrss``, includes Python, torch and the codec) and
its RSS just before the first step (model, optimizer, data), plus ``torch.cuda.max_memory_allocated`` on CUDA.
Guard: before its first step each subprocess measures the bytes autograd saves for backward on a probe step at
1/8 of the side, extrapolates to the full size (x area, x1.2 slack), adds gradients and AdamW states, and skips the
configuration with a note when that exceeds MemAvailable minus ``--reserve-mb``. A subprocess that dies (e.g.
out of memory) or runs past ``--timeout`` is reported as such.

Writes (or replaces) the section "## Training step cost" of ``--out`` (default BENCHMARKS.md at the repo root)
after every configuration, keeping the other sections (``benchmarks/_report.py``). ``--json FILE`` keeps the raw
results; ``--resume`` then runs only the configurations FILE lacks (time-boxed runs on a shared machine: rows are
tagged with the invocation that measured them), ``--report-only`` rewrites the section from FILE, and ``--note``
adds a sentence under the table (kept in FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The measuring side (building, memory guard, timing) is _train_step_worker.py; this script plans the
# configurations, runs each in a subprocess and renders the report.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _report when imported from elsewhere
from _report import update_section  # noqa: E402
from _train_step_worker import (  # noqa: E402
    ACTIVATION_SLACK,
    CODEBOOK_SIZE,
    LATENT_CHANNELS,
    MIN_SNR_GAMMA,
    TAU,
    log,
    mem_available_mb,
    run_worker,
    utc_now,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SECTION = "## Training step cost"
DEFAULT_CODEC = REPO / "out" / "codecs" / "OPQ-32-8-8"
KINDS = ("latents", "categorical", "pixels")
RESULT_TAG = "TRAIN_STEP_RESULT "


# ================================================================== driver
def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{name}: expected positive integers, got {text!r}")
    return values


def plan(args) -> list[dict]:
    """The configurations to run, cheapest kinds first (so a time-boxed run keeps the most results)."""
    common = dict(preset=args.preset, steps=args.steps, warmup=args.warmup, threads=args.threads,
                  device=args.device, seed=0, self_cond_pass=args.self_cond_pass, reserve_mb=args.reserve_mb,
                  nice=os.nice(0))
    h = args.latent_size
    cfgs = []
    if "latents" in args.only:
        cfgs += [dict(common, kind="latents", label=f"latents {h}x{h}x{LATENT_CHANNELS}", side=h, batch=b)
                 for b in args.batches]
    if "categorical" in args.only:
        cfgs += [dict(common, kind="categorical", label=f"categorical {h}x{h}x{LATENT_CHANNELS}", side=h, batch=b,
                      codec=args.codec, codec_desc=getattr(args, "codec_desc", None))
                 for b in args.categorical_batches]
    if "pixels" in args.only:
        for r in sorted(args.resolutions):
            for b in args.pixel_batches:
                cfg = dict(common, kind="pixels", label=f"pixels {r}x{r}x3", side=r, batch=b)
                if b * r * r > args.max_pixels:
                    cfg["skipped"] = (f"not run: {b} x {r}x{r} = {b * r * r:,} pixels per step > --max-pixels "
                                      f"{args.max_pixels:,}")
                cfgs.append(cfg)
    return cfgs


def run_config(cfg: dict, args) -> dict:
    """Run ``cfg`` in a fresh subprocess (same interpreter, same nice level) and return its result."""
    if "skipped" in cfg:
        return dict(cfg)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(cfg, skipped=f"killed after --timeout {args.timeout:g} s")
    elapsed = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG):]), process_s=elapsed)
    return dict(cfg, skipped=f"subprocess exited with code {proc.returncode} and no result (killed for memory?)")


def ensure_codec(args) -> str:
    """Path of the codec for the categorical configurations (fitting a small one in a temp folder if needed)."""
    if args.codec and Path(args.codec).is_dir():
        path = Path(args.codec).resolve()
        args.codec_desc = f"`{path.relative_to(REPO) if path.is_relative_to(REPO) else path}`"
        return args.codec
    import tempfile

    from mbldm.codec import Codec
    from mbldm.io.images import load_image, scan_images

    paths = list(scan_images(DATA / "mcm"))
    if not paths:
        raise FileNotFoundError(f"{args.codec}: no codec there, and no McM images in {DATA / 'mcm'} to fit one")
    log(f"{args.codec}: not found; fitting OPQ-32-8-8 on {len(paths)} McM images, max_patches={args.fit_max_patches}")
    codec = Codec.fit([load_image(p) for p in paths], spec="OPQ-32-8-8", max_patches=args.fit_max_patches)
    out = Path(tempfile.mkdtemp(prefix="train_step_codec_")) / "OPQ-32-8-8"
    codec.save(out)
    args.codec_desc = (f"OPQ-32-8-8 fitted for this run on the {len(paths)} McM images "
                       f"({args.fit_max_patches:,} patches)")
    return str(out)




# ------------------------------------------------------------------ report
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()




def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _fmt_ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or key not in a or key not in b:
        return "n/a"
    return f"{_mean(a[key]) / _mean(b[key]):.1f}x" if isinstance(a[key], list) else f"{a[key] / b[key]:.2f}x"


def _needed_mb(r: dict) -> float:
    """The guard's estimate of a step's memory, recomputed from the stored probe with today's ACTIVATION_SLACK."""
    e = r["estimate"]
    activations = e["probe_saved_mb"] * (r["side"] / e["probe_side"]) ** 2 * ACTIVATION_SLACK
    return activations + e["weights_mb"] + e["states_mb"]


def _step_mb_ratio(a: dict, b: dict) -> str:
    """Ratio of the steps' own memory (peak RSS minus RSS before the first step)."""
    da, db = a["peak_rss_mb"] - a["rss_before_mb"], b["peak_rss_mb"] - b["rss_before_mb"]
    return f"{da / db:.1f}x" if db > 0 else "n/a"


def _commands(results: list[dict]) -> dict[str, int]:
    """The distinct commands that measured ``results``, numbered 1, 2, ... in order of appearance."""
    tags: dict[str, int] = {}
    for r in results:
        if "command" in r:
            tags.setdefault(r["command"], len(tags) + 1)
    return tags


def _command_line(tag: int, command: str, rows: list[dict]) -> str:
    """One line describing an invocation: its command, when its rows were measured and the load around them."""
    when = sorted(r["measured_at"] for r in rows if "measured_at" in r)
    loads = [r[k] for r in rows for k in ("load_start", "load_end") if k in r]
    nice = sorted({r["nice"] for r in rows if "nice" in r})
    parts = [f"[{tag}] `{command}`"]
    if when:
        parts.append(f"rows measured {when[0]}" + (f" to {when[-1]}" if when[-1] != when[0] else ""))
    if loads:
        parts.append(f"load average (1/5/15 min) {loads[0]} before the first row, {loads[-1]} after the last")
    if nice:
        parts.append(f"nice {', '.join(map(str, nice))}")
    return "; ".join(parts) + "."


def _codec_description(results: list[dict]) -> str:
    for r in results:
        if r["kind"] == "categorical" and "wall_s" in r:
            if r.get("codec_desc"):
                return r["codec_desc"]
            path = Path(r["codec"])
            return f"`{path.relative_to(REPO)}`" if path.is_relative_to(REPO) else f"`{path}`"
    return "no codec (categorical not run)"


def render_section(results: list[dict], info: dict, finished: bool) -> str:
    """The markdown section for ``results`` (measured now or carried over with --resume)."""
    measured = [r for r in results if "wall_s" in r]
    cuda = any(r["device"].startswith("cuda") for r in measured)
    tags = _commands(measured)
    results = sorted(results, key=lambda r: (KINDS.index(r["kind"]), r["side"], r["batch"]))
    head, sep, rows, notes = _table(results, tags, cuda)
    ratio_rows = _ratio_rows(measured)
    lines = [
        SECTION, "",
        f"Written {utc_now()}" + ("" if list(tags) == [info["command"]] else f" by `{info['command']}`")
        + ("" if finished else " (run in progress: partial)") + ".",
    ]
    if len(tags) > 1:
        lines.append("Rows were measured by " + str(len(tags)) + " invocations (the tag after each row's name), "
                     "the later ones with --resume (same machine and settings except as stated):")
        lines += [""] + [f"- {_command_line(t, c, [r for r in measured if r['command'] == c])}"
                         for c, t in tags.items()] + [""]
    elif tags:
        c = next(iter(tags))
        lines.append("Measured with " + _command_line(1, c, measured)[4:])
    lines += [*_setup_lines(measured, info, results), "", head, sep, *rows]
    if ratio_rows:
        lines += ["", "| ratio | batch | wall s/step | CPU s/step | peak RSS | step MB |",
                  "|---|---:|---:|---:|---:|---:|",
                  *ratio_rows]
    if any(r["warmup"] == 0 for r in measured):
        notes.append("Rows with 0 warm-up steps time the very first step, which also pays one-time costs (first "
                     "touch of freshly allocated memory, AdamW state allocation, oneDNN set-up): they slightly "
                     "overstate that configuration's per-step cost (used to fit the slowest row in the time box).")
    lines += [""] + notes + info.get("notes", []) + [_CLOSING_NOTE]
    return "\n".join(lines) + "\n"


_CLOSING_NOTE = (
    "Pixel models take 6 input channels (RGB x_t + a zero self-conditioning estimate) and predict 3, as the "
    f"latent model takes 2c = {2 * LATENT_CHANNELS} and predicts c = {LATENT_CHANNELS} (categorical: "
    f"c*K = {LATENT_CHANNELS * CODEBOOK_SIZE} logits). Peak RSS is the whole subprocess (Python, torch, codec "
    "tables); 'RSS before' is after building the model, optimizer and data (and after the memory probe, which "
    "runs one forward at 1/8 of the side first), 'step MB' = peak - before is the step's own memory "
    "(activations, gradients, AdamW states), and 'estimate MB' is the guard's prediction of it. CPU s is this "
    "process's CPU time (all threads): on a shared machine the wall time also counts waiting for a CPU, so the "
    "CPU-time ratio is the cleaner measure of cost.")


def _table(results: list[dict], tags: dict[str, int], cuda: bool) -> tuple[str, str, list[str], list[str]]:
    """(header, separator, one row per configuration, a note per configuration not run) of the main table."""
    head = ("| config | batch | in -> out ch | params | warm-up + timed steps | wall s/step | CPU s/step "
            "| RSS before MB | peak RSS MB | step MB | estimate MB |")
    sep = "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if cuda:
        head, sep = head + " peak CUDA MB |", sep + "---:|"
    rows, notes = [], []
    for r in results:
        if "wall_s" in r:
            tag = f" [{tags[r['command']]}]" if len(tags) > 1 else ""
            cells = [r["label"] + tag, str(r["batch"]), f"{r['in_channels']} -> {r['out_channels']}",
                     f"{r['params']:,}", f"{r['warmup']} + {len(r['wall_s'])}", f"{_mean(r['wall_s']):.2f}",
                     f"{_mean(r['cpu_s']):.2f}", f"{r['rss_before_mb']:,.0f}", f"{r['peak_rss_mb']:,.0f}",
                     f"{r['peak_rss_mb'] - r['rss_before_mb']:,.0f}", f"{_needed_mb(r):,.0f}"]
            if cuda:
                cells.append(f"{r.get('cuda_peak_mb', float('nan')):,.0f}")
        else:
            est = r.get("estimate", {}).get("needed_mb")
            cells = ([r["label"], str(r["batch"]), "", "", "", "not run", "", "", "", "",
                      f"{est:,.0f}" if est is not None else ""] + ([""] if cuda else []))
            notes.append(f"{r['label']} batch {r['batch']}: {r['skipped']}.")
        rows.append("| " + " | ".join(cells) + " |")
    return head, sep, rows, notes


def _ratio_rows(measured: list[dict]) -> list[str]:
    """Rows of the ratio table: pixels / latents and categorical / continuous, per batch size."""
    def find(kind, side, batch):
        for r in measured:
            if r["kind"] == kind and r["side"] == side and r["batch"] == batch:
                return r
        return None

    def row(name: str, b: int, a: dict, lat: dict) -> str:
        return (f"| {name} | {b} | {_fmt_ratio(a, lat, 'wall_s')} | {_fmt_ratio(a, lat, 'cpu_s')} | "
                f"{_fmt_ratio(a, lat, 'peak_rss_mb')} | {_step_mb_ratio(a, lat)} |")

    ratio_rows = []
    batches = sorted({r["batch"] for r in measured})
    for h in sorted({r["side"] for r in measured if r["kind"] == "latents"}):
        lat_name = f"latents {h}x{h}x{LATENT_CHANNELS}"
        for side in sorted({r["side"] for r in measured if r["kind"] == "pixels"}, reverse=True):
            for b in batches:
                p, lat = find("pixels", side, b), find("latents", h, b)
                if p and lat:
                    ratio_rows.append(row(f"pixels {side}x{side}x3 / {lat_name}", b, p, lat))
        for b in batches:
            cat, lat = find("categorical", h, b), find("latents", h, b)
            if cat and lat:
                ratio_rows.append(row(f"categorical / continuous {lat_name}", b, cat, lat))
    return ratio_rows


def _setup_lines(measured: list[dict], info: dict, results: list[dict]) -> list[str]:
    """The machine, the U-Net and step, and the losses: three paragraphs above the table."""
    import torch

    def values(key):
        return ", ".join(str(v) for v in sorted({r[key] for r in measured})) or "n/a"

    self_cond = {r["self_cond_pass"] for r in measured}
    return [
        f"Machine: {cpu_model()}; {os.cpu_count()} logical CPUs, {info['mem_total_gb']:.0f} GB RAM; device "
        f"{values('device')}; torch threads {values('threads')} (OMP_NUM_THREADS likewise); Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        f"U-Net preset `{values('preset')}` (the same block_out_channels / layers / mid-block attention for every "
        "row); untimed warm-up step(s), then the mean of the timed steps (counts per row); each configuration in a "
        "fresh subprocess. A step: forward + loss + backward + grad-norm clipping + AdamW, float32"
        + (", including the no-grad self-conditioning pass" if self_cond == {True} else
           " (self-conditioning input channels with a zero estimate; the extra no-grad pass of half the training "
           "steps is not included)" if self_cond == {False} else "") + ".",
        f"Losses: latents and pixels `losses.continuous_loss` (Eq. 4, min-SNR gamma {MIN_SNR_GAMMA:g}); categorical "
        f"`losses.categorical_loss` (Eq. 24, tau {TAU:g}) with `Codec.decode_soft` of {_codec_description(results)}.",
    ]


def _parser() -> argparse.ArgumentParser:
    """The command line of this script (the module docstring is its help)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                         "\n\n", 1)[1])
    parser.add_argument("--preset", default="paper", help="U-Net preset (default: paper, ~48.5M parameters)")
    parser.add_argument("--batches", type=lambda s: parse_ints(s, "--batches"), default=[1, 2, 4],
                        help="batch sizes of the latent (continuous) model (default 1,2,4)")
    parser.add_argument("--categorical-batches", type=lambda s: parse_ints(s, "--categorical-batches"),
                        help="batch sizes of the categorical model (default: --batches)")
    parser.add_argument("--pixel-batches", type=lambda s: parse_ints(s, "--pixel-batches"),
                        help="batch sizes of the pixel models (default: --batches, limited by --max-pixels)")
    parser.add_argument("--resolutions", type=lambda s: parse_ints(s, "--resolutions"), default=[512, 256],
                        help="image sides of the pixel models (default 512,256)")
    parser.add_argument("--max-pixels", type=int, default=512 * 512,
                        help="pixel configurations with batch*H*W above this are not run (default 512*512: batch 1 "
                             "only at 512)")
    parser.add_argument("--latent-size", type=int, default=64, help="latent side h (default 64: 512x512 images)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch / OpenMP threads (default: $OMP_NUM_THREADS or all CPUs)")
    parser.add_argument("--only", action="append", choices=KINDS,
                        help="run only this kind (repeatable; default: all three)")
    parser.add_argument("--self-cond-pass", action="store_true",
                        help="include the no-grad self-conditioning pass in every timed step")
    parser.add_argument("--codec", default=str(DEFAULT_CODEC), help="codec for the categorical loss")
    parser.add_argument("--fit-max-patches", type=int, default=30_000,
                        help="patches per channel when a codec must be fitted (default 30000)")
    parser.add_argument("--reserve-mb", type=float, default=3000,
                        help="memory left to other processes: skip a configuration whose estimate exceeds "
                             "MemAvailable minus this (default 3000)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (default 1800)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write --out")
    parser.add_argument("--json", help="also write the raw per-configuration results to this JSON file")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence to add under the table (repeatable; kept in --json for later re-renders)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the section from the results in --json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the measured results already in --json and run only the configurations they lack "
                             "(for time-boxed runs on a shared machine; the rows are marked in the table)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one configuration in this fresh process
        result = run_worker(json.loads(argv[1]))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.latent_size) < 1 or args.warmup < 0:
        parser.error("--steps and --latent-size must be >= 1, --warmup >= 0")
    args.only = args.only or list(KINDS)
    args.categorical_batches = args.categorical_batches or args.batches
    args.pixel_batches = args.pixel_batches or args.batches
    if args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    import torch

    from mbldm.io.atomic import write_json

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.resume = args.resume or args.report_only
    if "categorical" in args.only and not args.report_only:
        args.codec = ensure_codec(args)

    info = {"command": "python benchmarks/train_step.py " + _shown_args(argv), "mem_total_gb": _mem_total_gb(),
            "notes": list(args.note)}
    cfgs = plan(args)
    results = []
    if args.resume:
        results, cfgs = _carry_over(args, info, cfgs)

    def publish(finished: bool) -> str:
        section = render_section(results, info, finished=finished)
        if not args.no_write:
            update_section(args.out, SECTION, section)
        if args.json:
            write_json(args.json, {"command": info["command"], "notes": info["notes"], "results": results})
        return section

    section = publish(finished=not cfgs)
    for i, cfg in enumerate(cfgs):
        log(f"[{i + 1}/{len(cfgs)}] {cfg['label']} batch {cfg['batch']}" +
            (f": {cfg['skipped']}" if "skipped" in cfg else f" (available {mem_available_mb() / 1024:.1f} GB)"))
        r = dict(run_config(cfg, args), command=info["command"])
        results.append(r)
        _log_result(r)
        section = publish(finished=i == len(cfgs) - 1)
    print(section)
    if not args.no_write:
        log(f"wrote section {SECTION!r} of {args.out}")
    return 0


def _carry_over(args, info: dict, cfgs: list[dict]) -> tuple[list[dict], list[dict]]:
    """--resume: the measured results of --json (tagged with their command) and the configurations they lack;
    the earlier notes join ``info["notes"]``."""
    previous = _load_previous(args.json)
    results = [dict(r, carried_over=True, command=r.get("command", previous["command"]))
               for r in previous["results"] if "wall_s" in r]
    info["notes"] = [n for n in previous.get("notes", []) if n not in args.note] + info["notes"]
    done = {_config_key(r) for r in results}
    cfgs = [] if args.report_only else [cfg for cfg in cfgs if _config_key(cfg) not in done]
    log(f"--resume: {len(results)} measured configuration(s) from {args.json}; {len(cfgs)} to run")
    return results, cfgs


def _log_result(r: dict) -> None:
    if "wall_s" in r:
        log(f"    {_mean(r['wall_s']):.2f} s/step wall, {_mean(r['cpu_s']):.2f} s/step CPU, "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB, {r['params']:,} params")
    elif "skipped" in r:
        log(f"    not run: {r['skipped']}")


def _shown_args(argv: list[str]) -> str:
    """The command-line arguments as shell text, with each --note's text (shown under the table) as "..."."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            shown.append("...")
        elif arg.startswith("--note="):
            shown.append("--note=...")
        else:
            shown.append(arg)
        skip = arg == "--note" and not skip
    return shlex.join(shown).replace("'...'", "...")


def _config_key(cfg: dict) -> tuple:
    """What makes two measurements the same configuration (for --resume)."""
    return tuple(cfg.get(k) for k in ("kind", "side", "batch", "preset", "threads", "device", "self_cond_pass"))


def _load_previous(path: str | None) -> dict:
    """The JSON written by an earlier --json (for --resume); raises ValueError/FileNotFoundError when unusable."""
    if not path:
        raise ValueError("--resume needs --json FILE (the results file of the earlier invocation)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no results file to resume from")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{file}: not a train_step results file (no 'results' list)")
    return data



def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
