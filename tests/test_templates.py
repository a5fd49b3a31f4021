"""Save-time template rules (TemplateRules), and the API and embedding around them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import ptdaemon
from ptdaemon.config import load_config
from ptdaemon.dispatch.registry import build_dispatchers
from ptdaemon.errors import InvalidError, ServiceError
from ptdaemon.models import TemplateIn, User
from ptdaemon.templates import TemplateRules
from tests.inprocess import NOWHERE, Client, running

FAR_FUTURE = "2999-01-01T00:00:00Z"
CAFE_NFC = "caf\u00e9"
CAFE_NFD = "cafe\u0301"
BASE_CONFIG = (
    '[daemon]\nstate_dir = "state"\n'
    '[api]\nlisten = "127.0.0.1:0"\nrate_per_second = 0\n'
    '[dispatch]\nfile_roots = ["drop"]\n'
    '[security]\nallow_networks = ["127.0.0.0/8"]\n'
)
ADMIN = User(id="u-1", name="admin", admin=True, created_at=0.0)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE_CONFIG + extra, encoding="utf-8")
    return path


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async with running(write_config(tmp_path)) as api:
        yield api


def error_code(answer: Any) -> str | None:
    """The error code of an answer; None when it is no error."""
    if not isinstance(answer, dict) or not isinstance(answer.get("error"), dict):
        return None
    return str(answer["error"]["code"])


# -- TemplateRules, without a daemon -------------------------------------------


@pytest.fixture
def rules(tmp_path: Path) -> TemplateRules:
    config = load_config(write_config(tmp_path))
    return TemplateRules(
        build_dispatchers(config),
        default_timeout_seconds=config.dispatch.timeout_seconds,
        base_dir=config.base_dir,
    )


def spec(**fields: Any) -> TemplateIn:
    body = {"name": "t", "method": "API", "target": {"url": NOWHERE}, **fields}
    return msgspec.convert(body, TemplateIn, strict=True)


def api_target(**fields: Any) -> dict[str, Any]:
    return {"url": NOWHERE, **fields}


RESERVED = [
    "Content-Length",
    "Transfer-Encoding",
    "Host",
    "Connection",
    "Idempotency-Key",
    "webhook-signature",
]

# (label, method, target, error code): targets that must never be saved.
REFUSED_TARGETS: list[tuple[str, str, dict[str, Any], str]] = [
    *(
        (f"reserved {name}", "API", api_target(headers={name: "1"}), "invalid_header")
        for name in RESERVED
    ),
    (
        "reserved auth header name",
        "API",
        api_target(auth={"type": "header", "name": "Host", "value": "v"}),
        "invalid_header",
    ),
    ("empty name", "API", api_target(headers={"": "v"}), "invalid_header"),
    ("name with space", "API", api_target(headers={"X Bad": "v"}), "invalid_header"),
    (
        "CR/LF in value",
        "API",
        api_target(headers={"X-Note": "v\r\nX-Evil: 1"}),
        "invalid_header",
    ),
    (
        "CR/LF in auth header name",
        "API",
        api_target(auth={"type": "header", "name": "X-A\r\nX-B", "value": "v"}),
        "invalid_header",
    ),
    (
        "CR/LF in bearer token",
        "API",
        api_target(auth={"type": "bearer", "token": "t\r\nX-Evil: 1"}),
        "invalid_header",
    ),
    (
        "CR/LF in basic password",
        "API",
        api_target(auth={"type": "basic", "username": "u", "password": "p\r\nq"}),
        "invalid_header",
    ),
    (
        "user and password in url",
        "API",
        {"url": "http://alice:s3cr3t@127.0.0.1:9/x"},
        "invalid_url",
    ),
    (
        "user in url",
        "HTTP_POST",
        {"url": "http://alice@127.0.0.1:9/x"},
        "invalid_url",
    ),
    *(
        (
            f"filename {name}",
            "FILE",
            {"directory": "drop", "filename": name + ".json"},
            "invalid",
        )
        for name in ("{id[0]}", "{id!r}", "{id:>300}", "{id.__class__}")
    ),
]


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [case[1:] for case in REFUSED_TARGETS],
    ids=[case[0] for case in REFUSED_TARGETS],
)
def test_rules_refuse_targets_that_must_never_be_saved(
    rules: TemplateRules, method: str, target: dict[str, Any], code: str
):
    with pytest.raises(InvalidError) as caught:
        rules.build(ADMIN, spec(method=method, target=target), None, 0.0)

    assert caught.value.code == code
    assert "s3cr3t" not in caught.value.message


@pytest.mark.parametrize(
    "target",
    [
        api_target(headers={"X-Api-Key": "k", "X-Trace": "on"}),
        api_target(auth={"type": "header", "name": "X-Auth", "value": "v\tw"}),
        api_target(auth={"type": "basic", "username": "u", "password": "p:q"}),
    ],
)
def test_rules_accept_ordinary_headers_and_auth(
    rules: TemplateRules, target: dict[str, Any]
):
    template, shown = rules.build(ADMIN, spec(target=target), None, 0.0)

    assert template.target["url"] == NOWHERE
    assert shown is None


def test_rules_accept_plain_filename_placeholders(rules: TemplateRules):
    target = {"directory": "drop", "filename": "{template}-{date}-{id}.json"}

    template, _ = rules.build(ADMIN, spec(method="FILE", target=target), None, 0.0)

    assert template.target["filename"] == target["filename"]


@pytest.mark.parametrize(
    ("place", "fields"),
    [
        (
            "bearer token",
            {"target": api_target(auth={"type": "bearer", "token": "***"})},
        ),
        (
            "basic password",
            {
                "target": api_target(
                    auth={"type": "basic", "username": "u", "password": "***"}
                )
            },
        ),
        ("sensitive header", {"target": api_target(headers={"X-Api-Key": "***"})}),
        ("signing secret", {"signing_secret": "***"}),
    ],
)
def test_rules_refuse_the_mask_where_no_secret_is_stored(
    rules: TemplateRules, place: str, fields: dict[str, Any]
):
    with pytest.raises(InvalidError):
        rules.build(ADMIN, spec(**fields), None, 0.0)


def test_rules_store_names_in_nfc(rules: TemplateRules):
    template, _ = rules.build(ADMIN, spec(name=CAFE_NFD), None, 0.0)

    assert template.name == CAFE_NFC


@pytest.mark.parametrize(
    "fields",
    [
        {"target": {"url": "ftp://x"}},
        {"method": "EMAIL", "target": {"to": ["clerk"], "subject": "s"}},
        {"signing_secret": "short"},
        {"field_map": {"a": ""}},
    ],
    ids=["ftp url", "bad email address", "short secret", "empty path"],
)
def test_rules_refuse_what_serve_refuses(rules: TemplateRules, fields: dict[str, Any]):
    with pytest.raises(ServiceError) as caught:
        rules.build(ADMIN, spec(**fields), None, 0.0)

    assert caught.value.http_status == 422


def test_rules_refuse_a_file_directory_outside_the_roots(
    rules: TemplateRules, tmp_path: Path
):
    target = {"directory": str(tmp_path / "elsewhere")}

    with pytest.raises(InvalidError):
        rules.build(ADMIN, spec(method="FILE", target=target), None, 0.0)


def test_rules_generate_a_secret_for_auto(rules: TemplateRules):
    first, shown = rules.build(ADMIN, spec(signing_secret="auto"), None, 0.0)
    second, _ = rules.build(ADMIN, spec(signing_secret="auto"), None, 0.0)

    assert shown == first.signing_secret
    assert first.signing_secret.startswith("whsec_")
    assert first.signing_secret != second.signing_secret


# -- the same rules through the API --------------------------------------------


async def test_api_refuses_each_bad_target_with_its_code(client: Client):
    answers = {}
    for n, (label, method, target, _) in enumerate(REFUSED_TARGETS):
        body = {"name": f"bad-{n}", "method": method, "target": target}
        status, answer = await client.call("POST", "/v1/templates", body)
        answers[label] = (status, error_code(answer))
    _, listing = await client.call("GET", "/v1/templates")

    assert answers == {label: (422, code) for label, _, _, code in REFUSED_TARGETS}
    assert listing["items"] == []


async def test_patch_cannot_add_reserved_headers_or_credentials_in_the_url(
    client: Client,
):
    template = await client.template(target={"url": NOWHERE})
    path = f"/v1/templates/{template['id']}"

    header_status, header = await client.call(
        "PATCH", path, {"target": {"headers": {"Host": "evil.example"}}}
    )
    url_status, url = await client.call(
        "PATCH", path, {"target": {"url": "http://alice:s3cr3t@127.0.0.1:9/x"}}
    )
    _, after = await client.call("GET", path)

    assert (header_status, error_code(header)) == (422, "invalid_header")
    assert (url_status, error_code(url)) == (422, "invalid_url")
    assert after["target"]["url"] == NOWHERE
    assert after["target"]["headers"] == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"target": api_target(auth={"type": "bearer", "token": "***"})},
        {"target": api_target(headers={"X-Api-Key": "***"})},
        {"signing_secret": "***"},
    ],
    ids=["bearer token", "sensitive header", "signing secret"],
)
async def test_create_with_the_mask_as_a_secret_is_refused(
    client: Client, fields: dict[str, Any]
):
    body = {"name": "t", "method": "API", "target": {"url": NOWHERE}, **fields}

    status, answer = await client.call("POST", "/v1/templates", body)

    assert status == 422, answer
    assert error_code(answer) == "invalid"


@pytest.mark.parametrize(
    "patch",
    [
        {"target": {"auth": {"type": "bearer", "token": "***"}}},
        {"target": {"headers": {"X-Api-Key": "***"}}},
        {"signing_secret": "***"},
    ],
    ids=["switch to bearer", "new sensitive header", "signing secret"],
)
async def test_patch_with_the_mask_where_nothing_is_stored_is_refused(
    client: Client, patch: dict[str, Any]
):
    template = await client.template(target=api_target(headers={"X-Trace": "on"}))
    path = f"/v1/templates/{template['id']}"

    status, answer = await client.call("PATCH", path, patch)
    _, after = await client.call("GET", path)

    assert status == 422, answer
    assert after["target"] == template["target"]
    assert after["signing_secret"] == template["signing_secret"]


async def test_patch_with_the_mask_keeps_a_stored_secret(client: Client):
    template = await client.template(
        target=api_target(auth={"type": "bearer", "token": "tok-1"}),
        signing_secret="auto",
    )
    path = f"/v1/templates/{template['id']}"

    status, patched = await client.call(
        "PATCH", path, {"target": {"auth": {"token": "***"}}, "signing_secret": "***"}
    )

    assert status == 200, patched
    assert patched["target"]["auth"] == {"type": "bearer", "token": "***"}
    assert patched["signing_secret"] == "***"


async def test_template_names_equal_after_nfc_are_duplicates(client: Client):
    await client.template(name=CAFE_NFC)

    status, answer = await client.call(
        "POST",
        "/v1/templates",
        {"name": CAFE_NFD, "method": "API", "target": {"url": NOWHERE}},
    )
    _, listing = await client.call("GET", "/v1/templates")

    assert status == 409
    assert error_code(answer) == "duplicate_name"
    assert [t["name"] for t in listing["items"]] == [CAFE_NFC]


async def test_rotate_secret_refuses_unknown_fields(client: Client):
    template = await client.template(signing_secret="auto")
    path = f"/v1/templates/{template['id']}/rotate-secret"

    bogus_status, bogus = await client.call("POST", path, {"bogus": 1})
    grace_status, rotated = await client.call("POST", path, {"grace_seconds": 10})

    assert bogus_status == 422, bogus
    assert grace_status == 200, rotated
    assert rotated["signing_secret"].startswith("whsec_")
    assert rotated["signing_secret"] != template["signing_secret"]


# -- config templates and their "auto" secret ----------------------------------


def stored_secret(tmp_path: Path, name: str) -> str:
    db = tmp_path / "state" / "ptdaemon.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        [(body,)] = conn.execute(
            "SELECT body FROM templates WHERE name = ?", (name,)
        ).fetchall()
    secret: str = json.loads(body)["signing_secret"]
    return secret


async def test_config_auto_secret_is_kept_but_a_patch_makes_a_new_one(
    tmp_path: Path,
):
    path = write_config(
        tmp_path,
        '\n[[templates]]\nname = "hook"\nmethod = "API"\n'
        f'target = {{url = "{NOWHERE}"}}\nsigning_secret = "auto"\n',
    )
    async with running(path):
        pass
    first = stored_secret(tmp_path, "hook")
    async with running(path) as api:
        _, listing = await api.call("GET", "/v1/templates")
        [template] = listing["items"]
    kept = stored_secret(tmp_path, "hook")
    async with running(path) as api:
        status, patched = await api.call(
            "PATCH", f"/v1/templates/{template['id']}", {"signing_secret": "auto"}
        )
        _, fetched = await api.call("GET", f"/v1/templates/{template['id']}")
    after_patch = stored_secret(tmp_path, "hook")

    assert first.startswith("whsec_")
    assert kept == first
    assert template["signing_secret"] == "***"
    assert status == 200, patched
    assert patched["signing_secret"].startswith("whsec_")
    assert patched["signing_secret"] != first
    assert fetched["signing_secret"] == "***"
    assert after_patch == patched["signing_secret"]


async def test_a_config_template_named_outside_nfc_survives_a_restart(
    tmp_path: Path,
):
    path = write_config(
        tmp_path,
        f'\n[[templates]]\nname = "{CAFE_NFD}"\nmethod = "API"\n'
        f'target = {{url = "{NOWHERE}"}}\n',
    )
    async with running(path) as api:
        _, first = await api.call("GET", "/v1/templates")

    async with running(path) as api:
        _, second = await api.call("GET", "/v1/templates")

    assert [t["name"] for t in first["items"]] == [CAFE_NFC]
    assert [(t["id"], t["name"]) for t in second["items"]] == [
        (t["id"], t["name"]) for t in first["items"]
    ]


# -- users ---------------------------------------------------------------------


async def test_no_one_deletes_themselves_or_admin_and_the_daemon_restarts(
    tmp_path: Path,
):
    path = write_config(tmp_path)
    async with running(path) as api:
        _, boss = await api.call("POST", "/v1/users", {"name": "boss", "admin": True})
        _, users = await api.call("GET", "/v1/users")
        [admin] = [u for u in users["items"] if u["name"] == "admin"]
        own_status, own = await api.call("DELETE", f"/v1/users/{admin['id']}")
        by_boss_status, by_boss = await api.call(
            "DELETE", f"/v1/users/{admin['id']}", token=boss["token"]
        )
        boss_self_status, _ = await api.call(
            "DELETE", f"/v1/users/{boss['id']}", token=boss["token"]
        )
        admin_token = api.token

    async with running(path) as again:
        status, after = await again.call("GET", "/v1/users", token=admin_token)

    assert (own_status, error_code(own)) == (409, "invalid_state")
    assert (by_boss_status, error_code(by_boss)) == (409, "invalid_state")
    assert boss_self_status == 409
    assert status == 200
    assert sorted(u["name"] for u in after["items"]) == ["admin", "boss"]


# -- submissions ---------------------------------------------------------------


async def wait_status(api: Client, sub_id: str, status: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            _, sub = await api.call("GET", f"/v1/submissions/{sub_id}")
            if sub["status"] == status:
                return sub  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)


async def test_retry_after_the_template_was_deleted_is_a_conflict(client: Client):
    template = await client.template(max_retries=0, timeout_seconds=2)
    _, sub = await client.call(
        "POST", "/v1/submissions", {"form_template_id": template["id"], "data": {}}
    )
    await wait_status(client, sub["id"], "failed")
    deleted, _ = await client.call("DELETE", f"/v1/templates/{template['id']}")

    status, answer = await client.call("POST", f"/v1/submissions/{sub['id']}/retry")
    _, after = await client.call("GET", f"/v1/submissions/{sub['id']}")

    assert deleted == 204
    assert status == 409, answer
    assert error_code(answer) == "template_deleted"
    assert after["status"] == "failed"


async def test_a_declared_body_over_the_limit_is_refused_at_once(client: Client):
    host, port = client.daemon.listen_address.rsplit(":", 1)  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b""
    try:
        writer.write(
            b"POST /v1/submissions HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            + f"Authorization: Bearer {client.token}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n"
            b"\r\n"
            b"{}"
        )
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                body = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    assert head.startswith(b"HTTP/1.1 413 "), head
    assert set(json.loads(body)["error"]) == {"code", "message", "details"}


async def test_pages_stop_growing_past_about_8_mib(client: Client):
    template = await client.template()
    created = []
    for n in range(12):
        data = {"n": n, "blob": "x" * (1024 * 1024)}
        sub = await client.daemon.submit(template["id"], data, scheduled_at=FAR_FUTURE)
        created.append(sub["id"])

    status, first = await client.call("GET", "/v1/submissions?limit=500")
    seen = [item["id"] for item in first["items"]]
    cursor = first["next_cursor"]
    for _ in range(12):
        if cursor is None:
            break
        _, page = await client.call("GET", f"/v1/submissions?limit=500&cursor={cursor}")
        assert page["items"], page["next_cursor"]
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]

    assert status == 200
    assert len(first["items"]) < 12
    assert first["next_cursor"] is not None
    assert cursor is None
    assert sorted(seen) == sorted(created)
    assert len(seen) == 12


# -- embedding -----------------------------------------------------------------


DROP_TEMPLATE = (
    '\n[[templates]]\nname = "drop"\nmethod = "FILE"\n'
    'target = {directory = "drop", filename = "{id}.json"}\n'
)


async def test_the_package_exports_what_embedding_needs(tmp_path: Path):
    path = write_config(tmp_path, DROP_TEMPLATE)

    config = ptdaemon.load_config(path)
    async with ptdaemon.Daemon(path, api=False) as daemon:
        [template] = await daemon.service.list_templates(daemon.user)
        sub = await daemon.submit(template.id, {"name": "Ada"}, scheduled_at=FAR_FUTURE)

    assert isinstance(config, ptdaemon.Config)
    assert {"Daemon", "Config", "load_config"} <= set(ptdaemon.__all__)
    assert sub["status"] == "pending"
    assert sub["data"] == {"name": "Ada"}


@pytest.mark.parametrize(
    "data",
    [{"x": float("nan")}, {"x": [float("inf")]}, {"x": b"raw"}, {1: "a"}],
    ids=["nan", "inf in a list", "bytes", "int key"],
)
async def test_embedded_submit_refuses_data_json_cannot_carry(
    tmp_path: Path, data: dict[Any, Any]
):
    path = write_config(tmp_path, DROP_TEMPLATE)

    async with ptdaemon.Daemon(path, api=False) as daemon:
        [template] = await daemon.service.list_templates(daemon.user)
        with pytest.raises(ptdaemon.errors.InvalidError):
            await daemon.submit(template.id, data, scheduled_at=FAR_FUTURE)
        listed, _ = await daemon.service.list_submissions(daemon.user)

    assert listed == []
