"""The measuring side of ``benchmarks/train_step.py``: one configuration, run in its own fresh process
(``train_step.py --worker CONFIG_JSON``), builds the U-Net and its loss, checks the memory it will need against
what is free, and times its training steps. See ``train_step.py``'s docstring for what is measured and how.
"""
from __future__ import annotations

import datetime
import os
import resource
import sys
import time
from pathlib import Path

LATENT_CHANNELS = 6  # c of OPQ-32-8-8 (Y 4, Cb 1, Cr 1 sub-quantizers)
CODEBOOK_SIZE = 256  # K of OPQ-32-8-8
PATCH = 8  # s: 64x64 latent <-> 512x512 image
MIN_SNR_GAMMA = 5.0
TAU = 1.0
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)  # TrainConfig defaults
GRAD_CLIP = 1.0
# The bytes autograd saves, scaled from the probe, were 0.90-0.92x of the measured activation memory (step memory
# minus gradients and AdamW states) for the paper preset (latents B=4, categorical B=2, pixels 256 B=1).
ACTIVATION_SLACK = 1.2


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    """The 1 / 5 / 15 minute load averages as text ("unknown" where there are none)."""
    try:
        return "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def utc_now() -> str:
    """The time now, to the minute, as "YYYY-MM-DD HH:MM UTC"."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _rss_mb() -> float:
    """Current resident set size of this process in MB (from /proc/self/statm)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def mem_available_mb() -> float:
    """MemAvailable of /proc/meminfo in MB (inf when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("inf")


def _make_batches(cfg: dict, n: int, device, c: int, K: int):
    """``n`` tuples (x0 or z0, t, noise) of random data for the configuration, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"])
    B, side = cfg["batch"], cfg["side"]
    out = []
    for _ in range(n):
        t = torch.randint(0, 1000, (B,), generator=g)
        if cfg["kind"] == "pixels":
            x0 = torch.rand((B, 3, side, side), generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
            noise = torch.randn((B, 3, side, side), generator=g)
        else:
            x0 = torch.randint(0, K, (B, c, side, side), generator=g)  # (B, c, h, w) indices z0
            noise = torch.randn((B, c, side, side), generator=g)
        out.append((x0.to(device), t.to(device), noise.to(device)))
    return out


def _build(cfg: dict, device):
    """(model, optimizer, forward_loss, step, c, K) for a configuration.

    ``forward_loss(batch, self_cond_pass)`` returns the scalar loss (graph attached); ``step(batch, self_cond_pass)``
    runs one full training step and returns the loss as a float. ``batch`` is a tuple from ``_make_batches``.
    """
    import torch

    from mbldm.diffusion import categorical, losses, schedule
    from mbldm.diffusion.models import build_unet

    kind = cfg["kind"]
    codec = None
    c, K = LATENT_CHANNELS, CODEBOOK_SIZE
    if kind == "categorical":
        from mbldm.codec import Codec

        codec = Codec.load(cfg["codec"]).to(device)
        c, K = codec.latent_channels, codec.num_codewords
    C = 3 if kind == "pixels" else c  # channels of x_t
    out_channels = c * K if kind == "categorical" else C
    torch.manual_seed(cfg["seed"])
    model = build_unet(cfg["preset"], in_channels=2 * C, out_channels=out_channels, sample_size=cfg["side"])
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    alphas_cumprod = schedule.alphas_cumprod_from_betas(schedule.make_betas("linear", 1000)).to(device)

    def forward_loss(batch, self_cond_pass: bool):
        x0, t, noise = batch
        if kind != "pixels":
            x0 = schedule.indices_to_unit(x0, K).float()  # (B, c, h, w) in [-1, 1]
        z_t = schedule.q_sample(x0, t, noise, alphas_cumprod).float()  # (B, C, h, w)
        cond = torch.zeros_like(z_t)
        if self_cond_pass:  # the first, no-grad pass that train() makes on half of the steps
            with torch.no_grad():
                first = model(schedule.self_condition_input(z_t, cond), t).sample.float()
                if kind == "categorical":
                    w = categorical.gumbel_softmax(categorical.logits_from_model_output(first, c, K), TAU)
                    cond = categorical.expected_index_unit(w, K)
                else:
                    cond = schedule.x0_from_eps(z_t, t, first, alphas_cumprod).clamp(-1.0, 1.0)
            del first
        out = model(schedule.self_condition_input(z_t, cond), t).sample.float()  # (B, C, h, w) or (B, c*K, h, w)
        if kind == "categorical":
            logits = categorical.logits_from_model_output(out, c, K)  # (B, c, K, h, w)
            with torch.no_grad():
                x0_image = codec.decode_torch(batch[0])  # (B, 3, H, W) in [0, 255], target of Eq. 24
            return losses.categorical_loss(logits, x0_image, z_t, noise, t, alphas_cumprod, codec.decode_soft,
                                           tau=TAU, min_snr_gamma=MIN_SNR_GAMMA).loss
        return losses.continuous_loss(out, noise, t, alphas_cumprod, min_snr_gamma=MIN_SNR_GAMMA).loss

    def step(batch, self_cond_pass: bool) -> float:
        loss = forward_loss(batch, self_cond_pass)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, optimizer, forward_loss, step, c, K


def _saved_bytes(model, forward_loss, batch) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one forward + loss (no backward run)."""
    import torch

    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        if x.data_ptr() not in params:
            seen[x.data_ptr()] = max(seen.get(x.data_ptr(), 0), x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = forward_loss(batch, False)
    del loss
    return sum(seen.values())


def estimate_step_mb(cfg: dict, device, factor: int) -> dict:
    """Memory estimate of one step of ``cfg`` from a probe at 1/8 of the side (see the module docstring)."""
    from mbldm.diffusion.models import count_parameters

    side = cfg["side"]
    probe_side = max(factor, (side // 8) // factor * factor)
    probe_cfg = dict(cfg, side=probe_side)
    model, _, forward_loss, _, c, K = _build(probe_cfg, device)
    batch = _make_batches(probe_cfg, 1, device, c, K)[0]
    saved = _saved_bytes(model, forward_loss, batch)
    params_mb = count_parameters(model) * 4 / 2**20
    del model, forward_loss, batch
    activations_mb = saved / 2**20 * (side / probe_side) ** 2 * ACTIVATION_SLACK
    return {"probe_side": probe_side, "probe_saved_mb": saved / 2**20, "activations_mb": activations_mb,
            "weights_mb": params_mb, "states_mb": 3 * params_mb}  # gradients + AdamW exp_avg + exp_avg_sq


def _volunteer_for_oom_killer() -> None:
    """Make this worker the kernel OOM killer's first choice, so that a memory shortage ends the benchmark and not
    another process on the shared machine (raising one's own oom_score_adj needs no privilege)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass



def run_worker(cfg: dict) -> dict:
    """Measure one configuration in this process; returns the result dict (also printed as JSON)."""
    import torch

    from mbldm.diffusion.models import count_parameters

    _volunteer_for_oom_killer()
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    res = dict(cfg)
    if not _memory_guard(cfg, device, res):
        return res
    model, optimizer, _, step, c, K = _build(cfg, device)
    res["params"] = count_parameters(model)
    res["in_channels"], res["out_channels"] = model.config.in_channels, model.config.out_channels
    batches = _make_batches(cfg, cfg["warmup"] + cfg["steps"], device, c, K)
    res["rss_before_mb"] = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        res["measured_at"] = utc_now()
        res["load_start"] = loadavg()
        res.update(_time_steps(cfg, step, batches, device))
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
            raise
        res["skipped"] = f"out of memory during the step ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        res["peak_rss_mb"] = _peak_rss_mb()
        return res
    res.update(peak_rss_mb=_peak_rss_mb(), load_end=loadavg())
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res


def _memory_guard(cfg: dict, device, res: dict) -> bool:
    """Estimate the step's memory (``res["estimate"]``); False (with ``res["skipped"]``) when it does not fit."""
    import gc

    import torch

    from mbldm.diffusion.models import preset_downsamplings

    factor = 2 ** preset_downsamplings(cfg["preset"])
    est = estimate_step_mb(cfg, device, factor)
    gc.collect()
    res["estimate"] = est
    need = est["activations_mb"] + est["weights_mb"] + est["states_mb"]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 2**20 - cfg["reserve_mb"]
        where = "free GPU memory"
    else:  # this process's current RSS (torch, the freed probe) is not in MemAvailable: not counted twice
        free = mem_available_mb() - cfg["reserve_mb"]
        where = "MemAvailable"
    res["estimate"]["needed_mb"], res["estimate"]["free_mb"] = need, free
    if need > free:
        res["skipped"] = (f"estimated {need / 1024:.1f} GB for the step > {free / 1024:.1f} GB ({where} minus "
                          f"--reserve-mb {cfg['reserve_mb']})")
        return False
    return True


def _time_steps(cfg: dict, step, batches: list, device) -> dict:
    """Run the warm-up steps, then the timed ones: their wall / CPU seconds and losses."""
    import torch

    warm_walls, warm_cpus = [], []
    for i in range(cfg["warmup"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batches[i], cfg["self_cond_pass"])
        warm_walls.append(time.perf_counter() - t0)
        warm_cpus.append(time.process_time() - c0)
        log(f"  {cfg['label']} B={cfg['batch']}: warm-up step {i + 1} {warm_walls[-1]:.2f} s wall, "
            f"{warm_cpus[-1]:.2f} s CPU")
    walls, cpus, losses_ = [], [], []
    for i in range(cfg["warmup"], cfg["warmup"] + cfg["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses_.append(step(batches[i], cfg["self_cond_pass"]))  # float(): waits for the device
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        log(f"  {cfg['label']} B={cfg['batch']}: step {i + 1 - cfg['warmup']}/{cfg['steps']} "
            f"{walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU")
    return dict(wall_s=walls, cpu_s=cpus, warmup_wall_s=warm_walls, warmup_cpu_s=warm_cpus, loss=losses_)
