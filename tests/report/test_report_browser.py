"""The HTML report in a real headless Chromium: it renders, logs no errors, makes no requests, shows its plots.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON messages on file
descriptors 3 and 4), so no websocket package or network port is needed.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pytest

from browser import CHROMIUM, Browser, open_page  # noqa: F401
from report_helpers import real_run

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Chromium is not installed (Debian package `chromium`)")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = real_run(tmp_path_factory)
    return open_page(run_dir / "report.html", tmp_path_factory.mktemp("chromium-profile"))


def test_renders_without_console_errors(page: dict[str, Any]) -> None:
    assert page["errors"] == []


def test_makes_no_request_but_the_page_itself(page: dict[str, Any]) -> None:
    # data: URIs are decoded in the renderer and may or may not show up as requests; nothing else may
    others = [u for u in page["requests"] if u != page["url"] and not u.startswith("data:")]
    assert others == []
    assert page["url"] in page["requests"]


def test_plots_are_visible(page: dict[str, Any]) -> None:
    from PIL import Image

    assert len(page["images"]) == 4
    for complete, natural_width, shown_width in page["images"]:
        assert complete and natural_width > 300 and shown_width > 300
    img = Image.open(io.BytesIO(page["png"])).convert("RGB")
    assert img.size == (1280, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 500, "the screenshot looks blank"
    # the page is not one flat colour from top to bottom: every 600-px band has content
    for top in range(0, 2400, 600):
        band = img.crop((0, top, 1280, top + 600)).getcolors(maxcolors=1 << 20)
        assert band is not None and len(band) > 50, f"band at {top}px is blank"
