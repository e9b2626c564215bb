"""Tests of mbldm/cli/__init__.py (and the help / error conventions of every command module): ``--threads`` /
MBLDM_THREADS, help text without reST markup and with a help string for every option, the one-line error format
(command named once, CLI wording for --overwrite), up-front --device validation, ``latents info`` wording."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

import mbldm.cli as cli
from mbldm.cli import build_parser, error_text, main, plain_text


def _parsers(parser: argparse.ArgumentParser, path: str = "mbldm"):
    """(command path, parser) for ``parser`` and every sub-parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def restore_threads(monkeypatch):
    """Undo what --threads does to this test process: torch's pool, threadpoolctl's limits, the env variables."""
    for var in cli._THREAD_ENV_VARS:  # records the original value (or absence); restored at teardown
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.delenv(cli.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # so that a --threads that did nothing would be seen
    yield
    torch.set_num_threads(before)
    if cli._thread_limits is not None:
        cli._thread_limits.restore_original_limits()
        cli._thread_limits = None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete latent store of 3 random 16 x 16 images (VQ-4-4-4, s = 4): one shard."""
    from mbldm.codec import Codec
    from mbldm.data.latent_store import build_latent_store
    from mbldm.io.images import save_png

    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, im in enumerate(images):
        save_png(root / "imgs" / f"{i}.png", im)
    Codec.fit(images, spec="VQ-4-4-4", patch_size=4, progress=False).save(root / "codec")
    return build_latent_store(root / "codec", root / "imgs", 16, root / "latents", progress=False)


# ------------------------------------------------------------------------------------------------ --threads
def test_threads_flag_limits_torch_and_blas(store, restore_threads, capsys):
    from threadpoolctl import threadpool_info

    assert main(["--threads", "1", "latents", "info", str(store)]) == 0
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    pools = threadpool_info()
    assert pools and all(p["num_threads"] == 1 for p in pools), pools
    assert "3 latents" in capsys.readouterr().out


def test_threads_from_environment(store, restore_threads, monkeypatch, capsys):
    monkeypatch.setenv(cli.THREADS_ENV, "2")
    assert main(["latents", "info", str(store)]) == 0
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(cli.THREADS_ENV, "many")
    assert main(["latents", "info", str(store)]) == 2
    assert _one_error_line(capsys) == ("mbldm latents: error: MBLDM_THREADS='many': expected a positive integer "
                                       "(the default of --threads)")


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "latents", "info", "x"])
    assert exc.value.code == 2
    assert "--threads: expected a positive integer, got '0'" in capsys.readouterr().err


def test_demo_threads_flag_wins_over_top_level(restore_threads, monkeypatch, tmp_path):
    import mbldm.demo.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_demo", lambda config: seen.append(config.threads))
    assert main(["--threads", "1", "demo", "--out", str(tmp_path / "a")]) == 0
    assert main(["--threads", "1", "demo", "--threads", "2", "--out", str(tmp_path / "b")]) == 0
    assert main(["demo", "--out", str(tmp_path / "c")]) == 0
    assert seen == [1, 2, None]  # None: the demo picks the free cores itself


# ------------------------------------------------------------------------------------------------ help text
def test_plain_text_removes_rest_markup():
    assert plain_text("``mbldm train`` (see :mod:`mbldm.distributed`, :func:`~mbldm.dry_run.dry_run`, "
                      ":class:`a.B`, :meth:`B.m`, :attr:`x`, :data:`D`)") == (
        "`mbldm train` (see `mbldm.distributed`, `dry_run`, `a.B`, `B.m`, `x`, `D`)")


def test_no_rest_markup_in_any_help():
    names = []
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        names.append(path)
        assert "``" not in text, path
        for role in (":mod:", ":func:", ":class:", ":meth:", ":attr:", ":data:"):
            assert role not in text, (path, role)
    assert {"mbldm train", "mbldm codec fit", "mbldm latents build", "mbldm demo"} <= set(names)


def test_every_option_has_help_and_every_command_a_description():
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert isinstance(action.help, str) and action.help.strip(), (path, action.option_strings or action.dest)
        if path.count(" ") >= 1:
            assert parser.description and parser.description.strip(), path


def test_codec_fit_help_names_the_defaults():
    fit = dict(_parsers(build_parser()))["mbldm codec fit"]
    text = " ".join(fit.format_help().split())
    assert "default: all patches" in text and "seed of the --max-patches subset" in text
    assert "codebooks.safetensors" in text  # the description says what it writes


def test_train_preset_help_lists_every_denoiser_preset():
    from mbldm.cli.train import PRESET_SIZES
    from mbldm.diffusion.models import UNET_PRESETS, build_unet, count_parameters

    assert set(PRESET_SIZES) == set(UNET_PRESETS) - {"refiner"}
    for name in ("small", "cpu"):  # the listed sizes are the continuous OPQ-32-8-8 U-Net's (12 -> 6 channels)
        millions = count_parameters(build_unet(name, 12, 6, 16)) / 1e6
        assert PRESET_SIZES[name] == f"{millions:.1f}M"
    text = " ".join(dict(_parsers(build_parser()))["mbldm train"].format_help().split())
    assert "paper (48.5M, §4.2.1), small (4.2M), cpu (1.1M), tiny (0.17M, tests only)" in text
    assert "§3.2.2" in text and "§4.2.3" not in text


# ------------------------------------------------------------------------------------------------ errors
def test_error_text_names_the_command_once_and_speaks_cli():
    assert error_text("demo", ValueError("demo: --minutes must be positive")) == "--minutes must be positive"
    assert error_text("train", ValueError("dry run: x")) == "dry run: x"
    assert error_text("codec", FileExistsError("f: already exists (pass overwrite=True / --overwrite)")) == (
        "f: already exists (use --overwrite)")
    assert error_text("sample", FileExistsError("d: exists; pass overwrite=True (--overwrite) to write")) == (
        "d: exists; use --overwrite to write")
    assert error_text("latents", ValueError("s: incomplete; re-run with overwrite=True to start over")) == (
        "s: incomplete; re-run with --overwrite to start over")
    assert error_text("codec", ValueError("a\n  b")) == "a b"


def test_demo_error_through_main(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "new"), "--minutes", "-1"]) == 2
    assert _one_error_line(capsys) == "mbldm demo: error: --minutes must be a positive number, got -1.0"


def test_overwrite_hint_through_main(tmp_path, capsys):
    existing = tmp_path / "t.json"
    existing.write_text("{}")
    rc = main(["codec", "bench", "--codec", str(tmp_path / "c"), "--images", str(tmp_path), "--json", str(existing)])
    assert rc == 2
    assert _one_error_line(capsys) == f"mbldm codec: error: {existing}: already exists (use --overwrite)"


# ------------------------------------------------------------------------------------------------ --device
@pytest.mark.parametrize("command", [
    ["sample", "--run", "RUN", "--num", "1", "--out", "OUT", "--device", "cuda"],
    ["fid", "--real", "A", "--fake", "B", "--device", "cuda:1"],
    ["refiner", "train", "--codec", "C", "--data", "D", "--out", "R", "--device", "cuda"],
    ["refiner", "apply", "--refiner", "R", "--out", "OUT", "IMG", "--device", "cuda:0"],
])
def test_cuda_device_without_cuda_is_one_line(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    device = command[command.index("--device") + 1]
    name = command[0]
    assert _one_error_line(capsys) == (
        f"mbldm {name}: error: --device {device}: CUDA is not available in this torch build/machine "
        f"(torch {torch.__version__}); use --device cpu")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_check_device_accepts_cpu_and_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in (None, "cpu", torch.device("cpu")):
        cli.check_device(device)
    with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available"):
        cli.check_device(torch.device("cuda:0"))


# ------------------------------------------------------------------------------------------------ latents
def test_latents_info_singular_shard(store, capsys):
    assert main(["latents", "info", str(store)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(", 1 shard of 1024, complete") and "3 latents 4x4x3 uint8" in line


def test_latents_build_progress_label(store, tmp_path, capsys):
    codec = store.parent / "codec"
    data = store.parent / "imgs"
    assert main(["latents", "build", "--codec", str(codec), "--data", str(data), "--resolution", "16",
                 "--out", str(tmp_path / "latents")]) == 0
    err = capsys.readouterr().err
    assert "encoding latents:" in err and "latents latents" not in err
