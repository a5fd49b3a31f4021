"""Users kept apart, signatures that verify, secrets kept, destinations guarded.

All against the real `ptdaemon serve` process over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.e2e.conftest import Api, Reply, Sink

# -- isolation ---------------------------------------------------------------

# A body that would be accepted if the object were the caller's, so that the
# answer is decided by ownership, not by validation.
BODIES: dict[tuple[str, str], Any] = {
    ("patch", "/v1/templates/{id}"): {"max_retries": 7},
    ("post", "/v1/templates/{id}/preview"): {"data": {"name": "x"}},
    ("post", "/v1/templates/{id}/rotate-secret"): {"grace_seconds": 0},
}


async def snapshot(api: Api, template_id: str, sub_id: str) -> Any:
    return (
        await api.ok("GET", f"/v1/templates/{template_id}"),
        await api.ok("GET", f"/v1/submissions/{sub_id}"),
        await api.attempts(sub_id),
        await api.ok("GET", "/v1/templates"),
        await api.ok("GET", "/v1/submissions"),
    )


async def test_every_route_answers_another_users_ids_as_missing(sink, start_daemon):
    _, admin = await start_daemon()
    mine = await admin.template(
        method="API", target={"url": sink.url("/ok")}, signing_secret="auto"
    )
    await admin.submit(mine["id"], {"name": "Bob"})
    sub = await admin.submit(mine["id"], {"name": "Ada"})
    await admin.wait_final(sub["id"])
    me = next(u for u in (await admin.ok("GET", "/v1/users"))["items"] if u["admin"])
    other = await admin.ok("POST", "/v1/users", {"name": "mallory"})
    mallory = Api(admin.base, other["token"])
    theirs = await mallory.template(method="API", target={"url": sink.url("/m")})
    before = await snapshot(admin, mine["id"], sub["id"])
    document = (await admin.ok("GET", "/v1/openapi.json"))["paths"]

    owned = {
        "/v1/templates/": mine["id"],
        "/v1/submissions/": sub["id"],
        "/v1/users/": me["id"],
    }
    checked = 0
    try:
        for path, operations in document.items():
            if "{id}" not in path:
                continue
            prefix = path.split("{id}")[0]
            for method in operations:
                body = BODIES.get((method, path))
                target = path.replace("{id}", owned[prefix])
                missing = path.replace("{id}", str(uuid.uuid4()))
                first = await mallory.send(
                    method.upper(),
                    target,
                    raw=json.dumps(body).encode() if body is not None else None,
                    headers={"Content-Type": "application/json"},
                )
                second = await mallory.send(
                    method.upper(),
                    missing,
                    raw=json.dumps(body).encode() if body is not None else None,
                    headers={"Content-Type": "application/json"},
                )
                where = f"{method.upper()} {path}"
                expected = 403 if prefix == "/v1/users/" else 404
                assert first.status == expected, (where, first.raw)
                assert (second.status, second.raw) == (first.status, first.raw), where
                checked += 1
        # Lists and their cursors hold none of the first user's rows.
        for path, operations in document.items():
            if "{id}" in path or "get" not in operations or path == "/v1/users":
                continue
            answer = await mallory.send("GET", path)
            for secret_id in (mine["id"], sub["id"]):
                assert secret_id.encode() not in answer.raw, path
        page = await admin.ok("GET", "/v1/submissions?limit=1")
        assert page["next_cursor"]
        if page["next_cursor"]:
            listed = await mallory.ok(
                "GET", f"/v1/submissions?cursor={page['next_cursor']}"
            )
            assert all(item["user_id"] != me["id"] for item in listed["items"])
        # The second user's own objects still work for it.
        own = await mallory.ok("GET", f"/v1/templates/{theirs['id']}")
        assert own["id"] == theirs["id"]
    finally:
        await mallory.close()
    assert checked >= 11
    assert await snapshot(admin, mine["id"], sub["id"]) == before


async def test_fields_a_client_must_not_set_are_refused(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/ok")})
    for field, value in (
        ("user_id", str(uuid.uuid4())),
        ("status", "completed"),
        ("retry_count", 5),
        ("id", str(uuid.uuid4())),
    ):
        status, body = await api.request(
            "POST",
            "/v1/submissions",
            {"form_template_id": template["id"], "data": {}, field: value},
        )
        assert status == 422, (field, body)
        assert field in body["error"]["message"]
    for field in ("user_id", "id", "created_at"):
        status, body = await api.request(
            "POST",
            "/v1/templates",
            {"name": "x", "method": "API", "target": {"url": sink.url("/")}, field: 1},
        )
        assert status == 422, (field, body)


# -- signing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "encoding"),
    [("API", None), ("HTTP_POST", "form"), ("HTTP_POST", "multipart")],
)
async def test_every_attempt_is_signed_over_the_bytes_sent(
    sink: Sink, start_daemon, method, encoding
):
    _, api = await start_daemon()
    path = f"/signed-{method}-{encoding}"
    url = sink.script(path, Reply(503), then=Reply(200))
    target: dict[str, Any] = {"url": url}
    if encoding:
        target["encoding"] = encoding
    template = await api.template(
        method=method,
        target=target,
        signing_secret="auto",
        retry_backoff_seconds=1.1,
        retry_jitter=0,
    )
    secret = template["signing_secret"]
    assert secret.startswith("whsec_")
    fetched = await api.ok("GET", f"/v1/templates/{template['id']}")
    assert fetched["signing_secret"] == "***"
    sub = await api.submit(template["id"], {"name": "Zoë", "city": "Łódź & co"})
    assert (await api.wait_final(sub["id"]))["status"] == "completed"
    seen = sink.seen(path)
    assert len(seen) == 2
    hook = Webhook(secret)
    for request in seen:
        hook.verify(request.body, dict(request.headers), json_parse=False)
        assert request.headers["webhook-id"] == sub["id"]
        flipped = bytearray(request.body)
        flipped[len(flipped) // 2] ^= 0x01
        with pytest.raises(WebhookVerificationError):
            hook.verify(bytes(flipped), dict(request.headers), json_parse=False)
    first, second = seen
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) > int(
        first.headers["webhook-timestamp"]
    )
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUFB" * 11).verify(first.body, dict(first.headers))


async def test_a_rotated_secret_signs_beside_the_old_one(sink: Sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": sink.url("/rot")}, signing_secret="auto"
    )
    old = template["signing_secret"]
    rotated = await api.ok(
        "POST", f"/v1/templates/{template['id']}/rotate-secret", {"grace_seconds": 60}
    )
    new = rotated["signing_secret"]
    assert new != old
    sub = await api.submit(template["id"], {"a": 1})
    await api.wait_final(sub["id"])
    (request,) = sink.seen("/rot")
    assert len(request.headers["webhook-signature"].split()) == 2
    Webhook(old).verify(request.body, dict(request.headers))
    Webhook(new).verify(request.body, dict(request.headers))


# -- secrets -----------------------------------------------------------------

PLANTED_SIGNING = "whsec_" + "cGxhbnRlZC1zaWduaW5nLXNlY3JldC0wMTIzNDU2Nzg5"
PLANTED = {
    "bearer": "planted-bearer-7Qx2",
    "basic": "planted-basic-pw-9Lm4",
    "header": "planted-header-key-3Rt8",
    "smtp": "planted-smtp-password-5Kd1",
}


async def _plant_and_exercise(sink: Sink, start_daemon, fmt: str) -> tuple[Any, ...]:
    process, api = await start_daemon(
        '[smtp]\npassword_env = "PTD_TEST_SMTP_PASSWORD"\nusername = "u"\n',
        daemon_config=f'log_level = "debug"\nlog_format = "{fmt}"\n',
        env={"PTD_TEST_SMTP_PASSWORD": PLANTED["smtp"]},
    )
    answers: list[bytes] = []
    fail = sink.script("/secret-fail", Reply(401), then=Reply(401))
    bodies = [
        {"type": "bearer", "token": PLANTED["bearer"]},
        {"type": "basic", "username": "u", "password": PLANTED["basic"]},
        {"type": "header", "name": "X-Api-Key", "value": PLANTED["header"]},
    ]
    for number, auth in enumerate(bodies):
        created = await api.send(
            "POST",
            "/v1/templates",
            raw=json.dumps(
                {
                    "name": f"secret-{number}",
                    "method": "API",
                    "target": {"url": fail, "auth": auth},
                    "signing_secret": PLANTED_SIGNING,
                    "max_retries": 1,
                    "retry_backoff_seconds": 0.05,
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert created.status == 201, created.raw
        answers.append(created.raw)
        template_id = created.json["id"]
        sub = await api.submit(template_id, {"name": "Ada"})
        await api.wait_final(sub["id"])
        paths = (
            f"/v1/templates/{template_id}",
            f"/v1/submissions/{sub['id']}",
            f"/v1/submissions/{sub['id']}/attempts",
            "/v1/templates",
            "/v1/submissions",
        )
        answers.extend([(await api.send("GET", path)).raw for path in paths])
        patched = await api.send(
            "PATCH",
            f"/v1/templates/{template_id}",
            raw=b'{"max_retries": 2}',
            headers={"Content-Type": "application/json"},
        )
        answers.append(patched.raw)
    user = await api.send(
        "POST",
        "/v1/users",
        raw=b'{"name": "clerk"}',
        headers={"Content-Type": "application/json"},
    )
    token = user.json["token"]
    answers.append((await api.send("GET", "/v1/users")).raw)
    # A bad token in a request must not be logged either.
    bad = await api.send(
        "GET", "/v1/templates", headers={"Authorization": f"Bearer {token}x"}
    )
    assert bad.status == 401
    await process.terminate()
    return process, answers, token


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_planted_secrets_appear_in_no_log_answer_or_token_store(
    sink: Sink, start_daemon, fmt
):
    process, answers, token = await _plant_and_exercise(sink, start_daemon, fmt)
    log = process.log()
    assert "attempt" in log  # debug logging was on and saw the deliveries
    everything = [*PLANTED.values(), PLANTED_SIGNING, process.token, token]
    for value in everything:
        assert value not in log, value
        for answer in answers:
            assert value.encode() not in answer, value
    database = b"".join(
        path.read_bytes()
        for path in process.state.iterdir()
        if path.name.startswith("ptdaemon.db")
    )
    for value in (process.token, token):
        assert value.encode() not in database
    # The destination did get them: the answers masked, not lost, them.
    assert any(
        PLANTED["bearer"] in r.headers.get("Authorization", "") for r in sink.requests
    )


# -- files on disk -----------------------------------------------------------


async def test_state_files_are_owner_only(sink, start_daemon):
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/ok")})
    await api.wait_final((await api.submit(template["id"], {"a": 1}))["id"])
    assert stat.S_IMODE(process.state.stat().st_mode) == 0o700
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in process.state.iterdir()}
    assert names["admin.token"] == 0o600
    for name in ("ptdaemon.db", "ptdaemon.db-wal", "ptdaemon.db-shm"):
        assert names[name] == 0o600, name


async def test_a_unix_socket_is_owner_only(tmp_path: Path):
    socket_path = tmp_path / "api.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "state"\n[api]\nlisten = "unix:{socket_path}"\n'
    )
    log = (tmp_path / "log").open("wb")
    old_umask = os.umask(0)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ptdaemon", "serve", "--config", str(config)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    finally:
        os.umask(old_umask)
    try:
        for _ in range(200):
            if (
                socket_path.exists()
                and b"daemon ready" in (tmp_path / "log").read_bytes()
            ):
                break
            await asyncio.sleep(0.05)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        # Even with a umask of 0, what holds secrets is private.
        state = tmp_path / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in (
            "admin.token",
            "ptdaemon.db",
            "ptdaemon.db-wal",
            "ptdaemon.db-shm",
        ):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    assert proc.returncode == 0
    assert not socket_path.exists()


# -- destinations ------------------------------------------------------------


async def test_loopback_destinations_are_refused_unless_allowed(sink, start_daemon):
    _, api = await start_daemon(allow_networks="[]")
    for url in (
        sink.url("/x"),
        f"http://localhost:{sink.port}/x",
        f"http://[::1]:{sink.port}/x",
        f"http://[::ffff:127.0.0.1]:{sink.port}/x",
        f"http://2130706433:{sink.port}/x",
    ):
        status, body = await api.request(
            "POST",
            "/v1/templates",
            {"name": "n", "method": "API", "target": {"url": url}},
        )
        assert status == 422, (url, body)
        assert body["error"]["code"] == "address_refused"
        assert "refused" in body["error"]["message"]


def _loopback_name() -> str | None:
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80)}
    except OSError:
        return None
    if addresses and all(a.startswith("127.") or a == "::1" for a in addresses):
        return name
    return None


async def test_a_name_that_leads_to_loopback_fails_without_retry(sink, start_daemon):
    name = _loopback_name()
    if name is None:
        pytest.skip("this host's name does not resolve to loopback only")
    _, api = await start_daemon(allow_networks="[]")
    template = await api.template(
        method="API", target={"url": f"http://{name}:{sink.port}/inside"}, max_retries=5
    )
    sub = await api.submit(template["id"], {"a": 1})
    final = await api.wait_final(sub["id"])
    assert final["status"] == "failed"
    assert final["error_category"] == "validation"
    assert "loopback" in final["error_message"]
    assert final["retry_count"] == 0
    assert sink.seen("/inside") == []


# -- body limits -------------------------------------------------------------


async def test_a_chunked_body_over_the_limit_is_refused_without_the_rest(
    start_daemon,
):
    process, api = await start_daemon(
        api_config="rate_per_second = 0\nmax_body_bytes = 65536\n"
    )
    host, port = process.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    chunk = b"[" + b"1," * 16383 + b"1]"
    sent = 0
    try:
        writer.write(
            b"POST /v1/submissions/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {api.token}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # Four times the limit is offered; the answer must come before the end.
        for _ in range(8):
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert body["error"]["code"] == "body_too_large"
    assert sent < 4 * 65536 + len(chunk)
    # The daemon is unharmed.
    assert (await api.send("GET", "/healthz", auth=False)).status == 200


async def test_json_nested_half_a_million_deep_is_a_plain_422(start_daemon):
    _, api = await start_daemon()
    depth = 500_000
    raw = b'{"form_template_id": "x", "data": ' + b"[" * depth + b"]" * depth + b"}"
    for path in ("/v1/submissions", "/v1/templates", "/v1/submissions/batch"):
        answer = await api.send(
            "POST", path, raw=raw, headers={"Content-Type": "application/json"}
        )
        assert answer.status == 422, (path, answer.raw[:200])
        assert answer.json["error"]["code"] == "too_deep"
    process_ok = await api.send("GET", "/healthz", auth=False)
    assert process_ok.status == 200
