"""Tests of mbldm/demo: bundled photos, the time budget, Fig. 3 helpers, the report, the CLI and a tiny end-to-end
run of ``run_demo`` (bundled photos, PQ-16-8-8 codec, 32x32 images, a few steps of everything)."""
from __future__ import annotations

import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbldm.demo import pipeline
from mbldm.demo.figures import shift_indices
from mbldm.demo.report import render_report, write_report
from mbldm.demo.sample_images import find_bundled_photos, write_bundled_photos


# ------------------------------------------------------------------------------------------------ bundled photos
def test_bundled_photos_are_the_package_files(tmp_path):
    import skimage.data

    photos = {p.name: p for p in find_bundled_photos()}
    astronaut = Path(os.path.dirname(skimage.data.__file__)) / "astronaut.png"
    assert photos["astronaut"].path == astronaut.resolve()
    assert photos["astronaut"].role == "fit"
    assert {p.role for p in photos.values()} <= {"fit", "heldout"}
    written = write_bundled_photos(tmp_path, max_side=64)
    assert len(written) == len(photos)
    for photo, path in written:
        assert path == tmp_path / photo.role / f"{photo.name}.png"
        with Image.open(photo.path) as original, Image.open(path) as small:
            assert small.mode == "RGB"
            assert max(small.size) == 64
            # aspect ratio kept up to the rounding of the short side
            W, H = original.size
            assert abs(small.size[0] / small.size[1] - W / H) < 2 / min(small.size)


# ------------------------------------------------------------------------------------------------ pure helpers
def test_plan_budget_by_hand():
    plan = pipeline.plan_budget(600.0, variants=("continuous",), num_samples=64, preset="tiny", latent_side=8,
                                sample_steps=50, fid=False)
    # reserve = 64 * 0.15 (sampling) + 10 (trajectory) + 64 * 1.0 (refiner on 64x64) + 20 (report)
    #           + 15 (refiner eval) = 118.6; free = 481.4
    assert plan["reserve_s"] == pytest.approx(118.6)
    assert plan["refiner_s"] == pytest.approx(0.12 * 481.4)
    assert plan["train_s"]["continuous"] == pytest.approx(481.4 * 0.88)
    assert plan["over_budget"] is False

    both = pipeline.plan_budget(2000.0, variants=("continuous", "categorical"), num_samples=200, preset="small",
                                latent_side=16, sample_steps=25, fid=True)
    per_image = 0.45 * 4 * 0.5  # (16/8)^2, 25/50 steps
    sampling = 200 * per_image * (1 + 2.0) + 2 * 10 + 200 * 1.0 * (128 / 64) ** 2
    fid = (30 + 0.6 * 200) * 2 + 0.6 * 200  # real images once, each variant's samples + fixed cost
    reserve = sampling + fid + 20 + 15
    assert both["reserve_s"] == pytest.approx(reserve)
    free = 2000 - reserve
    assert free > 0
    assert both["refiner_s"] == pytest.approx(max(15, 0.12 * free))
    assert both["train_s"]["categorical"] == pytest.approx(max(60, free - max(15, 0.12 * free)) / 2)
    assert both["train_s"]["continuous"] == both["train_s"]["categorical"]

    tight = pipeline.plan_budget(10.0, variants=("continuous",), num_samples=64, preset="tiny", latent_side=8,
                                 sample_steps=50, fid=False)
    assert tight["over_budget"] is True
    assert tight["train_s"]["continuous"] == pipeline.MIN_TRAIN_S
    assert tight["refiner_s"] == pipeline.MIN_REFINER_S


def test_resolved_choices_by_minutes():
    from mbldm.diffusion.models import UNET_PRESETS

    cpu = "cpu" if "cpu" in UNET_PRESETS else "tiny"
    ten = pipeline.DemoConfig(minutes=10).resolved()
    assert (ten.resolution, ten.preset, ten.num_samples) == (64, cpu, 64)
    twenty = pipeline.DemoConfig(minutes=20).resolved()
    assert (twenty.resolution, twenty.preset, twenty.num_samples) == (64, cpu, 200)
    assert twenty.num_samples >= pipeline.FID_MIN_SAMPLES  # --minutes 20 produces an FID
    hour = pipeline.DemoConfig(minutes=60).resolved()
    assert (hour.resolution, hour.preset, hour.num_samples) == (128, "small", 600)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipeline.DemoConfig(resolution=40, preset="tiny").resolved()
    with pytest.raises(ValueError, match="--minutes"):
        pipeline.DemoConfig(minutes=0).resolved()
    with pytest.raises(ValueError, match="--variant"):
        pipeline.DemoConfig(variant="categorical").resolved()


def test_shift_indices_clamps_per_channel():
    z = np.array([[[0, 15], [254, 3]], [[255, 15], [7, 0]]], dtype=np.uint8)  # (2, 2, c=2)
    k = np.array([256, 16])
    expected = np.array([[[1, 15], [255, 4]], [[255, 15], [8, 1]]], dtype=np.uint8)
    out = shift_indices(z, k)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_collect_samples_leaves_out_grid_and_raw(tmp_path):
    src = tmp_path / "samples"
    for rel in ("img_000000.png", "img_000001.png", "grid.png", "raw/img_000000.png", "trajectory/img_000000_xt.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(src / rel)
    got = pipeline.collect_samples(src, tmp_path / "fake")
    assert sorted(p.name for p in (tmp_path / "fake").rglob("*")) == ["img_000000.png", "img_000001.png"]
    assert got == [tmp_path / "fake" / "img_000000.png", tmp_path / "fake" / "img_000001.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no img_"):
        pipeline.collect_samples(tmp_path / "empty", tmp_path / "x")


def test_demo_command_round_trips_through_the_cli():
    from mbldm.cli import build_parser

    cfg = pipeline.DemoConfig(out="a dir/x", minutes=5, variant="both", seed=3, overwrite=True)
    cmd = pipeline.demo_command(cfg)
    assert cmd == "mbldm demo --out 'a dir/x' --minutes 5 --variant both --seed 3 --overwrite"
    import shlex

    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.out, args.minutes, args.variant, args.seed, args.overwrite, args.data) == (
        "a dir/x", 5.0, "both", 3, True, None)


# ------------------------------------------------------------------------------------------------ report
class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.scripts, self.text = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def test_report_escapes_run_text(tmp_path):
    summary = {"command": "mbldm demo --out '<script>alert(1)</script>' & more", "steps": [
        {"title": "t <b>", "seconds": 1.0, "summary": "a < b", "commands": ["echo \"x\" > y"]}], "figures": {}}
    page = render_report(summary)
    parser = _Collect()
    parser.feed(page)
    assert parser.scripts == 0
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "mbldm demo --out '<script>alert(1)</script>' & more" in "".join(parser.text)
    summary["figures"]["loss"] = "report_files/missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(summary, tmp_path)


# ------------------------------------------------------------------------------------------------ CLI errors
def test_cli_refuses_a_non_empty_out_in_one_line(tmp_path, capsys):
    from mbldm.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert main(["demo", "--out", str(tmp_path / "new"), "--minutes", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--minutes" in err[0]
    assert not (tmp_path / "new").exists()  # nothing created on a bad flag
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "unrelated.txt").write_text("kept")
    cfg = pipeline.DemoConfig(
        out=str(out), overwrite=True, minutes=5, spec="PQ-16-8-8", resolution=32, preset="tiny", seed=1,
        variant="both",
        threads=1, progress=False, num_samples=3, sample_steps=2, max_patches=3000, num_crops=8,
        photo_max_side=64, train_steps=2, refiner_steps=1, batch_size=4, refiner_batch_size=2)
    report = pipeline.run_demo(cfg)
    return out, report, json.loads((out / "demo.json").read_text())


def test_demo_writes_a_report_with_existing_images(tiny_demo):
    out, report, summary = tiny_demo
    assert report == out / "report.html"
    parser = _Collect()
    parser.feed(report.read_text(encoding="utf-8"))
    # comparison, ordering, loss, 2 trajectories, 2 grids, the raw (unrefined) continuous grid
    assert len(parser.srcs) == 8
    for src in parser.srcs:
        assert not os.path.isabs(src) and (out / src).is_file(), src
    assert "demo.json" in parser.hrefs
    grid = np.asarray(Image.open(out / summary["figures"]["grid_continuous"]).convert("RGB"))
    assert grid.shape[0] > 32 and grid.std() > 0  # a real grid of 3 samples, not a blank image
    assert (out / "unrelated.txt").read_text() == "kept"  # overwrite removes only the demo's entries
    assert [s["name"] for s in summary["steps"]] == ["data", "codec", "bench", "ordering", "latents",
                                                      "train_continuous", "train_categorical", "refiner", "samples",
                                                      "fid", "report"]
    assert summary["hidden_settings"]["train_steps"] == 2  # knobs without a flag are listed
    assert all(s["summary"] for s in summary["steps"])


def test_demo_numbers(tiny_demo):
    out, _, summary = tiny_demo
    # bench: our bit rate over the original pixels of each held-out PNG, by hand (PQ-16-8-8: 32 bits per 8x8)
    for row in summary["bench"]["images"]:
        with Image.open(out / "data" / "heldout" / f"{row['name']}.png") as im:
            W, H = im.size
        assert row["bpp"] == pytest.approx(32 * math.ceil(H / 8) * math.ceil(W / 8) / (H * W))
        assert row["jpeg"]["bpp"] >= row["bpp"] or row["jpeg"]["quality"] == 100
        assert math.isfinite(row["psnr_db"]) and row["psnr_db"] > 10
    # Fig. 3: the PCA ordering makes neighbouring indices similar codewords
    o = summary["ordering"]
    assert o["ordinality"]["ordered"] < o["ordinality"]["unordered"]
    assert o["psnr"]["shift_ordered"] > o["psnr"]["shift_unordered"]
    assert summary["latents"]["latent_shape"] == [4, 4, 4] and summary["latents"]["count"] == 8
    assert summary["train_continuous"]["steps_done"] == 2
    assert summary["train_categorical"]["steps_done"] == 2
    assert summary["samples"]["categorical"]["count"] == 3 and not summary["samples"]["categorical"]["refiner"]
    assert summary["refiner"]["steps_done"] == 1
    assert summary["samples"]["continuous"]["count"] == 3
    assert summary["samples"]["continuous"]["trajectory_t"][0] == 1000
    assert summary["samples"]["continuous"]["trajectory_t"][-1] == 0
    assert "skipped" in summary["fid"]  # 3 samples < fid_min_samples
    # the run folder can be sampled again later
    for rel in ("run/config.json", "run/codec/config.json", "run/model/config.json", "refiner/config.json"):
        assert (out / rel).is_file(), rel
    cmds = [c for s in summary["steps"] for c in s["commands"]]
    assert any(c.startswith("mbldm train ") and "--steps 2 " in c for c in cmds)
    assert any(c.startswith("mbldm sample --run ") for c in cmds)


def test_copy_files_names_the_original_of_a_broken_image(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "sub" / "ok.png")
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    copied = pipeline._copy_files([src / "sub" / "ok.png"], src, tmp_path / "dest")
    assert copied == [tmp_path / "dest" / "sub__ok.png"]
    assert copied[0].read_bytes() == (src / "sub" / "ok.png").read_bytes()
    with pytest.raises(ValueError, match=str(src / "broken.jpg")):
        pipeline._copy_files([src / "broken.jpg"], src, tmp_path / "dest")
    assert not (tmp_path / "dest" / "broken.jpg").exists()
