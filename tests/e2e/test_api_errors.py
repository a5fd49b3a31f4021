"""Bad input to the control API: the contract's status codes and error shape."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.conftest import Answer, Reply

JSON = {"Content-Type": "application/json"}
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def error_of(answer: Answer, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the status and the contract's error shape; return the error."""
    assert answer.status == status, (answer.status, answer.raw[:500])
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert SNAKE.fullmatch(error["code"]), error
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


async def post_json(api: Any, path: str, body: Any, **headers: str) -> Answer:
    raw = json.dumps(body).encode()
    answer: Answer = await api.send("POST", path, headers={**JSON, **headers}, raw=raw)
    return answer


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def other_user(api: Any, name: str = "bob") -> str:
    """Create a second, non-admin user as admin; return its token."""
    answer = await post_json(api, "/v1/users", {"name": name})
    assert answer.status == 201, answer.raw
    user = answer.json
    assert user["admin"] is False
    assert user["token"]
    return user["token"]  # type: ignore[no-any-return]


async def test_malformed_json_is_400(start_daemon):
    _, api = await start_daemon()

    for raw in (b"{", b"{'a': 1}", b'{"a": }', b"", b"\xff\xfe", b"[1,]"):
        answer = await api.send("POST", "/v1/submissions", headers=JSON, raw=raw)
        error_of(answer, 400)
    answer = await api.send("POST", "/v1/templates", headers=JSON, raw=b"nope")
    error_of(answer, 400)


async def test_wrong_types_are_422(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    tid = template["id"]
    bodies = [
        {"form_template_id": 5, "data": {}},
        {"form_template_id": tid, "data": "text"},
        {"form_template_id": tid, "data": ["a"]},
        {"form_template_id": tid, "data": None},
        {"form_template_id": tid},
        {"data": {}},
        {"form_template_id": tid, "data": {}, "scheduled_at": 5},
        {"form_template_id": tid, "data": {}, "scheduled_at": "tomorrow"},
        {"form_template_id": tid, "data": {}, "scheduled_at": "2030-01-01T00:00:00"},
        {"form_template_id": tid, "data": {}, "idempotency_key": 3},
        [{"form_template_id": tid, "data": {}}],
        "text",
        None,
    ]

    for body in bodies:
        error_of(await post_json(api, "/v1/submissions", body), 422)
    assert sink.requests == []


async def test_unknown_or_foreign_template_is_422_unknown_template(start_daemon):
    _, api = await start_daemon()
    token = await other_user(api)
    theirs = await api.request(
        "POST",
        "/v1/templates",
        {"name": "theirs", "method": "API", "target": {"url": "http://127.0.0.1:9/"}},
        token=token,
    )
    assert theirs[0] == 201, theirs

    errors = []
    for template_id in (str(uuid.uuid4()), "not-a-uuid", theirs[1]["id"]):
        body = {"form_template_id": template_id, "data": {"a": 1}}
        errors.append(error_of(await post_json(api, "/v1/submissions", body), 422))

    assert [e["code"] for e in errors] == ["unknown_template"] * 3
    # A foreign template is not told apart from a missing one.
    assert errors[2] == errors[0]


async def test_oversized_body_is_413(start_daemon):
    _, api = await start_daemon()
    data = {"blob": "x" * (1024 * 1024 + 10)}

    for path in ("/v1/submissions", "/v1/templates"):
        body = {"form_template_id": str(uuid.uuid4()), "data": data}
        error_of(await post_json(api, path, body), 413)


async def test_wrong_content_type_is_415(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    raw = json.dumps({"form_template_id": template["id"], "data": {}}).encode()

    for headers in (
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {},
    ):
        answer = await api.send("POST", "/v1/submissions", headers=headers, raw=raw)
        error_of(answer, 415)
    assert sink.requests == []


async def test_no_or_bad_token_is_401_with_www_authenticate(start_daemon):
    _, api = await start_daemon()
    cases: list[dict[str, str] | None] = [
        None,
        {"Authorization": "Bearer ptd_wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {api.token}"},
        {"Authorization": api.token},
    ]

    for headers in cases:
        for method, path in (("GET", "/v1/submissions"), ("POST", "/v1/templates")):
            answer = await api.send(
                method, path, headers=headers or {}, auth=False, raw=b"{}"
            )
            error_of(answer, 401)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")


async def test_non_admin_cannot_manage_users(start_daemon):
    _, api = await start_daemon()
    token = await other_user(api)

    answer = await api.send(
        "POST",
        "/v1/users",
        headers={**JSON, "Authorization": f"Bearer {token}"},
        raw=b'{"name": "eve"}',
        auth=False,
    )
    error_of(answer, 403)


async def test_foreign_submission_is_the_same_404_as_a_missing_one(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    mine = await api.submit(template["id"], {"a": 1}, scheduled_at=later(3600))
    token = await other_user(api)
    as_other = {"Authorization": f"Bearer {token}"}
    missing = str(uuid.uuid4())

    for method, suffix in (
        ("GET", ""),
        ("GET", "/attempts"),
        ("POST", "/retry"),
        ("POST", "/cancel"),
    ):
        foreign = await api.send(
            method,
            f"/v1/submissions/{mine['id']}{suffix}",
            headers=as_other,
            auth=False,
        )
        absent = await api.send(
            method, f"/v1/submissions/{missing}{suffix}", headers=as_other, auth=False
        )
        not_uuid = await api.send(
            method, f"/v1/submissions/nope-{suffix[1:]}{suffix}", headers=as_other
        )
        error_of(foreign, 404)
        error_of(absent, 404)
        error_of(not_uuid, 404)
        assert foreign.raw == absent.raw
    # Still untouched for its owner.
    assert (await api.ok("GET", f"/v1/submissions/{mine['id']}"))["status"] == "pending"


async def test_path_ids_that_are_not_uuids_are_404(start_daemon):
    _, api = await start_daemon()

    for method, path in (
        ("GET", "/v1/submissions/123"),
        ("GET", "/v1/submissions/..%2F..%2Fetc"),
        ("GET", "/v1/submissions/1/attempts"),
        ("GET", "/v1/templates/xyz"),
        ("DELETE", "/v1/templates/xyz"),
        ("POST", "/v1/users/xyz/token"),
        ("DELETE", "/v1/users/xyz"),
    ):
        error_of(await api.send(method, path), 404)


async def test_bad_list_queries_are_400(start_daemon):
    _, api = await start_daemon()

    for query in (
        "limit=501",
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "cursor=%%%",
        "cursor=bm9wZQ",
        "cursor=",
        "status=done",
    ):
        error_of(await api.send("GET", f"/v1/submissions?{query}"), 400)
    page = await api.ok("GET", "/v1/submissions?limit=500")
    assert page == {"items": [], "next_cursor": None}


async def test_fields_a_client_must_not_set_are_422(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})

    for extra in (
        {"status": "completed"},
        {"id": str(uuid.uuid4())},
        {"user_id": str(uuid.uuid4())},
        {"retry_count": 0},
        {"unknown": 1},
    ):
        body = {"form_template_id": template["id"], "data": {"a": 1}, **extra}
        error_of(await post_json(api, "/v1/submissions", body), 422)
    page = await api.ok("GET", "/v1/submissions")
    assert page["items"] == []


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep, itself counted as the first."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_data_nested_too_deep_is_422(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    tid = template["id"]

    error_of(
        await post_json(
            api, "/v1/submissions", {"form_template_id": tid, "data": nested(40)}
        ),
        422,
    )
    raw = (
        f'{{"form_template_id": "{tid}", "data": '.encode()
        + b'{"a": ' * 100000
        + b"1"
        + b"}" * 100001
    )
    answer = await api.send("POST", "/v1/submissions", headers=JSON, raw=raw)
    assert 400 <= answer.status < 500
    error_of(answer, answer.status)
    ok = await post_json(
        api,
        "/v1/submissions",
        {"form_template_id": tid, "data": nested(32), "scheduled_at": later(3600)},
    )
    assert ok.status == 202, ok.raw


async def test_idempotency_keys(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    body = {
        "form_template_id": template["id"],
        "data": {"a": 1, "b": [1, 2]},
        "scheduled_at": later(3600),
        "idempotency_key": "order-1",
    }

    first = await post_json(api, "/v1/submissions", body)
    same = await post_json(api, "/v1/submissions", dict(reversed(body.items())))
    other = await post_json(api, "/v1/submissions", {**body, "data": {"a": 2}})
    mismatch = await post_json(
        api, "/v1/submissions", body, **{"Idempotency-Key": "order-2"}
    )
    by_header = await post_json(
        api,
        "/v1/submissions",
        {k: v for k, v in body.items() if k != "idempotency_key"},
        **{"Idempotency-Key": "order-1"},
    )

    assert first.status == 202
    assert first.json["idempotency_key"] == "order-1"
    assert same.status == 200
    assert same.json["id"] == first.json["id"]
    error_of(other, 409)
    error_of(mismatch, 400)
    assert by_header.status == 200
    assert by_header.json["id"] == first.json["id"]
    page = await api.ok("GET", "/v1/submissions")
    assert [s["id"] for s in page["items"]] == [first.json["id"]]


async def test_retry_or_cancel_of_a_completed_submission_is_409(sink, start_daemon):
    sink.script("/x", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    sub = await api.submit(template["id"], {"a": 1})
    assert (await api.wait_final(sub["id"]))["status"] == "completed"

    error_of(await api.send("POST", f"/v1/submissions/{sub['id']}/retry"), 409)
    error_of(await api.send("POST", f"/v1/submissions/{sub['id']}/cancel"), 409)
    assert len(sink.seen("/x")) == 1


async def test_cancelled_scheduled_submission_is_never_delivered(sink, start_daemon):
    sink.script("/x", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    when = later(1.5)
    doomed = await api.submit(template["id"], {"n": 1}, scheduled_at=when)
    control = await api.submit(template["id"], {"n": 2}, scheduled_at=when)

    answer = await api.send("POST", f"/v1/submissions/{doomed['id']}/cancel")
    # The control, due at the same moment, proves that the moment has passed.
    delivered = await api.wait_final(control["id"])
    again = await api.send("POST", f"/v1/submissions/{doomed['id']}/cancel")
    final = await api.ok("GET", f"/v1/submissions/{doomed['id']}")

    assert answer.status == 200
    assert answer.json["status"] == "cancelled"
    assert answer.json["next_retry_at"] is None
    assert delivered["status"] == "completed"
    error_of(again, 409)
    assert final["status"] == "cancelled"
    assert await api.attempts(doomed["id"]) == []
    keys = [seen.headers["Idempotency-Key"] for seen in sink.seen("/x")]
    assert keys == [control["id"]]


async def test_batch_with_valid_and_invalid_items(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    good = {
        "form_template_id": template["id"],
        "data": {"n": 1},
        "scheduled_at": later(3600),
    }
    bad = {"form_template_id": str(uuid.uuid4()), "data": {"n": 2}}
    worse = {"form_template_id": template["id"], "data": "nope"}

    mixed = await post_json(api, "/v1/submissions/batch", {"items": [bad, good, worse]})
    none_valid = await post_json(api, "/v1/submissions/batch", {"items": [bad, worse]})

    assert mixed.status == 202, mixed.raw
    first, second, third = mixed.json["items"]
    assert set(first) == {"error"}
    assert first["error"]["code"] == "unknown_template"
    assert set(first["error"]) == {"code", "message", "details"}
    assert second["data"] == {"n": 1}
    assert second["status"] == "pending"
    assert set(third) == {"error"}
    stored = await api.ok("GET", f"/v1/submissions/{second['id']}")
    assert stored["form_template_id"] == template["id"]
    assert none_valid.status == 422
    assert [set(item) for item in none_valid.json["items"]] == [{"error"}] * 2
    page = await api.ok("GET", "/v1/submissions")
    assert [s["id"] for s in page["items"]] == [second["id"]]


def tpl(**fields: Any) -> dict[str, Any]:
    """A template body, valid unless `fields` spoil it."""
    body = {"name": "x", "method": "API", "target": {"url": "http://127.0.0.1:9/"}}
    body.update(fields)
    return body


async def answers_without_500(
    api: Any, cases: list[tuple[str, str, Any]]
) -> list[tuple[str, str, Any, int]]:
    """Send each case; check every 4xx's shape; return those answered 5xx."""
    server_errors = []
    for method, path, body in cases:
        raw = None if body is None else json.dumps(body).encode()
        answer = await api.send(method, path, headers=JSON, raw=raw)
        if answer.status >= 500:
            server_errors.append((method, path, body, answer.status))
        elif answer.status == 422 and "items" in answer.json:
            # A batch with no valid item: 422 with an error per item.
            items = answer.json["items"]
            assert all(set(item) == {"error"} for item in items), items
        elif answer.status >= 400:
            error_of(answer, answer.status)
    return server_errors


async def test_bad_input_never_gives_a_500(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    tid = template["id"]
    sub = await api.submit(tid, {"a": 1}, scheduled_at=later(3600))
    submissions = "/v1/submissions"
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/v1/templates", {"name": "x"}),
        ("POST", "/v1/templates", tpl(name="")),
        ("POST", "/v1/templates", tpl(name="a\nb")),
        ("POST", "/v1/templates", tpl(method="FTP")),
        ("POST", "/v1/templates", tpl(target="u")),
        ("POST", "/v1/templates", tpl(target={"url": "ftp://h/"})),
        ("POST", "/v1/templates", tpl(target={"url": "http://h/", "x": 1})),
        ("POST", "/v1/templates", tpl(max_retries=101)),
        ("POST", "/v1/templates", tpl(retry_backoff_seconds=1e308)),
        ("POST", "/v1/templates", tpl(field_map={"a": ""})),
        ("POST", "/v1/templates", tpl(field_map={"a": 5})),
        ("POST", "/v1/templates", tpl(required_fields="a")),
        ("POST", "/v1/templates", tpl(signing_secret="short")),
        ("POST", "/v1/templates", tpl(method="CUSTOM", target={"handler": "os:x"})),
        ("POST", "/v1/templates", tpl(method="FILE", target={"directory": 5})),
        ("PATCH", f"/v1/templates/{tid}", [1, 2]),
        ("PATCH", f"/v1/templates/{tid}", {"target": {"url": None}}),
        ("PATCH", f"/v1/templates/{tid}", {"timeout_seconds": 0}),
        ("POST", f"/v1/templates/{tid}/preview", {"data": 5}),
        ("POST", f"/v1/templates/{tid}/preview", [1]),
        ("POST", f"/v1/templates/{tid}/rotate-secret", {"grace_seconds": "x"}),
        ("POST", f"/v1/templates/{tid}/rotate-secret", {"grace_seconds": -1}),
        ("POST", "/v1/users", {"name": 5}),
        ("POST", "/v1/users", {"name": "admin"}),
        ("POST", "/v1/submissions/batch", {"items": []}),
        ("POST", "/v1/submissions/batch", {"items": "x"}),
        ("POST", "/v1/submissions/batch", [1]),
        ("POST", "/v1/submissions/batch", {"items": [1, None, "x"]}),
        ("POST", submissions, {"form_template_id": tid, "data": {"\x00": "\ud800"}}),
        ("POST", submissions, {"form_template_id": None, "data": {}}),
        (
            "POST",
            submissions,
            {"form_template_id": tid, "data": {}, "scheduled_at": ""},
        ),
        ("GET", "/v1/submissions?limit=99999999999999999999999", None),
        ("GET", "/v1/submissions?form_template_id=%00", None),
        ("GET", "/v1/submissions?cursor=czk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", None),
        ("DELETE", "/v1/submissions", None),
        ("PUT", f"/v1/submissions/{sub['id']}", {"a": 1}),
        ("GET", f"/v1/submissions/{sub['id']}x", None),
    ]

    assert await answers_without_500(api, cases) == []
    page = await api.ok("GET", "/v1/submissions?limit=500")
    assert sub["id"] in [s["id"] for s in page["items"]]


async def test_scheduled_at_out_of_the_calendar_is_not_a_500(sink, start_daemon):
    # Valid RFC 3339 times whose UTC instant falls in year 0 or year 10000.
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    cases: list[tuple[str, str, Any]] = [
        (
            "POST",
            "/v1/submissions",
            {"form_template_id": template["id"], "data": {}, "scheduled_at": when},
        )
        for when in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")
    ]

    assert await answers_without_500(api, cases) == []
    # Whatever was stored can still be listed.
    listing = await api.send("GET", "/v1/submissions?limit=500")
    assert listing.status == 200, listing.raw


async def test_limit_that_only_looks_like_digits_is_400(start_daemon):
    # str.isdigit() accepts these, but they are no integer.
    _, api = await start_daemon()

    for limit in ("%C2%B2", "%E2%91%A4"):  # superscript two, circled five
        error_of(await api.send("GET", f"/v1/submissions?limit={limit}"), 400)


async def test_pagination_walks_newest_first_without_duplicates(sink, start_daemon):
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    other = await api.template(method="API", target={"url": sink.url("/y")})
    created = [
        (await api.submit(template["id"], {"n": n}, scheduled_at=later(3600)))["id"]
        for n in range(5)
    ]
    elsewhere = await api.submit(other["id"], {"n": 9}, scheduled_at=later(3600))
    for sub_id in created[1:3]:
        await api.ok("POST", f"/v1/submissions/{sub_id}/cancel")

    pages = []
    query = f"/v1/submissions?limit=2&form_template_id={template['id']}"
    cursor = None
    for _ in range(4):
        page = await api.ok("GET", query + (f"&cursor={cursor}" if cursor else ""))
        pages.append([s["id"] for s in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)

    newest_first = created[::-1]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]
    everything = await api.ok("GET", "/v1/submissions?limit=500")
    assert [s["id"] for s in everything["items"]] == [elsewhere["id"], *newest_first]
    assert everything["next_cursor"] is None

    cancelled = await api.ok("GET", "/v1/submissions?status=cancelled")
    pending = await api.ok(
        "GET", f"/v1/submissions?status=pending&form_template_id={template['id']}"
    )
    assert [s["id"] for s in cancelled["items"]] == [created[2], created[1]]
    assert {s["status"] for s in cancelled["items"]} == {"cancelled"}
    assert [s["id"] for s in pending["items"]] == [created[4], created[3], created[0]]

    one = await api.ok("GET", "/v1/submissions?status=pending&limit=1")
    two = await api.ok(
        "GET", f"/v1/submissions?status=pending&limit=1&cursor={one['next_cursor']}"
    )
    assert [s["id"] for s in one["items"]] == [elsewhere["id"]]
    assert [s["id"] for s in two["items"]] == [created[4]]
