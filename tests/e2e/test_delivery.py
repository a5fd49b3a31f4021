"""Delivery over HTTP through the real daemon: outcomes, retries and backoff."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email.utils
import hashlib
import hmac
import json
import math
import time

import pytest

import ptdaemon
from tests.e2e.conftest import Reply, Seen, Sink, free_port

SECRET_BYTES = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(SECRET_BYTES).decode()
HTML = {"Content-Type": "text/html"}


def webhook_signature(seen: Seen) -> str:
    """The Standard Webhooks `v1,` signature of a received request."""
    signed = (
        f"{seen.headers['webhook-id']}.{seen.headers['webhook-timestamp']}.".encode()
        + seen.body
    )
    digest = hmac.new(SECRET_BYTES, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def test_503_twice_then_200_completes_after_three_attempts(sink, start_daemon):
    url = sink.script("/form", Reply(503), Reply(503), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.3, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])
    arrivals = sink.seen("/form")

    assert final["status"] == "completed"
    assert final["retry_count"] == 2
    assert final["error_category"] is None
    assert [a["outcome"] for a in attempts] == ["error", "error", "success"]
    assert [a["status"] for a in attempts] == [503, 503, 200]
    assert len(arrivals) == 3
    first_gap = arrivals[1].at - arrivals[0].at
    second_gap = arrivals[2].at - arrivals[1].at
    assert first_gap >= 0.3
    assert second_gap >= 0.6
    assert {r.headers["Idempotency-Key"] for r in arrivals} == {sub["id"]}


async def test_400_fails_at_once_as_remote_with_status_and_body(sink, start_daemon):
    reply = "bad field: name " + "x" * 5000
    url = sink.script("/form", then=Reply(400, body=reply))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote"
    assert final["retry_count"] == 0
    assert final["next_retry_at"] is None
    details = final["error_details"]
    assert details["retryable"] is False
    assert details["status"] == 400
    assert isinstance(details["exception"], str)
    assert details["body"] == reply[:4096]
    assert len(attempts) == 1
    assert attempts[0]["outcome"] == "error"
    assert attempts[0]["status"] == 400
    assert attempts[0]["error_category"] == "remote"
    assert len(sink.seen("/form")) == 1


async def test_retry_after_seconds_outweighs_a_short_backoff(sink, start_daemon):
    url = sink.script(
        "/busy", Reply(503, headers={"Retry-After": "1"}), then=Reply(200)
    )
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    arrivals = sink.seen("/busy")

    assert final["status"] == "completed"
    assert len(arrivals) == 2
    gap = arrivals[1].at - arrivals[0].at
    assert 1.0 <= gap < 10.0


async def test_retry_after_http_date_is_honoured(sink, start_daemon):
    _, api = await start_daemon()
    not_before = math.ceil(time.time()) + 2
    when = email.utils.formatdate(not_before, usegmt=True)
    url = sink.script("/busy", Reply(429, headers={"Retry-After": when}), then=Reply())
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    arrivals = sink.seen("/busy")

    assert final["status"] == "completed"
    assert len(arrivals) == 2
    assert arrivals[0].at < not_before
    assert not_before - 0.01 <= arrivals[1].at < not_before + 10


async def test_retry_after_past_the_cap_is_capped(sink, start_daemon):
    url = sink.script(
        "/busy", Reply(503, headers={"Retry-After": "3600"}), then=Reply()
    )
    _, api = await start_daemon()
    template = await api.template(
        method="API",
        target={"url": url},
        retry_backoff_seconds=0.05,
        retry_backoff_max_seconds=0.5,
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    arrivals = sink.seen("/busy")

    assert final["status"] == "completed"
    assert 0.5 <= arrivals[1].at - arrivals[0].at < 10


async def test_unreadable_retry_after_is_ignored(sink, start_daemon):
    url = sink.script(
        "/busy", Reply(503, headers={"Retry-After": "soon-ish"}), then=Reply()
    )
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"], timeout=10)

    assert final["status"] == "completed"
    assert len(sink.seen("/busy")) == 2


async def test_connection_refused_is_network_and_retried_to_the_end(start_daemon):
    url = f"http://127.0.0.1:{free_port()}/form"
    _, api = await start_daemon()
    template = await api.template(
        method="HTTP_POST",
        target={"url": url, "encoding": "form"},
        retry_backoff_seconds=0.05,
        max_retries=2,
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "network"
    assert final["error_details"]["retryable"] is True
    assert final["retry_count"] == 2
    assert len(attempts) == 3
    assert [a["error_category"] for a in attempts] == ["network"] * 3
    assert [a["status"] for a in attempts] == [None] * 3


async def test_a_reply_slower_than_the_timeout_is_a_timeout(sink, start_daemon):
    url = sink.script("/slow", then=Reply(200, delay=3))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=0.5, max_retries=0
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "timeout"
    assert final["error_details"]["retryable"] is True
    assert len(attempts) == 1
    assert attempts[0]["error_category"] == "timeout"
    assert attempts[0]["duration_ms"] < 2500


async def test_500s_until_the_budget_is_spent(sink, start_daemon):
    url = sink.script("/down", then=Reply(500, body="down"))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["retry_count"] == 3
    assert final["max_retries"] == 3
    assert final["next_retry_at"] is None
    assert final["error_category"] == "remote"
    assert final["error_details"]["status"] == 500
    assert final["error_details"]["retryable"] is True
    assert len(attempts) == 4
    assert [a["number"] for a in attempts] == [1, 2, 3, 4]
    assert [a["status"] for a in attempts] == [500] * 4
    assert len(sink.seen("/down")) == 4


async def test_idempotency_key_and_user_agent_on_every_attempt(sink, start_daemon):
    url = sink.script("/form", Reply(503), Reply(502), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="HTTP_POST",
        target={"url": url, "encoding": "form"},
        retry_backoff_seconds=0.05,
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    arrivals = sink.seen("/form")

    assert final["status"] == "completed"
    assert len(arrivals) == 3
    for seen in arrivals:
        assert seen.method == "POST"
        assert seen.headers["Idempotency-Key"] == sub["id"]
        assert seen.headers["User-Agent"] == f"ptdaemon/{ptdaemon.__version__}"
        assert seen.body == b"name=Ada"


async def test_2xx_with_a_non_json_body_completes_without_data(sink, start_daemon):
    url = sink.script(
        "/html", then=Reply(200, body=b"<html>thanks</html>", headers=HTML)
    )
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert final["response_data"] is None
    assert final["error_category"] is None
    assert attempts[0]["outcome"] == "success"
    assert attempts[0]["status"] == 200


async def test_api_json_reply_is_kept_as_response_data(sink, start_daemon):
    reply = {"id": 42, "state": "received", "tags": ["a", "ü"], "score": 1.5}
    url = sink.script(
        "/api",
        then=Reply(201, body=json.dumps(reply), headers={"Content-Type": "text/plain"}),
    )
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])

    assert final["status"] == "completed"
    assert final["response_data"] == reply
    assert (await api.attempts(sub["id"]))[0]["status"] == 201


async def test_2xx_whose_body_is_cut_short_still_completes(start_daemon):
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"partial": '
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _, api = await start_daemon()
        template = await api.template(
            method="API",
            target={"url": f"http://127.0.0.1:{port}/cut"},
            retry_backoff_seconds=0.05,
        )
        sub = await api.submit(template["id"], {"name": "Ada"})

        final = await api.wait_final(sub["id"])
    finally:
        server.close()
        await server.wait_closed()

    assert final["status"] == "completed"
    assert final["response_data"] is None
    assert len(await api.attempts(sub["id"])) == 1


# -- redirects (contract section 5) -------------------------------------------


@pytest.mark.parametrize("code", [302, 303])
async def test_web_form_see_other_completes_without_fetching(code, sink, start_daemon):
    thanks = sink.url("/thanks")
    url = sink.script("/form", then=Reply(code, headers={"Location": thanks}))
    _, api = await start_daemon()
    template = await api.template(
        method="HTTP_POST", target={"url": url, "encoding": "form"}
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert final["response_data"] == {"status": code, "location": thanks}
    assert [(a["outcome"], a["status"]) for a in attempts] == [("success", code)]
    assert len(sink.seen("/form")) == 1
    assert sink.seen("/thanks") == []


async def test_web_form_moved_permanently_fails_with_location(sink, start_daemon):
    moved = sink.url("/new-form")
    url = sink.script("/form", then=Reply(301, headers={"Location": moved}))
    _, api = await start_daemon()
    template = await api.template(
        method="HTTP_POST",
        target={"url": url, "encoding": "form"},
        retry_backoff_seconds=0.05,
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote"
    assert final["error_details"]["retryable"] is False
    assert final["error_details"]["status"] == 301
    assert final["error_details"]["location"] == moved
    assert len(await api.attempts(sub["id"])) == 1
    assert sink.seen("/new-form") == []


@pytest.mark.parametrize("code", [301, 302, 303])
async def test_api_redirect_fails_without_retry(code, sink, start_daemon):
    other = sink.url("/elsewhere")
    url = sink.script("/api", then=Reply(code, headers={"Location": other}))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote"
    assert final["error_details"]["retryable"] is False
    assert final["error_details"]["location"] == other
    assert len(await api.attempts(sub["id"])) == 1
    assert len(sink.seen("/api")) == 1
    assert sink.seen("/elsewhere") == []


@pytest.mark.parametrize(
    ("code", "method", "kind"),
    [(307, "PUT", "API"), (308, "PATCH", "API"), (307, "POST", "HTTP_POST")],
)
async def test_307_308_are_followed_with_the_same_request(
    code, method, kind, sink, start_daemon
):
    sink.script("/old", then=Reply(code, headers={"Location": "/new"}))
    sink.script("/new", then=Reply(200, body=b'{"ok": 1}'))
    _, api = await start_daemon()
    if kind == "API":
        target = {
            "url": sink.url("/old"),
            "method": method,
            "auth": {"type": "bearer", "token": "tok-1"},
        }
    else:
        target = {"url": sink.url("/old"), "encoding": "form"}
    template = await api.template(
        method=kind, target=target, signing_secret=SECRET, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada", "n": 1})

    final = await api.wait_final(sub["id"])
    [first] = sink.seen("/old")
    [second] = sink.seen("/new")

    assert final["status"] == "completed"
    assert final["response_data"] == {"ok": 1}
    assert len(await api.attempts(sub["id"])) == 1
    assert first.method == second.method == method
    assert first.body == second.body
    assert first.body
    for name in (
        "Content-Type",
        "User-Agent",
        "Idempotency-Key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ):
        assert first.headers[name] == second.headers[name], name
    assert second.headers["Idempotency-Key"] == sub["id"]
    if kind == "API":
        assert second.headers["Authorization"] == "Bearer tok-1"


async def test_signature_stays_the_same_across_a_slow_redirect(sink, start_daemon):
    # The contract: webhook-timestamp is the attempt's time, and a followed
    # redirect carries the same signature, even when the first hop took a while.
    sink.script("/old", then=Reply(307, headers={"Location": "/new"}, delay=1.2))
    sink.script("/new", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": sink.url("/old")}, signing_secret=SECRET
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    [first] = sink.seen("/old")
    [second] = sink.seen("/new")

    assert final["status"] == "completed"
    for seen in (first, second):
        assert seen.headers["webhook-id"] == sub["id"]
        assert webhook_signature(seen) in seen.headers["webhook-signature"].split()
    assert second.headers["webhook-timestamp"] == first.headers["webhook-timestamp"]
    assert second.headers["webhook-signature"] == first.headers["webhook-signature"]


@pytest.mark.parametrize(
    ("auth", "header"),
    [
        ({"type": "bearer", "token": "tok-1"}, "Authorization"),
        ({"type": "basic", "username": "u", "password": "p"}, "Authorization"),
        ({"type": "header", "name": "X-Api-Key", "value": "key-1"}, "X-Api-Key"),
    ],
)
async def test_credentials_are_dropped_when_a_redirect_changes_origin(
    auth, header, sink, start_daemon
):
    other = Sink()
    await other.start()
    try:
        elsewhere = other.script("/there", then=Reply(200))
        url = sink.script("/here", then=Reply(307, headers={"Location": elsewhere}))
        _, api = await start_daemon()
        template = await api.template(method="API", target={"url": url, "auth": auth})
        sub = await api.submit(template["id"], {"name": "Ada"})
        final = await api.wait_final(sub["id"])
    finally:
        await other.stop()
    [first] = sink.seen("/here")
    [second] = other.seen("/there")

    assert final["status"] == "completed"
    assert header in first.headers
    assert header not in second.headers
    assert second.headers["Idempotency-Key"] == sub["id"]
    assert second.body == first.body


async def test_a_loop_of_307s_stops_after_five_hops(sink, start_daemon):
    sink.script("/loop", then=Reply(307, headers={"Location": "/loop"}))
    _, api = await start_daemon()
    template = await api.template(
        method="API",
        target={"url": sink.url("/loop")},
        retry_backoff_seconds=0.05,
        max_retries=2,
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote"
    assert final["error_details"]["retryable"] is False
    assert len(await api.attempts(sub["id"])) == 1
    # The first request and five followed hops, then it gives up.
    assert len(sink.seen("/loop")) == 6


# -- lifecycle around delivery ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retried"),
    [(408, True), (425, True), (429, True), (404, False), (410, False)],
)
async def test_which_4xx_are_retried(code, retried, sink, start_daemon):
    url = sink.script("/form", Reply(code), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == ("completed" if retried else "failed")
    assert [a["status"] for a in attempts] == ([code, 200] if retried else [code])
    assert attempts[0]["error_category"] == "remote"
    assert attempts[0]["error_details"]["retryable"] is retried


async def test_success_clears_the_last_error(sink, start_daemon):
    url = sink.script("/form", Reply(503, body="busy"), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])

    assert final["status"] == "completed"
    assert final["error_message"] is None
    assert final["error_category"] is None
    assert final["error_details"] is None
    assert final["next_retry_at"] is None
    assert final["retry_count"] == 1
    assert isinstance(final["processing_duration_ms"], int)
    assert final["processing_completed_at"].endswith("Z")


async def test_manual_retry_of_a_failed_submission(sink, start_daemon):
    url = sink.script("/form", Reply(400, body="no"), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05, max_retries=1
    )
    sub = await api.submit(template["id"], {"name": "Ada"})
    failed = await api.wait_final(sub["id"])

    answer = await api.send("POST", f"/v1/submissions/{sub['id']}/retry")
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert failed["status"] == "failed"
    assert answer.status == 202
    assert answer.json["status"] in ("pending", "processing", "completed")
    assert answer.json["retry_count"] == 0
    assert final["status"] == "completed"
    assert [(a["number"], a["status"]) for a in attempts] == [(1, 400), (2, 200)]
    keys = {seen.headers["Idempotency-Key"] for seen in sink.seen("/form")}
    assert keys == {sub["id"]}


async def test_cancel_while_retrying_stops_delivery(sink, start_daemon):
    url = sink.script("/form", then=Reply(503, headers={"Retry-After": "2"}))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.05
    )
    sub = await api.submit(template["id"], {"name": "Ada"})
    retrying = await api.wait_final(sub["id"], states=("retrying",))

    answer = await api.send("POST", f"/v1/submissions/{sub['id']}/cancel")
    await asyncio.sleep(2.5)
    final = await api.ok("GET", f"/v1/submissions/{sub['id']}")

    assert retrying["next_retry_at"] is not None
    assert answer.status == 200
    assert answer.json["status"] == "cancelled"
    assert final["status"] == "cancelled"
    assert final["next_retry_at"] is None
    assert len(sink.seen("/form")) == 1


async def test_a_due_submission_is_not_held_up_by_a_later_one(sink, start_daemon):
    url = sink.script("/form", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    hour = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    waiting = await api.submit(template["id"], {"n": 1}, scheduled_at=hour.isoformat())

    due = await api.submit(template["id"], {"n": 2})
    final = await api.wait_final(due["id"], timeout=10)
    untouched = await api.ok("GET", f"/v1/submissions/{waiting['id']}")

    assert final["status"] == "completed"
    assert untouched["status"] == "pending"
    keys = [seen.headers["Idempotency-Key"] for seen in sink.seen("/form")]
    assert keys == [due["id"]]
