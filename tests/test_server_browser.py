"""The web page in a real browser: Playwright driving Debian's chromium against the server."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from retclip.server import ServerConfig, create_app
from retclip.toyworld.world import generate_scenes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the python package 'playwright' is not installed"
)
uvicorn = pytest.importorskip("uvicorn", reason="the python package 'uvicorn' is not installed")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)"
)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A uvicorn server on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ServerConfig(data_dir=tmp_path_factory.mktemp("serve")))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not instance.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield url
    instance.should_exit = True
    thread.join(timeout=30)


def counters(url: str) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(f"{url}/health", timeout=10).json()["counters"]
    return counts


def legend(page: object) -> set[str]:
    labels = page.locator("#legend .legend-label").all_inner_texts()  # type: ignore[attr-defined]
    return set(labels)


def test_page_segments_and_rescores_without_a_model_run(server: str, tmp_path: Path) -> None:
    scenes = generate_scenes("val", 3, seed=5)
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(png(scenes[0].image))
    # A database that knows only hexagons: retrieval alone labels every segment a hexagon.
    files = [("images", (f"{i}.png", png(s.image))) for i, s in enumerate(scenes[1:])]
    added = httpx.post(
        f"{server}/databases/hexagons/rows", files=files, data={"labels": "hexagon"}, timeout=60
    )
    assert added.status_code == 200, added.text

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server)
            page.wait_for_selector("#db option[value=hexagons]", state="attached")
            page.set_input_files("#image-input", str(image_path))
            # hexagon first: labels that retrieval ties with it (similar text) resolve to it
            page.fill("#classes", "hexagon, circle, square, star, triangle, stripes, dots")
            page.select_option("#db", "hexagons")
            page.fill("#gamma", "0")  # CLIP only
            page.click("#segment-btn")
            page.wait_for_selector("#overlay[data-result-id]")
            page.wait_for_function("document.body.dataset.busy === ''")
            clip_only = legend(page)
            assert clip_only and clip_only != {"hexagon"}
            assert page.locator("#overlay").evaluate("img => img.naturalWidth") == 96
            page.wait_for_function("document.querySelector('#panoptic').width === 96")
            page.hover("#overlay")
            hovered = page.locator("#hover-label").inner_text()
            assert hovered.split(" (")[0] in clip_only | {"void"}
            runs = counters(server)

            page.fill("#gamma", "1")  # retrieval only: moves the slider, fires 'input'
            page.wait_for_function("document.body.dataset.rescores === '1'")
            page.wait_for_function("document.body.dataset.busy === ''")
            assert legend(page) == {"hexagon"}
            assert page.locator("#mode-ret").is_checked()

            page.check("#mode-clip")
            page.wait_for_function("document.body.dataset.rescores === '2'")
            page.wait_for_function("document.body.dataset.busy === ''")
            assert legend(page) == clip_only
            after = counters(server)
            assert after["segmented_images"] == runs["segmented_images"]
            assert after["backbone_passes"] == runs["backbone_passes"]
            assert after["rescored"] == runs["rescored"] + 2
        finally:
            browser.close()
