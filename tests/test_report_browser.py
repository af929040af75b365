"""The HTML report as a reader sees it: rendered by headless Chromium, on the plain install's layout
(no Graphviz), both pictures of a transformer block are on the page with their marked boxes drawn
at a readable size (not shrunk to fit a picture thousands of pixels wide, not off to one side)."""
import shutil
import subprocess

import pytest
import torch

import fxfuse
from fxfuse import report_html
from fxfuse.demo import NaiveTransformer

Image = pytest.importorskip("PIL.Image", reason="Pillow (from the test extra's matplotlib) reads the screenshot")
np = pytest.importorskip("numpy", reason="numpy (from the test extra's matplotlib) reads the screenshot")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install "
                                "chromium): the page is checked in a real browser only where there is one")

WIDTH, HEIGHT = 1340, 6000
MIN_BOX_PX = 40  # a box drawn narrower than this holds text too small to read


def _screenshot(page, tmp_path):
    html, png = tmp_path / "report.html", tmp_path / "shot.png"
    html.write_text(page, encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
             f"--screenshot={png}"]
    subprocess.run([CHROMIUM, *flags, html.as_uri()], capture_output=True, timeout=120, check=True)
    return Image.open(png).convert("RGB")


def _has_box(image, colour: str) -> bool:
    """Whether some row holds ``MIN_BOX_PX`` pixels of exactly ``colour`` in a row (a box's fill
    above its text; the fill is exact inside a box however the picture is scaled)."""
    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    same = (np.asarray(image) == want).all(axis=2)
    run = same[:, : same.shape[1] - MIN_BOX_PX + 1].copy()
    for k in range(1, MIN_BOX_PX):
        run &= same[:, k: same.shape[1] - MIN_BOX_PX + 1 + k]
    return bool(run.any())


def test_both_graph_pictures_are_readable_in_a_browser(tmp_path):
    torch.manual_seed(0)
    model, x = NaiveTransformer(layers=1), torch.randn(2, 8, 64)
    res = fxfuse.rewrite(model, (x,))
    page = res.report_data.html(renderer="layered")  # the plain install's drawing
    assert page.index('id="graphs"') < page.index('id="kernels"')  # pictures before the long listings
    # The legend shows the two colours too: hidden here, so that only the pictures' boxes count.
    page = page.replace('<p class="legend">', '<p class="legend" style="display: none">')
    shot = _screenshot(page, tmp_path)
    assert shot.size == (WIDTH, HEIGHT)
    # The replaced ops (before) and the fused operators (after) are on the page at a readable scale.
    assert _has_box(shot, report_html.FILL[report_html.REPLACED])
    assert _has_box(shot, report_html.FILL[report_html.FUSED])
