"""Odd but possible requests: raw bytes in headers, media types, names, numbers."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.inprocess import Client, running


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[api]\nlisten = "127.0.0.1:0"\nrate_per_second = 0\n'
        '[security]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    async with running(config_path) as api:
        yield api


async def raw_request(
    client: Client, head: bytes, body: bytes = b""
) -> tuple[int, Any]:
    """Send bytes as they are; the answer's status and JSON body (or raw text)."""
    host, port = str(client.daemon.listen_address).rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        return int(status_line.split()[1]), json.loads(payload)
    except ValueError:
        return int(status_line.split()[1]), payload


def head(path: str, *lines: bytes, method: bytes = b"GET", length: int = 0) -> bytes:
    return (
        method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + (f"Content-Length: {length}\r\n".encode() if length else b"")
    )


def error_code(body: Any) -> str:
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])


async def test_a_token_that_is_not_utf8_is_401_not_500(client: Client):
    status, body = await raw_request(
        client, head("/v1/templates", b"Authorization: Bearer ptd_\xfc\xfe")
    )
    assert status == 401
    assert error_code(body) == "unauthorized"


def submission(template: dict[str, Any], **data: Any) -> bytes:
    return json.dumps({"form_template_id": template["id"], "data": data}).encode()


@pytest.mark.parametrize(
    "key", [b"k\xfc", b"", b"x" * 256], ids=["not-utf8", "empty", "too-long"]
)
async def test_a_bad_idempotency_key_header_is_422(client: Client, key: bytes):
    template = await client.template()
    body = submission(template, a=1)
    status, answer = await raw_request(
        client,
        head(
            "/v1/submissions",
            f"Authorization: Bearer {client.token}".encode(),
            b"Content-Type: application/json",
            b"Idempotency-Key: " + key,
            method=b"POST",
            length=len(body),
        ),
        body,
    )
    assert status == 422, answer
    assert error_code(answer) == "invalid"
    _, page = await client.call("GET", "/v1/submissions")
    assert page["items"] == []


async def test_a_header_the_parser_refuses_leaves_no_token_in_the_log(
    client: Client, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    line = f"Authorization : Bearer {client.token}".encode()
    status, _ = await raw_request(client, head("/v1/templates", line))
    assert status == 400
    assert client.token not in caplog.text
    assert "Traceback" not in caplog.text
    # The daemon is fine afterwards.
    assert (await client.call("GET", "/v1/templates"))[0] == 200


async def test_a_merge_patch_may_say_so_in_its_media_type(client: Client):
    template = await client.template()
    async with client.session.patch(
        f"{client.base}/v1/templates/{template['id']}",
        data=b'{"max_retries": 7}',
        headers={
            "Authorization": f"Bearer {client.token}",
            "Content-Type": "application/merge-patch+json",
        },
    ) as reply:
        assert reply.status == 200, await reply.text()
        assert (await reply.json())["max_retries"] == 7


async def test_one_and_one_point_zero_are_the_same_body(client: Client):
    template = await client.template()
    body = {
        "form_template_id": template["id"],
        "data": {"a": 1, "b": [2]},
        "idempotency_key": "k-1",
        "scheduled_at": "2999-01-01T00:00:00Z",
    }
    first, created = await client.call("POST", "/v1/submissions", body)
    again = {**body, "data": {"a": 1.0, "b": [2.0]}}
    second, repeated = await client.call("POST", "/v1/submissions", again)
    assert (first, second) == (202, 200)
    assert repeated["id"] == created["id"]
    other = {**body, "data": {"a": 1.5, "b": [2]}}
    third, conflict = await client.call("POST", "/v1/submissions", other)
    assert third == 409
    assert error_code(conflict) == "idempotency_conflict"


@pytest.mark.parametrize("name", ["   ", "pay\u202eslip", "a\u200bb"])
async def test_names_must_be_printable_and_not_blank(client: Client, name: str):
    status, body = await client.call(
        "POST",
        "/v1/templates",
        {"name": name, "method": "API", "target": {"url": "http://127.0.0.1:9/"}},
    )
    assert status == 422, body
    status, body = await client.call("POST", "/v1/users", {"name": name})
    assert status == 422, body
    status, _ = await client.call("POST", "/v1/users", {"name": "Zoë Ångström 日本"})
    assert status == 201


async def test_preview_refuses_unknown_fields_and_deep_data(client: Client):
    template = await client.template()
    path = f"/v1/templates/{template['id']}/preview"
    status, body = await client.call("POST", path, {"data": {}, "bogus": 1})
    assert status == 422
    assert "bogus" in body["error"]["message"]
    deep: Any = 1
    for _ in range(40):
        deep = {"a": deep}
    status, body = await client.call("POST", path, {"data": deep})
    assert status == 422
    assert error_code(body) == "too_deep"
    status, body = await client.call("POST", path, {"data": {"x": 1}})
    assert status == 200
    assert body == {"payload": {"x": 1}}


async def test_a_missing_id_stays_404_whatever_its_spelling(client: Client):
    for spelling in ("abc", str(uuid.uuid4()), "%00", "..%2f"):
        status, body = await client.call("GET", f"/v1/submissions/{spelling}")
        assert status == 404, spelling
        assert error_code(body) == "not_found"


async def test_a_template_change_applies_to_the_next_create(client: Client):
    template = await client.template()
    path = "/v1/submissions"
    status, _ = await client.call(
        "POST", path, {"form_template_id": template["id"], "data": {}}
    )
    assert status == 202
    status, _ = await client.call(
        "PATCH", f"/v1/templates/{template['id']}", {"required_fields": ["ref"]}
    )
    assert status == 200
    status, body = await client.call(
        "POST", path, {"form_template_id": template["id"], "data": {}}
    )
    assert status == 422
    assert error_code(body) == "missing_required_fields"
    status, _ = await client.call(
        "POST", path, {"form_template_id": template["id"], "data": {"ref": 1}}
    )
    assert status == 202


async def test_a_deleted_template_takes_no_more_submissions(client: Client):
    template = await client.template(max_retries=0)
    body = {
        "form_template_id": template["id"],
        "data": {},
        "scheduled_at": "2999-01-01T00:00:00Z",
    }
    status, sub = await client.call("POST", "/v1/submissions", body)
    assert status == 202
    await client.call("POST", f"/v1/submissions/{sub['id']}/cancel")
    status, _ = await client.call("DELETE", f"/v1/templates/{template['id']}")
    assert status == 204
    status, answer = await client.call("POST", "/v1/submissions", body)
    assert status == 422
    assert error_code(answer) == "unknown_template"


async def test_another_users_template_stays_unknown_once_seen(client: Client):
    template = await client.template()
    await client.call(
        "POST", "/v1/submissions", {"form_template_id": template["id"], "data": {}}
    )
    _, other = await client.call("POST", "/v1/users", {"name": "other"})
    status, body = await client.call(
        "POST",
        "/v1/submissions",
        {"form_template_id": template["id"], "data": {}},
        token=other["token"],
    )
    assert status == 422
    assert error_code(body) == "unknown_template"
