"""The `output_format` / `output_quality` extension: opt-in webp or jpeg result files."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import AUTH, data_uri


def test_png_stays_the_default(client: TestClient, image) -> None:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x", "split_images": True})
    assert r.status_code == 200, r.text
    assert r.json()["image_url"].endswith("/grid.png")
    assert [u.rsplit("/", 1)[1] for u in r.json()["sub_image_urls"]] == [
        "0_0.png", "0_1.png", "0_2.png", "0_3.png"]


@pytest.mark.parametrize(("fmt", "ext", "content_type"),
                         [("webp", "webp", "image/webp"), ("jpeg", "jpg", "image/jpeg")])
def test_webp_and_jpeg_files_keep_their_names(client: TestClient, image, fmt: str, ext: str,
                                              content_type: str) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "prompt": "x", "split_images": True,
        "output_format": fmt, "output_quality": 70})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_url"].endswith(f"/grid.{ext}")
    assert body["sub_image_urls"][3].endswith(f"/0_3.{ext}")
    got = client.get(body["image_url"].split("testserver", 1)[1])
    assert got.status_code == 200 and got.headers["content-type"] == content_type
    with Image.open(io.BytesIO(got.content)) as im:
        assert im.size == (body["image_width"], body["image_height"])


@pytest.mark.parametrize(("extra", "words"), [
    ({"output_format": "gif"}, ["output_format", "'gif'", "png, webp, jpeg"]),
    ({"output_format": "jpeg", "output_quality": 0}, ["output_quality", "0", "1 to 100"]),
    ({"output_format": "webp", "output_quality": "high"}, ["output_quality", "'high'"]),
])
def test_bad_values_are_refused_with_the_field_and_the_rule(client: TestClient, image,
                                                            extra: dict, words: list) -> None:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x", **extra})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, message
