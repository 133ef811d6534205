"""The playground page in a real Chromium against the served app: load, paint, submit, see four."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.client.client_support import TOKEN, LiveServer

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _ensure_chromium() -> None:
    """Install Debian's chromium when it is missing; skip (saying why) only if that fails."""
    if Path(CHROMIUM).exists():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install it")
    try:
        subprocess.run(
            [apt, "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=600
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install chromium` failed: {exc}")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"`apt-get install chromium` ran but {CHROMIUM} is still missing")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # A laptop-sized window: the page must work without scrolling sideways.
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A resource or script the Content-Security-Policy blocks is reported on the console.
    page.on("console", lambda msg: errors.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def picture(path: Path) -> Path:
    """A 320x200 scene with a sun and a house: big enough to paint on, small enough to be quick."""
    image = Image.new("RGB", (320, 200), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 150, 320, 200), fill=(80, 160, 70))
    draw.ellipse((240, 20, 290, 70), fill=(250, 210, 40))
    draw.rectangle((60, 90, 150, 160), fill=(190, 90, 60))
    draw.polygon([(50, 90), (105, 45), (160, 90)], fill=(120, 50, 40))
    image.save(path)
    return path


def decode_uri(uri: str) -> Image.Image:
    head, payload = uri.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_paint_submit_and_see_four_variants(
    live_server: LiveServer, page: Any, tmp_path: Path
) -> None:
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: (
            sent.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/midjourney/edits")
            else None
        ),
    )
    page.goto(f"{live_server.url}/")
    assert page.title() == "openedits playground"

    page.fill("#token", TOKEN)
    page.click("#save-token")
    assert page.evaluate("localStorage.getItem('openedits.token')") == TOKEN

    page.set_input_files("#file-input", str(picture(tmp_path / "scene.png")))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert "320×200" in page.inner_text("#image-info")

    # Paint a stroke across the sun (right part of the picture).
    box = page.locator("#mask").bounding_box()
    sx, sy = box["width"] / 320, box["height"] / 200
    page.mouse.move(box["x"] + 235 * sx, box["y"] + 45 * sy)
    page.mouse.down()
    for x in range(235, 300, 5):
        page.mouse.move(box["x"] + x * sx, box["y"] + 45 * sy)
    page.mouse.up()

    page.fill("#prompt", "clear sky without the sun")
    page.select_option("#mode", "turbo")
    page.click("#submit")
    # Predicates as functions, not strings: the page's CSP forbids eval, which a string needs.
    page.wait_for_function(
        "() => document.querySelectorAll('#variants img').length === 4 && "
        "[...document.querySelectorAll('#variants img, #grid')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000,
    )
    assert page.locator("#error").is_hidden()
    assert "Done" in page.inner_text("#status")
    links = page.locator("#variants a.download")
    assert links.count() == 4 and links.first.get_attribute("href").endswith("/0_0.png")

    # What went up: the file as a data URI and a black/white PNG mask of the image's size,
    # white exactly around the stroke.
    [body] = sent
    assert body["async"] is True and body["split_images"] is True and body["mode"] == "turbo"
    assert body["image_url"].startswith("data:image/png;base64,")
    with decode_uri(body["mask"]) as mask:
        assert mask.size == (320, 200)
        gray = mask.convert("L")
        assert {value for _, value in gray.getcolors()} <= {0, 255}
        assert gray.getpixel((265, 45)) == 255 and gray.getpixel((100, 120)) == 0

    page.wait_for_selector("#recent li.succeeded")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_errors_are_readable_lines_from_the_envelope(
    live_server: LiveServer, page: Any, tmp_path: Path
) -> None:
    page.goto(f"{live_server.url}/")
    page.evaluate("localStorage.clear()")
    page.reload()
    page.click("#submit")
    assert "token" in page.inner_text("#error")

    page.fill("#token", "not-a-token")
    page.click("#save-token")
    page.set_input_files("#file-input", str(picture(tmp_path / "scene.png")))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.fill("#prompt", "anything")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert text.startswith("invalid_token:") and "trace" in text

    # With the right token but no mask, the opencv engine's refusal is shown as it came.
    page.fill("#token", TOKEN)
    page.click("#save-token")
    page.click("#mask-clear")
    page.click("#submit")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('mask')")
    assert page.inner_text("#error").startswith("bad_request:")


def test_recent_tasks_load_small_renditions_not_the_grids(
    live_server: LiveServer, page: Any, tmp_path: Path
) -> None:
    import httpx

    from tests.conftest import data_uri
    from tests.engines.contract import make_test_image, make_test_mask

    r = httpx.post(f"{live_server.url}/midjourney/edits", timeout=60,
                   headers={"authorization": f"Bearer {TOKEN}"},
                   json={"image_url": data_uri(make_test_image((96, 64))),
                         "mask": data_uri(make_test_mask((96, 64))), "prompt": "x"})
    assert r.status_code == 200, r.text
    # Stand in for the grid of a 2048 px input: 4096 px of noise is ~40 MB as a PNG; 2048 px
    # (~12 MB) is enough to tell a thumbnail from the file.
    grid = live_server.data_dir / "files" / r.json()["task_id"] / "grid.png"
    Image.effect_noise((2048, 2048), 60).convert("RGB").save(grid)
    full = grid.stat().st_size

    fetched: list[tuple[str, int]] = []
    page.on("response", lambda resp: fetched.append(
        (resp.url, len(resp.body()))) if "/files/" in resp.url else None)
    page.goto(f"{live_server.url}/")
    page.fill("#token", TOKEN)
    page.click("#save-token")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#recent li.succeeded img')]"
        ".some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    page.wait_for_load_state("networkidle")
    total = sum(size for _, size in fetched)
    assert fetched and all("w=128" in url for url, _ in fetched), fetched
    assert total * 50 < full, (total, full)
