"""Schemathesis over /openapi.json with a valid token: no server error, the envelope on every 4xx.

Bounded so the module stays well under a minute on two cores: few examples per operation, a
per-example deadline, and an app whose fetches cannot leave the machine (a private-URL-allowing
policy that only parses callback URLs at submit, and an in-process transport that answers every
image fetch with 404) and whose fetch and sync timeouts are short.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.settings import Settings
from tests.conftest import AUTH, TOKEN
from tests.fakes import FakeEngine

MAX_EXAMPLES = 25
DEADLINE_MS = 5_000


def _nowhere(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, content=b"no images here")


def _settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        api_tokens=TOKEN,
        # Generated hosts must not reach a resolver at submit time; fetches still go through the
        # safe fetcher (and the transport below), so this only skips the address rule.
        allow_private_urls=True,
        fetch_timeout_seconds=1,
        sync_timeout_seconds=4,
        rate_limit="off",  # hundreds of calls a minute, on purpose
        lease_seconds=5,
        reaper_interval_seconds=0.5,
    )


def _app(data_dir: Path) -> Any:
    config = _settings(data_dir)
    runtime = Runtime.build(config, engine=FakeEngine(),
                            fetch_transport=httpx.MockTransport(_nowhere))
    return create_app(config, runtime=runtime)


def _body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    content = document["paths"][path]["post"]["requestBody"]["content"]
    properties: dict[str, Any] = content["application/json"]["schema"]["properties"]
    return properties


def _with_rules_the_document_lacks(document: dict[str, Any]) -> dict[str, Any]:
    """Add the rules the server enforces but its document does not state yet.

    Without them nearly every generated edit is refused at the first check (an image_url that
    is no URL, an action that is not served), so the worker, the fetcher and the decoders would
    never see generated input. The negative phases still send what breaks these rules.
    """
    edits = _body_schema(document, "/midjourney/edits")
    edits["image_url"] = {**edits["image_url"], "pattern": "^(https?://|data:image/png;base64,)"}
    edits["prompt"] = {**edits["prompt"], "minLength": 1, "maxLength": 4000, "pattern": "\\S"}
    edits["action"] = {**edits["action"], "enum": ["generate"]}
    tasks = _body_schema(document, "/midjourney/tasks")
    tasks["action"] = {**tasks["action"], "enum": ["retrieve", "retrieve_batch", "cancel"]}
    return document


def _load_schema() -> Any:
    """The app's OpenAPI document, read once at collection from an app that never serves.

    (`schemathesis.pytest.from_fixture` would build it per test, but it sets `Item._nodeid`,
    which pytest 9 no longer has; each test still gets its own fresh app, passed to `call`.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        document_app = _app(Path(tmp))
        document = document_app.openapi()
        document_app.state.runtime.close()
    loaded = schemathesis.openapi.from_dict(_with_rules_the_document_lacks(document))
    loaded.app = document_app  # selects the in-process ASGI transport; requests go to `app=`
    return loaded


schema = _load_schema()


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return _app(tmp_path / "data")


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=DEADLINE_MS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
def test_no_server_error_and_the_envelope_on_4xx(app: Any, case: Any) -> None:
    response = case.call(app=app, headers=dict(AUTH))  # it adds its own headers to the dict
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        body = response.json()
        assert body["success"] is False, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        trace_header = response.headers["x-trace-id"]  # schemathesis keeps every value: a list
        assert [body["trace_id"]] == list(trace_header), body
