"""Tests of mbldm/demo/screenshot.py in a real headless Chromium (skipped where Chromium or Playwright is absent:
install Debian's ``chromium`` package and ``pip install playwright``)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from mbldm.demo.screenshot import find_chromium, main, screenshot_report

pytestmark = [
    pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (Debian package `chromium`)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="Playwright not installed"),
]


def _page(tmp_path, images: list[str]) -> None:
    Image.fromarray(np.full((20, 30, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    tags = "".join(f'<img src="{src}" alt="{src}">' for src in images)
    (tmp_path / "report.html").write_text(f"<!doctype html><html><body style='margin:0;background:#fff'>{tags}"
                                          "</body></html>", encoding="utf-8")


def test_counts_loaded_and_broken_images_and_writes_the_viewport(tmp_path):
    _page(tmp_path, ["red.png", "missing.png", "red.png"])
    result = screenshot_report(tmp_path / "report.html", tmp_path / "shot" / "page.png", width=320, height=200)
    assert (result.images_total, result.images_loaded, result.broken) == (3, 2, ["missing.png"])
    assert not result.ok
    with Image.open(tmp_path / "shot" / "page.png") as shot:
        assert shot.size == (320, 200)  # the viewport at device scale 1
        pixels = np.asarray(shot.convert("RGB"))
    assert tuple(pixels[10, 15]) == (200, 30, 30)  # the first image is drawn at the top-left corner
    assert tuple(pixels[150, 300]) == (255, 255, 255)  # the page background


def test_cli_exit_status(tmp_path, capsys):
    _page(tmp_path, ["red.png"])
    assert main([str(tmp_path / "report.html"), str(tmp_path / "ok.png"), "--width", "200", "--height", "100"]) == 0
    assert "images loaded: 1/1" in capsys.readouterr().out
    _page(tmp_path, ["red.png", "gone.png"])
    assert main([str(tmp_path / "report.html"), str(tmp_path / "bad.png")]) == 1
    assert "broken image: gone.png" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.html"), str(tmp_path / "x.png")]) == 2
