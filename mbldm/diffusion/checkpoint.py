"""Training checkpoints: the full resume state in safetensors + JSON (no pickle), written atomically.

Layout of one checkpoint (``RUN/checkpoints/step_0001000/``)::

    model.safetensors       live model state_dict (unwrapped, float32)
    ema.safetensors         EMA shadow parameters, keyed by parameter name
    ema.json                EMA scalars (decay, optimization_step, warm-up settings)
    optimizer.safetensors   every tensor of optimizer.state_dict()["state"], key "state.<param id>.<name>"
    optimizer.json          param_groups and the non-tensor state values
    scheduler.json          LR scheduler state_dict
    scaler.json             fp16 GradScaler state_dict (only when one is used)
    rng.safetensors         torch CPU RNG state (+ "torch_cuda_<i>" per CUDA device), uint8
    rng.json                numpy and python ``random`` states
    state.json              {"format": "mbldm-checkpoint", "version": 1, "step": N, "complete": true, ...extra}

The files are written into a hidden temporary folder beside the final one, fsynced, and the folder is renamed
to ``step_XXXXXXX`` as the last action, so a ``step_*`` folder is always complete; a crash leaves at most a
``.tmp-*`` folder, which listing ignores. Saving only reads the live tensors (never changes them).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_state",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINT_FORMAT = "mbldm-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "state.json"
_NAME_RE = re.compile(r"^step_(\d{7,})$")


# ----------------------------------------------------------------------------------------------- naming / listing

def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps: ``step_0001000``."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:07d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first (empty if ``root`` is missing).

    A folder counts when its name is ``step_<digits>`` and it holds ``state.json`` (temporary ``.tmp-*``
    folders of an interrupted save are ignored).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (highest step), or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and stale ``.tmp-*`` folders; return the deleted.

    Raises:
        ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    root = Path(root)
    removed = [p for _, p in list_checkpoints(root)[:-keep]]
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------------------- optimizer state

def optimizer_state_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready dict.

    Tensors of ``state[pid][name]`` become ``"state.<pid>.<name>"`` (copied to CPU); other state values and
    ``param_groups`` go to the JSON part ``{"param_groups": [...], "state_values": {pid: {name: value}}}``.
    Raises:
        ValueError: a state value that is neither a tensor nor JSON-serialisable.
    """
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                _check_jsonable(value, f"optimizer state {pid}.{name}")
                values.setdefault(str(pid), {})[name] = value
    groups = [dict(g) for g in state_dict["param_groups"]]
    _check_jsonable(groups, "optimizer param_groups")
    return tensors, {"param_groups": groups, "state_values": values}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_flat`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta.get("state_values", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:  # JSON turned tuples (e.g. Adam betas) into lists
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    return {"state": state, "param_groups": groups}


def _check_jsonable(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot checkpoint {what}: not JSON-serialisable ({exc})") from None


# ----------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states of this process: torch CPU (+ each initialised CUDA device) as uint8 tensors, numpy and python
    ``random`` as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"bit_generator": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only for devices that exist)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
    n = meta["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------- save / load

def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _ema_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
    scaler: Any | None = None,
    extra: dict | None = None,
    keep: int | None = None,
) -> Path:
    """Write the full resume state after ``step`` optimizer steps to ``root/step_XXXXXXX`` atomically.

    Args:
        root: the checkpoints folder (created).
        step: number of optimizer steps taken so far (>= 0).
        model: the unwrapped model (its ``state_dict()`` is saved as float tensors).
        optimizer: a torch optimizer (or Accelerate's wrapper; its ``state_dict()`` is used).
        lr_scheduler: an object with a JSON-serialisable ``state_dict()`` (e.g. ``LambdaLR``).
        ema: optional ``diffusers.training_utils.EMAModel`` tracking ``model.parameters()``.
        scaler: optional ``torch.amp.GradScaler`` (fp16 mixed precision).
        extra: optional JSON-serialisable dict stored in state.json (e.g. the data position).
        keep: if given, delete all but the newest ``keep`` checkpoints afterwards.
    Returns:
        The checkpoint folder. An existing folder for the same step is replaced.
    Raises:
        ValueError: ``step < 0`` or a non-serialisable state.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        _write_safetensors(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            names = _ema_names(model)
            if len(names) != len(ema.shadow_params):
                raise ValueError(f"EMA tracks {len(ema.shadow_params)} tensors, the model has {len(names)} parameters")
            _write_safetensors(tmp / "ema.safetensors", dict(zip(names, ema.shadow_params)))
            ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            _check_jsonable(ema_meta, "EMA state")
            _write_json(tmp / "ema.json", ema_meta)
        opt_tensors, opt_meta = optimizer_state_to_flat(optimizer.state_dict())
        _write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_meta)
        sched = lr_scheduler.state_dict()
        _check_jsonable(sched, "LR scheduler state")
        _write_json(tmp / "scheduler.json", sched)
        if scaler is not None:
            _write_json(tmp / "scaler.json", scaler.state_dict())
        rng_tensors, rng_meta = capture_rng_state()
        _write_safetensors(tmp / "rng.safetensors", rng_tensors)
        _write_json(tmp / "rng.json", rng_meta)
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step), "complete": True,
                 **(extra or {})}
        _check_jsonable(state, "checkpoint extra state")
        _write_json(tmp / STATE_FILE, state)  # written last: its presence marks a complete folder
        # Rename into place (replacing an older folder of the same step, if any).
        old = None
        if final.exists():
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The ``state.json`` dict of checkpoint ``path`` (step, format, extra fields).

    Raises:
        FileNotFoundError: not a complete checkpoint folder.  ValueError: foreign or damaged state.json.
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; {path} is not a complete mbldm checkpoint")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file}: not an mbldm checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION or not isinstance(state.get("step"), int):
        raise ValueError(f"{file}: unsupported checkpoint version {state.get('version')!r} or missing step")
    return state


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from checkpoint {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from checkpoint {path.parent}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load checkpoint ``path`` (written by :func:`save_checkpoint`) into the given live objects, in place.

    Tensors are copied into the existing parameters / EMA buffers (their devices are kept); the optimizer state
    is moved to the parameters' devices by ``optimizer.load_state_dict``.
    Returns:
        The state.json dict (``"step"`` and the ``extra`` fields given at save time).
    Raises:
        FileNotFoundError: a missing file.  ValueError: damaged files or a model of another architecture (the
        message names the file).
    """
    path = Path(path)
    state = read_checkpoint_state(path)
    weights = _read_safetensors(path / "model.safetensors")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path / 'model.safetensors'}: does not match the model ({exc})") from None
    if ema is not None:
        shadow = _read_safetensors(path / "ema.safetensors")
        names = _ema_names(model)
        if sorted(shadow) != sorted(names):
            raise ValueError(f"{path / 'ema.safetensors'}: parameter names do not match the model")
        ema.load_state_dict(_read_json(path / "ema.json"))
        with torch.no_grad():
            for name, buf in zip(names, ema.shadow_params):
                buf.copy_(shadow[name])
    opt = optimizer_state_from_flat(_read_safetensors(path / "optimizer.safetensors"),
                                    _read_json(path / "optimizer.json"))
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path / 'optimizer.json'}: does not match the optimizer ({exc})") from None
    lr_scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    if scaler is not None and (path / "scaler.json").is_file():
        scaler.load_state_dict(_read_json(path / "scaler.json"))
    if restore_rng:
        restore_rng_state(_read_safetensors(path / "rng.safetensors"), _read_json(path / "rng.json"))
    return state
