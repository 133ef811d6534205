"""The diffusers engine behind the HTTP API: auto picks it, /healthz names it, edits run."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.engines.diffusers import DiffusersEngine
from openedits.settings import Settings
from tests.conftest import AUTH, TOKEN, data_uri
from tests.engines.contract import make_test_image, make_test_mask

pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.diffusers,
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning"),
]


def test_auto_picks_diffusers_when_the_model_loads(tiny_sd: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, diffusers_model=str(tiny_sd),
                        device="cpu")
    with TestClient(create_app(settings)) as tc:
        engine = tc.get("/healthz").json()["engine"]
    assert engine["name"] == "diffusers"
    assert engine["model"] == str(tiny_sd) and engine["device"] == "cpu" and engine["loaded"]


def test_auto_falls_back_to_opencv_when_the_model_cannot_load(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN,
                        diffusers_model=str(tmp_path / "no-such-model"))
    with TestClient(create_app(settings)) as tc:
        assert tc.get("/healthz").json()["engine"]["name"] == "opencv"


def test_edits_through_the_api_with_and_without_mask(tiny_sd: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN)
    engine = DiffusersEngine(tiny_sd, "cpu", steps=2, work_size="input")
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    with TestClient(create_app(settings, engine=engine)) as tc:
        whole = tc.post("/midjourney/edits", headers=AUTH,
                        json={"image_url": data_uri(image), "prompt": "a red apple"})
        assert whole.status_code == 200, whole.text
        assert (whole.json()["image_width"], whole.json()["image_height"]) == (128, 128)

        masked = tc.post("/midjourney/edits", headers=AUTH, json={
            "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "a red apple",
            "split_images": True, "seed": 5})
        assert masked.status_code == 200, masked.text
        keep = np.asarray(mask) == 0
        record = tc.post("/midjourney/tasks", headers=AUTH,
                         json={"id": masked.json()["task_id"]}).json()
        assert record["seeds"] == [5, 6, 7, 8]
        for url in masked.json()["sub_image_urls"]:
            data = tc.get(url.removeprefix("http://testserver")).content
            variant = np.asarray(Image.open(BytesIO(data)).convert("RGB"))
            assert variant.shape == (64, 64, 3)
            assert np.array_equal(variant[keep], np.asarray(image)[keep])


# ---------------------------------------------------------------- the edit families, once each


@pytest.mark.parametrize(
    "fixture",
    ["tiny_qwen_edit", "tiny_qwen_edit_plus", "tiny_flux2_klein", "tiny_flux_kontext",
     "tiny_flux_fill"],
)
def test_each_family_edits_through_the_api(
    request: pytest.FixtureRequest, fixture: str, tmp_path: Path
) -> None:
    from tests.engines.test_diffusers_families import SIZE, warm

    model = request.getfixturevalue(fixture)
    engine = warm(model)
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    body = {"image_url": data_uri(image), "prompt": "make it red", "split_images": True,
            "seed": 3}
    if fixture == "tiny_flux_fill":
        body["mask"] = data_uri(mask)
    with TestClient(create_app(Settings(data_dir=tmp_path, api_tokens=TOKEN),
                               engine=engine)) as tc:
        health = tc.get("/healthz").json()["engine"]
        assert health["pipeline"] == fixture.removeprefix("tiny_").replace("_", "-")
        reply = tc.post("/midjourney/edits", headers=AUTH, json=body)
        assert reply.status_code == 200, reply.text
        urls = reply.json()["sub_image_urls"]
        assert len(urls) == 4
        variants = [np.asarray(Image.open(BytesIO(
            tc.get(u.removeprefix("http://testserver")).content)).convert("RGB")) for u in urls]
    assert all(v.shape == (*SIZE[::-1], 3) for v in variants)
    if "mask" in body:
        keep = np.asarray(mask) == 0
        assert all(np.array_equal(v[keep], np.asarray(image)[keep]) for v in variants)
    if fixture != "tiny_flux_fill":
        return
    # Fill without a mask: the client's error, named, not a 500.
    with TestClient(create_app(Settings(data_dir=tmp_path / "2", api_tokens=TOKEN),
                               engine=engine)) as tc:
        refused = tc.post("/midjourney/edits", headers=AUTH,
                          json={"image_url": data_uri(image), "prompt": "make it red"})
    assert refused.status_code == 400, refused.text
    assert "mask is required" in refused.json()["error"]["message"]


def test_healthz_shows_both_models(
    tiny_flux_kontext: Path, tiny_flux_fill: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, engine="diffusers",
                        diffusers_model=str(tiny_flux_kontext),
                        diffusers_mask_model=str(tiny_flux_fill), device="cpu")
    from tests.engines.test_diffusers_families import warm

    with TestClient(create_app(settings, engine=warm(tiny_flux_kontext, tiny_flux_fill))) as tc:
        engine = tc.get("/healthz").json()["engine"]
    assert engine["model"] == str(tiny_flux_kontext)
    assert engine["mask_model"] == str(tiny_flux_fill)
    assert (engine["pipeline"], engine["mask_pipeline"]) == ("flux-kontext", "flux-fill")
    assert engine["family"] == "FLUX.1 Kontext" and engine["mask_family"] == "FLUX.1 Fill"
