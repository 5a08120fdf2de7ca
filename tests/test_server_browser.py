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
    yield from _serve(create_app(ServerConfig(data_dir=tmp_path_factory.mktemp("serve"))))


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


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """What ``retclip serve`` with no options runs: the toy backbone, the regions proposer and
    the toy-world database it builds on first start, selected by default."""
    from retclip.backbones import load_backbone
    from retclip.toyworld.demo import SERVE_DATABASE, ensure_serve_database

    data_dir = tmp_path_factory.mktemp("demo-serve")
    ensure_serve_database(data_dir, load_backbone("toy"), n=80, progress=False)
    config = ServerConfig(data_dir=data_dir, default_database=SERVE_DATABASE)
    yield from _serve(create_app(config))


def _serve(app: object) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=30)


def test_the_first_page_shows_clip_retrieval_and_retclip_and_the_evidence(
    demo_server: str, tmp_path: Path
) -> None:
    """A new user's first segmentation: the toy-world database is chosen, three views compare
    the paths, the result is shown large with labels that leave the segments visible, and a
    click on a segment lists the database rows behind its retrieval score."""
    import json
    import os

    scene = generate_scenes("val", 1, seed=11)[0]
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(png(scene.image))
    labels = set(json.loads(httpx.get(f"{demo_server}/databases/toyworld", timeout=10).text)
                 ["rows_per_class"])  # fmt: skip
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(demo_server)
            page.wait_for_function("document.body.dataset.ready === '1'")
            assert page.locator("#db").input_value() == "toyworld"
            assert page.locator("#vocab").input_value() == "db"
            page.set_input_files("#image-input", str(image_path))
            page.click("#segment-btn")
            page.wait_for_selector("#overlay[data-result-id]")
            page.wait_for_function("document.body.dataset.busy === ''")
            # the comparison: three views of the same masks
            captions = page.locator("#compare figcaption strong").all_inner_texts()
            assert [c.split(" (")[0] for c in captions] == [
                "CLIP only",
                "retrieval only",
                "RetCLIP",
            ]
            # large enough to read: the 96-pixel scene is scaled up, labels are small
            width = page.locator("#overlay").evaluate("img => img.getBoundingClientRect().width")
            assert page.locator("#overlay").evaluate("img => img.naturalWidth") == 96
            assert width >= 480
            label_area = page.locator("#labels span").evaluate_all(
                "spans => spans.reduce((a, s) => a + s.offsetWidth * s.offsetHeight, 0)"
            )
            assert 0 < label_area < 0.25 * width * width
            # the class under the pointer, next to the pointer
            box = page.locator("#overlay").bounding_box()
            assert box is not None
            result = page.evaluate("state.segments")
            target = max(result, key=lambda s: s["area"])
            x, y = target["label_point"]
            at = (
                box["x"] + (x + 0.5) / 96 * box["width"],
                box["y"] + (y + 0.5) / 96 * box["height"],
            )
            page.mouse.move(*at)
            tooltip = page.locator("#tooltip")
            assert tooltip.is_visible() and tooltip.inner_text().startswith(target["category_name"])
            # the evidence behind s_ret for the clicked segment
            page.mouse.click(*at)
            page.wait_for_selector("#segment-panel:not([hidden])")
            assert page.locator("#segment-panel").get_attribute("data-segment") == str(target["id"])
            names = page.locator("#neighbours .neighbour-label").all_inner_texts()
            sims = [float(v) for v in page.locator(".neighbour-similarity").all_inner_texts()]
            assert names and set(names) <= labels
            assert sims == sorted(sims, reverse=True)
            assert [n["label"] for n in target["neighbours"]] == names
            screenshot = os.environ.get("RETCLIP_SCREENSHOT")
            if screenshot:  # docs/images/serve.png is made this way
                page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
