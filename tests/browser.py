"""A real headless browser for tests: Debian's chromium driven by Playwright.

    from tests.browser import chromium_page

    def test_page(tmp_path):
        with chromium_page() as page:      # skips the test when no browser can run here
            page.goto(path.as_uri())
            ...

A screenshot of a page for the docs (a full-page PNG, reduced to a palette so that it stays small):

    python -m tests.browser runs/demo/report.html docs/report.png --width 1200

The system chromium (`apt-get install -y chromium`; `.ci/run` installs it when missing) is used rather than
Playwright's own download, so the tests need no network. The test is skipped, naming how to install what
is missing, only when Playwright or the chromium binary is absent; a browser that is present but fails to
start is an error, not a skip.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: where Debian's package puts the browser, when it is not on PATH
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: flags for a headless browser in a container: no sandbox (root), no /dev/shm limits, no GPU, no network
#: chatter of its own (the pages under test must load from what they hold)
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
INSTALL_HINT = "install it with `apt-get install -y chromium` (`.ci/run` does when missing)"


def chromium_path() -> str | None:
    """The chromium binary to drive, or None when there is none."""
    found = os.environ.get("DP2O_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return DEFAULT_CHROMIUM if os.access(DEFAULT_CHROMIUM, os.X_OK) else None


@contextmanager
def chromium_page(width: int = 1200, height: int = 900) -> Iterator:
    """A Playwright page of a headless system chromium, `width` x `height` CSS pixels; the calling test is
    skipped (with the reason and the fix) when Playwright or chromium is not installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]' (it is in the dev extras)")
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"no chromium browser found for the browser test; {INSTALL_HINT}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def screenshot(html: Path, png: Path, *, width: int = 1200, colors: int = 256) -> int:
    """A full-page screenshot of the local page `html`, `width` CSS pixels wide, written to `png` as a palette
    PNG of at most `colors` colours; returns its size in bytes."""
    from PIL import Image

    with chromium_page(width=width) as page:
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_load_state("load")
        shot = page.screenshot(full_page=True)
    img = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    img.save(png, format="PNG", optimize=True)
    return Path(png).stat().st_size


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="full-page screenshot of a local HTML file")
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--colors", type=int, default=256)
    a = ap.parse_args()
    size = screenshot(a.html, a.png, width=a.width, colors=a.colors)
    print(f"{a.png}: {size} bytes")
    sys.exit(0)
