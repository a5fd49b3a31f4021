"""EMAIL and CUSTOM delivery through the real `ptdaemon serve` process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.smtp_sink import DROP, SmtpSink

StartDaemon = Callable[..., Any]


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpSink]:
    server = SmtpSink()
    await server.start()
    yield server
    await server.stop()


def smtp_section(sink: SmtpSink) -> str:
    return (
        "[smtp]\n"
        'host = "127.0.0.1"\n'
        f"port = {sink.port}\n"
        'from = "Forms Robot <forms@example.org>"\n'
        "timeout_seconds = 5\n"
    )


EMAIL_TARGET = {
    "to": ["Permit Office <permits@example.org>"],
    "cc": ["{email}"],
    "subject": "Permit request from {applicant}",
    "body": "Applicant: {applicant}\nPostcode: {zip}\n",
    "attach": "json",
}
FIELD_MAP = {"applicant": "full_name", "zip": "address.postcode", "email": "email"}
DATA = {
    "full_name": "Zoë Ærøskøbing",
    "email": "zoe@example.org",
    "address": {"postcode": "N1 9GU"},
}


async def test_an_email_submission_is_delivered(start_daemon: StartDaemon, smtp):
    _, api = await start_daemon(smtp_section(smtp))
    template = await api.template(
        name="Bauantrag Köln",
        method="EMAIL",
        target=EMAIL_TARGET,
        field_map=FIELD_MAP,
    )

    sub = await api.submit(template["id"], DATA)
    final = await api.wait_final(sub["id"])

    assert final["status"] == "completed", final
    [received] = smtp.received
    message = received.message
    assert received.mail_from == "forms@example.org"
    assert received.rcpt_tos == ["permits@example.org", "zoe@example.org"]
    assert message["Subject"] == "Permit request from Zoë Ærøskøbing"
    assert message["Message-ID"] == f"<{sub['id']}@example.org>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Date"]
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "Bauantrag Köln.json"
    assert json.loads(attachment.get_content()) == {
        "applicant": "Zoë Ærøskøbing",
        "zip": "N1 9GU",
        "email": "zoe@example.org",
    }
    assert final["response_data"] == {
        "message_id": f"<{sub['id']}@example.org>",
        "refused": [],
    }


async def test_451_then_250_completes_after_two_attempts_with_one_message_id(
    start_daemon: StartDaemon, smtp: SmtpSink
):
    smtp.script("451 4.7.1 greylisted, come back later")
    _, api = await start_daemon(smtp_section(smtp))
    template = await api.template(
        method="EMAIL", target=EMAIL_TARGET, field_map=FIELD_MAP
    )

    sub = await api.submit(template["id"], DATA)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert [a["outcome"] for a in attempts] == ["error", "success"]
    assert attempts[0]["status"] == 451
    assert attempts[0]["error_category"] == "remote"
    assert attempts[0]["error_details"]["retryable"] is True
    assert attempts[0]["error_details"]["body"] == "4.7.1 greylisted, come back later"
    ids = {offered.message["Message-ID"] for offered in smtp.offered}
    assert len(smtp.offered) == 2
    assert ids == {f"<{sub['id']}@example.org>"}
    assert len(smtp.received) == 1


async def test_a_connection_dropped_mid_session_is_retried(
    start_daemon: StartDaemon, smtp: SmtpSink
):
    smtp.script(DROP)
    _, api = await start_daemon(smtp_section(smtp))
    template = await api.template(
        method="EMAIL", target=EMAIL_TARGET, field_map=FIELD_MAP
    )

    sub = await api.submit(template["id"], DATA)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert attempts[0]["error_category"] == "network"
    assert attempts[0]["error_details"]["retryable"] is True
    assert len(smtp.received) == 1
    assert smtp.connections == 2


async def test_550_fails_at_once_and_keeps_the_code(
    start_daemon: StartDaemon, smtp: SmtpSink
):
    smtp.script("550 5.7.1 relaying denied")
    _, api = await start_daemon(smtp_section(smtp))
    template = await api.template(
        method="EMAIL", target=EMAIL_TARGET, field_map=FIELD_MAP
    )

    sub = await api.submit(template["id"], DATA)
    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote"
    assert final["error_details"]["status"] == 550
    assert final["error_details"]["retryable"] is False
    assert final["error_details"]["body"] == "5.7.1 relaying denied"
    assert len(await api.attempts(sub["id"])) == 1


async def test_a_bad_address_in_the_data_fails_as_validation(
    start_daemon: StartDaemon, smtp: SmtpSink
):
    _, api = await start_daemon(smtp_section(smtp))
    template = await api.template(
        method="EMAIL", target=EMAIL_TARGET, field_map=FIELD_MAP
    )

    sub = await api.submit(template["id"], {**DATA, "email": "zoe at example"})
    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "validation"
    assert "target.cc" in final["error_message"]
    assert smtp.data_count == 0


async def test_a_bad_literal_address_is_refused_when_saved(
    start_daemon: StartDaemon, smtp: SmtpSink
):
    _, api = await start_daemon(smtp_section(smtp))

    status, error = await api.request(
        "POST",
        "/v1/templates",
        {"name": "x", "method": "EMAIL", "target": {"to": ["clerk"], "subject": "s"}},
    )

    assert status == 422
    assert error["error"]["details"] == {"field": "target.to[0]"}


# -- CUSTOM --------------------------------------------------------------------


async def test_a_plugin_from_an_entry_point_delivers(start_daemon: StartDaemon):
    _, api = await start_daemon()
    template = await api.template(
        name="registry", method="CUSTOM", target={"handler": "test-echo"}
    )

    sub = await api.submit(template["id"], {"full_name": "Ada"})
    final = await api.wait_final(sub["id"])

    assert final["status"] == "completed"
    assert final["response_data"] == {
        "payload": {"full_name": "Ada"},
        "submission_id": sub["id"],
        "attempt": 1,
        "template_name": "registry",
        "thread": "sync",
    }


async def test_a_plugin_that_asks_for_a_retry_completes_on_the_second_attempt(
    start_daemon: StartDaemon,
):
    _, api = await start_daemon()
    template = await api.template(method="CUSTOM", target={"handler": "test-retry"})

    sub = await api.submit(template["id"], {"full_name": "Ada"})
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert final["response_data"] == {"accepted_on": 2}
    assert attempts[0]["error_category"] == "remote"


async def test_a_crashing_plugin_is_retried_as_system_with_its_traceback(
    start_daemon: StartDaemon,
):
    _, api = await start_daemon()
    template = await api.template(
        method="CUSTOM", target={"handler": "test-crash"}, max_retries=1
    )

    sub = await api.submit(template["id"], {"full_name": "Ada"})
    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "system"
    assert final["error_details"]["retryable"] is True
    assert "KeyError" in final["error_details"]["traceback"]
    assert len(await api.attempts(sub["id"])) == 2


async def test_a_hung_plugin_times_out_while_the_daemon_stays_responsive(
    start_daemon: StartDaemon,
):
    process, api = await start_daemon(grace=1.0)
    hang = await api.template(
        method="CUSTOM",
        target={"handler": "test-hang"},
        timeout_seconds=1,
        max_retries=0,
    )
    echo = await api.template(method="CUSTOM", target={"handler": "test-async-echo"})

    hung = await api.submit(hang["id"], {"n": 1})
    await api.wait_final(hung["id"], states=("processing",))
    # While the plugin blocks its thread, the API answers and others deliver.
    status, _ = await api.request("GET", "/healthz")
    other = await api.wait_final((await api.submit(echo["id"], {"n": 2}))["id"])
    final = await api.wait_final(hung["id"])

    assert status == 200
    assert other["status"] == "completed"
    assert final["status"] == "failed"
    assert final["error_category"] == "timeout"
    # A thread still stuck in the plugin does not hold up the exit.
    assert await process.terminate() == 0


async def test_an_unknown_plugin_is_refused_when_saved(start_daemon: StartDaemon):
    _, api = await start_daemon()

    status, error = await api.request(
        "POST",
        "/v1/templates",
        {"name": "p", "method": "CUSTOM", "target": {"handler": "no-such-plugin"}},
    )

    assert status == 422
    assert error["error"]["code"] == "unknown_handler"
    assert "no-such-plugin" in error["error"]["message"]


async def test_only_an_admin_may_create_or_switch_to_a_custom_template(
    start_daemon: StartDaemon, sink
):
    _, api = await start_daemon()
    clerk = await api.ok("POST", "/v1/users", {"name": "clerk"})
    token = clerk["token"]
    custom = {"name": "p", "method": "CUSTOM", "target": {"handler": "test-echo"}}
    http = {"name": "h", "method": "API", "target": {"url": sink.url("/x")}}

    created, _ = await api.request("POST", "/v1/templates", custom, token=token)
    status, own = await api.request("POST", "/v1/templates", http, token=token)
    patched, error = await api.request(
        "PATCH",
        f"/v1/templates/{own['id']}",
        {"method": "CUSTOM", "target": {"handler": "test-echo"}},
        token=token,
    )

    assert created == 403
    assert status == 201
    assert patched == 403
    assert error["error"]["code"] == "forbidden"
