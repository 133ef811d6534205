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
