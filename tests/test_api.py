"""The control API in-process: templates, secrets, preview, users, OpenAPI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ptdaemon.config import load_config
from ptdaemon.daemon import Daemon
from tests.inprocess import Client, running


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[api]\nlisten = "127.0.0.1:0"\nrate_per_second = 0\n'
        '[dispatch]\nfile_roots = ["drop"]\n[limits]\ntemplates_per_user = 3\n'
        '[security]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    async with running(config_path) as api:
        yield api


API_TEMPLATE = {
    "name": "permit",
    "method": "API",
    "target": {
        "url": "http://127.0.0.1:9/x",
        "headers": {"X-Api-Key": "key-123", "X-Trace": "on"},
        "auth": {"type": "bearer", "token": "tok-456"},
    },
    "signing_secret": "auto",
}


async def test_secrets_are_write_only(client: Client):
    status, created = await client.call("POST", "/v1/templates", API_TEMPLATE)
    _, fetched = await client.call("GET", f"/v1/templates/{created['id']}")

    assert status == 201
    assert created["signing_secret"].startswith("whsec_")
    assert fetched["signing_secret"] == "***"
    assert fetched["target"]["auth"]["token"] == "***"
    assert fetched["target"]["headers"] == {"X-Api-Key": "***", "X-Trace": "on"}
    assert "tok-456" not in json.dumps(fetched)


async def test_patch_keeps_masked_secrets_and_merges(client: Client, tmp_path: Path):
    _, created = await client.call("POST", "/v1/templates", API_TEMPLATE)
    tid = created["id"]

    status, patched = await client.call(
        "PATCH",
        f"/v1/templates/{tid}",
        {
            "target": {"headers": {"X-Trace": None}, "auth": {"token": "***"}},
            "max_retries": 7,
            "signing_secret": "***",
        },
    )

    assert status == 200
    assert patched["max_retries"] == 7
    assert patched["target"]["headers"] == {"X-Api-Key": "***"}
    assert patched["signing_secret"] == "***"
    db = tmp_path / "state" / "ptdaemon.db"
    assert b"tok-456" in db.read_bytes() or _in_wal(tmp_path, b"tok-456")


def _in_wal(tmp_path: Path, needle: bytes) -> bool:
    wal = tmp_path / "state" / "ptdaemon.db-wal"
    return wal.exists() and needle in wal.read_bytes()


async def test_patch_with_invalid_values_changes_nothing(client: Client):
    _, created = await client.call("POST", "/v1/templates", API_TEMPLATE)
    tid = created["id"]

    status, error = await client.call(
        "PATCH", f"/v1/templates/{tid}", {"max_retries": 1000}
    )
    _, after = await client.call("GET", f"/v1/templates/{tid}")

    assert status == 422
    assert error["error"]["code"] == "invalid"
    assert after["max_retries"] == 3


async def test_duplicate_names_conflict(client: Client):
    await client.call("POST", "/v1/templates", API_TEMPLATE)

    status, error = await client.call("POST", "/v1/templates", API_TEMPLATE)

    assert status == 409
    assert error["error"]["code"] == "duplicate_name"


async def test_templates_per_user_limit(client: Client):
    for n in range(3):
        body = {**API_TEMPLATE, "name": f"t{n}"}
        assert (await client.call("POST", "/v1/templates", body))[0] == 201

    status, error = await client.call(
        "POST", "/v1/templates", {**API_TEMPLATE, "name": "t3"}
    )

    assert status == 409
    assert error["error"]["code"] == "limit_reached"


async def test_preview_maps_without_sending(client: Client):
    body = {
        **API_TEMPLATE,
        "field_map": {"who": "person.name", "first_tag": "tags.0"},
        "required_fields": ["person.name"],
    }
    _, created = await client.call("POST", "/v1/templates", body)
    path = f"/v1/templates/{created['id']}/preview"

    status, preview = await client.call(
        "POST", path, {"data": {"person": {"name": "Ada"}, "tags": ["x", "y"]}}
    )
    missing_status, missing = await client.call("POST", path, {"data": {}})

    assert status == 200
    assert preview == {"payload": {"who": "Ada", "first_tag": "x"}}
    assert missing_status == 422
    assert missing["error"]["details"] == {"fields": ["person.name"]}


async def test_delete_template_is_refused_while_submissions_are_unfinished(
    client: Client,
):
    _, created = await client.call("POST", "/v1/templates", API_TEMPLATE)
    tid = created["id"]
    _, sub = await client.call(
        "POST",
        "/v1/submissions",
        {
            "form_template_id": tid,
            "data": {},
            "scheduled_at": "2999-01-01T00:00:00Z",
        },
    )

    refused, _ = await client.call("DELETE", f"/v1/templates/{tid}")
    await client.call("POST", f"/v1/submissions/{sub['id']}/cancel")
    deleted, _ = await client.call("DELETE", f"/v1/templates/{tid}")
    gone, _ = await client.call("GET", f"/v1/templates/{tid}")

    assert (refused, deleted, gone) == (409, 204, 404)


async def test_rotate_secret_shows_the_new_secret_once(client: Client):
    _, created = await client.call("POST", "/v1/templates", API_TEMPLATE)
    path = f"/v1/templates/{created['id']}/rotate-secret"

    status, rotated = await client.call("POST", path)
    _, fetched = await client.call("GET", f"/v1/templates/{created['id']}")

    assert status == 200
    assert rotated["signing_secret"].startswith("whsec_")
    assert rotated["signing_secret"] != created["signing_secret"]
    assert fetched["signing_secret"] == "***"


async def test_users_lifecycle(client: Client):
    status, user = await client.call("POST", "/v1/users", {"name": "clerk"})
    token = user["token"]
    forbidden, _ = await client.call("GET", "/v1/users", token=token)
    _, listing = await client.call("GET", "/v1/users")
    rotated_status, rotated = await client.call("POST", f"/v1/users/{user['id']}/token")
    old_token_status, _ = await client.call("GET", "/v1/templates", token=token)
    new_token_status, _ = await client.call(
        "GET", "/v1/templates", token=rotated["token"]
    )
    deleted, _ = await client.call("DELETE", f"/v1/users/{user['id']}")
    revoked_status, _ = await client.call(
        "GET", "/v1/templates", token=rotated["token"]
    )

    assert status == 201
    assert token.startswith("ptd_")
    assert user["admin"] is False
    assert forbidden == 403
    assert [u["name"] for u in listing["items"]] == ["admin", "clerk"]
    assert "token" not in listing["items"][1]
    assert rotated_status == 200
    assert (old_token_status, new_token_status) == (401, 200)
    assert (deleted, revoked_status) == (204, 401)


async def test_deleting_a_user_cancels_its_queued_submissions(
    client: Client, tmp_path: Path
):
    _, user = await client.call("POST", "/v1/users", {"name": "clerk"})
    _, template = await client.call(
        "POST",
        "/v1/templates",
        {"name": "x", "method": "API", "target": {"url": "http://127.0.0.1:9/"}},
        token=user["token"],
    )
    _, sub = await client.call(
        "POST",
        "/v1/submissions",
        {
            "form_template_id": template["id"],
            "data": {},
            "scheduled_at": "2999-01-01T00:00:00Z",
        },
        token=user["token"],
    )

    await client.call("DELETE", f"/v1/users/{user['id']}")

    db = tmp_path / "state" / "ptdaemon.db"
    with sqlite3.connect(db) as conn:
        [(status,)] = conn.execute(
            "SELECT status FROM submissions WHERE id = ?", (sub["id"],)
        ).fetchall()
    assert sub["status"] == "pending"
    assert status == "cancelled"


async def test_non_admins_cannot_use_custom_templates(client: Client):
    _, user = await client.call("POST", "/v1/users", {"name": "clerk"})

    status, error = await client.call(
        "POST",
        "/v1/templates",
        {"name": "plug", "method": "CUSTOM", "target": {"handler": "x:y"}},
        token=user["token"],
    )

    assert status == 403
    assert error["error"]["code"] == "forbidden"


async def test_openapi_lists_every_route(client: Client):
    from ptdaemon.api.routes import add_routes

    app = aiohttp.web.Application()
    add_routes(app)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }

    status, document = await client.call("GET", "/v1/openapi.json", token="none")
    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
    }

    assert status == 200
    assert document["openapi"].startswith("3.1")
    assert served == documented


async def test_secrets_never_reach_logs_or_answers(
    client: Client, caplog: pytest.LogCaptureFixture
):
    import logging

    from aiohttp import web

    seen: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Api-Key", ""))
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_post("/x", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    caplog.set_level(logging.DEBUG)
    body = {
        **API_TEMPLATE,
        "target": {**API_TEMPLATE["target"], "url": f"http://127.0.0.1:{port}/x"},
        "max_retries": 0,
    }
    try:
        _, template = await client.call("POST", "/v1/templates", body)
        _, sub = await client.call(
            "POST",
            "/v1/submissions",
            {"form_template_id": template["id"], "data": {"a": 1}},
        )
        for _ in range(200):
            _, sub = await client.call("GET", f"/v1/submissions/{sub['id']}")
            if sub["status"] == "failed":
                break
            await asyncio.sleep(0.02)
        _, attempts = await client.call("GET", f"/v1/submissions/{sub['id']}/attempts")
    finally:
        await runner.cleanup()

    answers = json.dumps([sub, attempts])
    assert seen == ["key-123"]
    assert sub["status"] == "failed"
    for secret in ("key-123", "tok-456", template["signing_secret"], client.token):
        assert secret not in caplog.text
        assert secret not in answers


async def test_readyz_proves_the_database_takes_writes(client: Client, tmp_path: Path):
    status, body = await client.call("GET", "/readyz", token="none")

    db = tmp_path / "state" / "ptdaemon.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id FROM probe").fetchall()
    assert status == 200
    assert body == {"status": "ready"}
    assert rows == [(1,)]


async def test_readyz_is_503_while_the_database_is_locked(tmp_path: Path):
    import ptdaemon.store as store_module

    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[daemon]\nstate_dir = "state"\n[api]\nlisten = "127.0.0.1:0"\n'
    )
    original = store_module.BUSY_TIMEOUT_MS
    store_module.BUSY_TIMEOUT_MS = 200
    try:
        async with (
            Daemon(load_config(config_path), api=True) as daemon,
            aiohttp.ClientSession() as session,
        ):
            url = f"http://{daemon.listen_address}/readyz"
            blocker = sqlite3.connect(tmp_path / "state" / "ptdaemon.db")
            blocker.execute("BEGIN IMMEDIATE")
            try:
                async with session.get(url) as reply:
                    locked = reply.status, await reply.json()
            finally:
                blocker.rollback()
                blocker.close()
            async with session.get(url) as reply:
                freed = reply.status
    finally:
        store_module.BUSY_TIMEOUT_MS = original

    assert locked[0] == 503
    assert locked[1]["error"]["code"] == "storage_unavailable"
    assert freed == 200
