"""The OpenAPI document: valid 3.1, one entry per served route, true to the answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from ptdaemon.api.openapi import openapi_document
from tests.inprocess import Client, running


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[api]\nlisten = "127.0.0.1:0"\nrate_per_second = 0\n'
        "[dispatch]\nconcurrency = 1\n"
        '[security]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    async with running(config_path) as api:
        yield api


def test_document_is_valid_openapi_3_1():
    document = openapi_document()

    validate(document)

    assert document["openapi"] == "3.1.0"


def test_every_operation_documents_its_bodies_and_errors():
    document = openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert any(code < "400" for code in answers), (method, path)
            if operation.get("security") != []:
                assert {"401", "429", "503"} <= set(answers), (method, path)
            if "{id}" in path:
                assert "404" in answers, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= set(answers), (method, path)
            for code, answer in answers.items():
                if code != "204" and not code.startswith("3"):
                    assert answer["content"], (method, path, code)


async def test_served_routes_and_documented_operations_are_the_same(client: Client):
    app = client.daemon._app
    assert app is not None
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }

    documented = {
        (method, path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }

    assert served == documented


class Checker:
    """Calls the daemon and checks each answer against the document."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.document = openapi_document()
        self.seen: set[tuple[str, str, str]] = set()

    def template_of(self, method: str, path: str) -> str:
        bare = path.split("?")[0]
        for known in self.document["paths"]:
            pattern = known.split("/")
            parts = bare.split("/")
            matches = len(pattern) == len(parts) and all(
                p == q or p.startswith("{") for p, q in zip(pattern, parts, strict=True)
            )
            if matches and method in self.document["paths"][known]:
                return known
        raise AssertionError(f"{method} {path} is not documented")

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.client.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        session = self.client.session
        async with session.request(
            method,
            self.client.base + path,
            data=data,
            headers=headers,
            allow_redirects=False,
        ) as answer:
            text = await answer.read()
            media = answer.headers.get("Content-Type", "")
        return answer.status, self.check(
            method.lower(), path, answer.status, media, text
        )

    def check(
        self, method: str, path: str, status: int, media: str, text: bytes
    ) -> Any:
        known = self.template_of(method, path)
        responses = self.document["paths"][known][method]["responses"]
        assert str(status) in responses, f"{method} {known} answered {status}"
        self.seen.add((method, known, str(status)))
        content = responses[str(status)].get("content")
        if not content:
            assert not text, (method, known, status)
            return None
        bare = {name.split(";")[0]: spec for name, spec in content.items()}
        assert media.split(";")[0] in bare, (known, media)
        spec = bare[media.split(";")[0]]
        if not media.startswith("application/json"):
            return text.decode()
        value = json.loads(text)
        schema = {**spec["schema"], "components": self.document["components"]}
        OAS31Validator(schema).validate(value)
        return value


async def exercise_templates(check: Checker, sink_url: str) -> dict[str, Any]:
    template = {
        "name": "permit",
        "method": "API",
        "target": {"url": sink_url, "auth": {"type": "bearer", "token": "t"}},
        "field_map": {"who": "name"},
        "max_retries": 0,
        "signing_secret": "auto",
    }
    status, created = await check.call("POST", "/v1/templates", template)
    assert status == 201
    tid = created["id"]
    assert (await check.call("POST", "/v1/templates", template))[0] == 409
    assert (await check.call("POST", "/v1/templates", {"name": 1}))[0] == 422
    assert (await check.call("POST", "/v1/templates", raw=b"{"))[0] == 400
    raw_call = check.call("POST", "/v1/templates", raw=b"x", content_type="text/plain")
    assert (await raw_call)[0] == 415
    custom = {"name": "c", "method": "CUSTOM", "target": {"handler": "x:y"}}
    assert (await check.call("GET", "/v1/templates"))[0] == 200
    assert (await check.call("GET", f"/v1/templates/{tid}"))[0] == 200
    assert (await check.call("GET", "/v1/templates/nope"))[0] == 404
    patch = {"field_map": {"who": "name", "zip": "address.zip"}}
    assert (await check.call("PATCH", f"/v1/templates/{tid}", patch))[0] == 200
    preview = {"data": {"name": "Ada", "address": {"zip": "N1"}}}
    status, shown = await check.call("POST", f"/v1/templates/{tid}/preview", preview)
    assert (status, shown) == (200, {"payload": {"who": "Ada", "zip": "N1"}})
    trial = {**preview, "field_map": {"postcode": ["address", "zip"]}}
    status, shown = await check.call("POST", f"/v1/templates/{tid}/preview", trial)
    assert (status, shown) == (200, {"payload": {"postcode": "N1"}})
    bad_map = {**preview, "field_map": {"x": 5}}
    path = f"/v1/templates/{tid}/preview"
    assert (await check.call("POST", path, bad_map))[0] == 422
    status, still = await check.call("GET", f"/v1/templates/{tid}")
    assert still["field_map"] == patch["field_map"]
    assert (await check.call("POST", f"/v1/templates/{tid}/rotate-secret"))[0] == 200
    return {"id": tid, "custom": custom}


async def exercise_users(check: Checker) -> str:
    status, user = await check.call("POST", "/v1/users", {"name": "viewer"})
    assert status == 201
    assert (await check.call("GET", "/v1/users"))[0] == 200
    status, rotated = await check.call("POST", f"/v1/users/{user['id']}/token")
    assert status == 200
    assert (await check.call("GET", "/v1/users", token=rotated["token"]))[0] == 403
    status, other = await check.call("POST", "/v1/users", {"name": "gone"})
    assert (await check.call("DELETE", f"/v1/users/{other['id']}"))[0] == 204
    assert (await check.call("DELETE", f"/v1/users/{other['id']}"))[0] == 404
    return str(rotated["token"])


async def exercise_submissions(check: Checker, tid: str) -> None:
    body = {"form_template_id": tid, "data": {"name": "Ada"}}
    keyed = {**body, "idempotency_key": "k1"}
    status, sub = await check.call("POST", "/v1/submissions", keyed)
    assert status == 202
    assert (await check.call("POST", "/v1/submissions", keyed))[0] == 200
    other = {**keyed, "data": {"name": "Bob"}}
    assert (await check.call("POST", "/v1/submissions", other))[0] == 409
    later = {**body, "scheduled_at": "2999-01-01T00:00:00Z"}
    status, queued = await check.call("POST", "/v1/submissions", later)
    batch = {"items": [body, {"form_template_id": tid}]}
    assert (await check.call("POST", "/v1/submissions/batch", batch))[0] == 202
    bad_batch = {"items": [{"data": {}}]}
    assert (await check.call("POST", "/v1/submissions/batch", bad_batch))[0] == 422
    assert (await check.call("GET", "/v1/submissions?limit=1"))[0] == 200
    assert (await check.call("GET", "/v1/submissions?limit=9999"))[0] == 400
    assert (await check.call("GET", f"/v1/submissions/{sub['id']}"))[0] == 200
    path = f"/v1/submissions/{sub['id']}/attempts"
    assert (await check.call("GET", path))[0] == 200
    assert (await check.call("POST", f"/v1/submissions/{queued['id']}/cancel"))[
        0
    ] == 200
    again = f"/v1/submissions/{queued['id']}/retry"
    assert (await check.call("POST", again))[0] == 409
    assert (await check.call("GET", "/v1/stats"))[0] == 200
    assert (await check.call("GET", "/v1/stats?since=never"))[0] == 400


async def test_answers_match_the_document(client: Client):
    check = Checker(client)
    assert (await check.call("GET", "/healthz", token=None))[0] == 200
    assert (await check.call("GET", "/readyz", token=None))[0] == 200
    assert (await check.call("GET", "/v1/openapi.json", token=None))[0] == 200
    assert (await check.call("GET", "/ui", token=None))[0] == 308
    assert (await check.call("GET", "/ui/", token=None))[0] == 200
    assert (await check.call("GET", "/ui/app.js", token=None))[0] == 200
    assert (await check.call("GET", "/ui/secrets.txt", token=None))[0] == 404
    assert (await check.call("GET", "/v1/templates", token=None))[0] == 401

    found = await exercise_templates(check, "http://127.0.0.1:9/x")
    viewer_token = await exercise_users(check)
    await exercise_submissions(check, found["id"])
    status, _ = await check.call(
        "POST", "/v1/templates", found["custom"], token=viewer_token
    )
    assert status == 403
    status, metrics = await check.call("GET", "/metrics")
    assert status == 200
    assert "ptdaemon_api_requests_total" in metrics
    assert (await check.call("GET", "/metrics", token=viewer_token))[0] == 403
    assert (await check.call("DELETE", f"/v1/templates/{found['id']}"))[0] == 204

    # Every documented operation was exercised at least once.
    operations = {
        (method, path)
        for path, ops in check.document["paths"].items()
        for method in ops
    }
    assert operations == {(method, path) for method, path, _ in check.seen}
