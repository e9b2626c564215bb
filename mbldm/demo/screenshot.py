"""Render a demo ``report.html`` in headless Chromium, check that every image loaded, and save a screenshot.

Uses Playwright (``pip install playwright``) driving a Chromium that is already installed (Debian's ``chromium``
package: ``/usr/bin/chromium``; nothing is downloaded). Run it as::

    python -m mbldm.demo.screenshot OUT/report.html docs/report_screenshot.png [--width 1280] [--full-page]

It prints ``images loaded: 14/14`` and exits 0 when every ``<img>`` of the page decoded (``complete`` and
``naturalWidth > 0``), 1 when one did not (the broken sources are listed), 2 on bad input (missing report, no
Chromium, no Playwright).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Flags for a root, offline, headless Chromium: no sandbox (root), no GPU, and no background connections (this
#: kind of machine refuses them, and Chromium would retry them many at a time).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class RenderResult:
    """What the browser saw: image counts (``<img>`` elements), the broken sources, the page size in CSS pixels."""

    images_total: int
    images_loaded: int
    broken: list[str] = field(default_factory=list)
    page_height: int = 0

    @property
    def ok(self) -> bool:
        return self.images_total > 0 and self.images_loaded == self.images_total


def find_chromium() -> str | None:
    """Path of an installed Chromium / Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot_report(report: str | Path, out_png: str | Path, *, width: int = 1280, height: int = 2000,
                      full_page: bool = False, chromium: str | None = None, timeout_s: float = 60.0) -> RenderResult:
    """Open ``report`` (an HTML file) in headless Chromium, wait for the load event, count images, screenshot.

    Args:
        report: the HTML file (its relative image paths resolve against its folder).
        out_png: the PNG to write (its folder is created).
        width, height: viewport in CSS pixels; the screenshot is the viewport unless ``full_page``.
        full_page: capture the whole scrolled page.
        chromium: executable (default :func:`find_chromium`).
        timeout_s: page-load timeout in seconds.

    Returns:
        :class:`RenderResult`.

    Raises:
        FileNotFoundError: missing report or no Chromium.  ModuleNotFoundError: Playwright not installed.
    """
    from playwright.sync_api import sync_playwright

    report = Path(report).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"{report}: report not found")
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (install Debian's `chromium` package, or pass chromium=PATH)")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": int(width), "height": int(height)})
            page.goto(report.as_uri(), wait_until="load", timeout=timeout_s * 1000)
            facts = page.evaluate(
                """() => {
                    const imgs = Array.from(document.images);
                    const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
                    return {total: imgs.length, bad: bad, height: document.documentElement.scrollHeight};
                }""")
            page.screenshot(path=str(out_png), full_page=full_page)
        finally:
            browser.close()
    return RenderResult(images_total=int(facts["total"]), images_loaded=int(facts["total"]) - len(facts["bad"]),
                        broken=list(facts["bad"]), page_height=int(facts["height"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbldm.demo.screenshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="report.html written by `mbldm demo`")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    parser.add_argument("--height", type=int, default=2000, help="viewport height in CSS pixels (default 2000)")
    parser.add_argument("--full-page", action="store_true", help="capture the whole page, not just the viewport")
    parser.add_argument("--chromium", help="Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    try:
        result = screenshot_report(args.report, args.out, width=args.width, height=args.height,
                                   full_page=args.full_page, chromium=args.chromium)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"images loaded: {result.images_loaded}/{result.images_total}; page height {result.page_height} px; "
          f"screenshot: {args.out}")
    for src in result.broken:
        print(f"broken image: {src}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
