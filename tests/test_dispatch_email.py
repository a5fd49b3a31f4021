"""Tests of the EMAIL dispatcher against a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import csv
import email
import io
import json
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.policy import compat32
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme

from ptdaemon.config import Secret, SmtpConfig
from ptdaemon.dispatch.base import Delivery
from ptdaemon.dispatch.email import EmailDispatcher
from ptdaemon.errors import ConfigError, DeliveryError, InvalidError
from ptdaemon.models import EmailTarget, ErrorCategory, Method, Template
from tests.e2e.conftest import free_port
from tests.factories import make_template
from tests.smtp_sink import DROP, SmtpSink

STARTED_AT = datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC).timestamp()
SUB_ID = "5f0c7a52-8a47-4a43-9d43-0cfa3d9e1b11"

Deliver = Callable[..., Delivery]


def _template(target: dict[str, Any], name: str, timeout: float) -> Template:
    return make_template(
        Method.EMAIL,
        target,
        name=name,
        timeout_seconds=timeout,
        created_at=STARTED_AT,
        updated_at=STARTED_AT,
    )


def delivery(
    target: dict[str, Any],
    payload: dict[str, Any] | None = None,
    *,
    name: str = "city-permit",
    sub_id: str = SUB_ID,
    attempt: int = 1,
    timeout: float = 10.0,
) -> Delivery:
    return Delivery(
        submission_id=sub_id,
        attempt=attempt,
        template=_template(target, name, timeout),
        payload={"full_name": "Ada", "mail": "ada@example.org"}
        if payload is None
        else payload,
        started_at=STARTED_AT,
    )


def smtp_config(port: int, **fields: Any) -> SmtpConfig:
    values = {
        "host": "127.0.0.1",
        "port": port,
        "from": "forms@example.org",
        "timeout_seconds": 5.0,
        **fields,
    }
    return msgspec.convert(values, SmtpConfig)


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = SmtpSink(refuse=frozenset({"nobody@example.org"}))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def dispatcher(sink: SmtpSink) -> AsyncIterator[EmailDispatcher]:
    sender = EmailDispatcher(smtp_config(sink.port))
    yield sender
    await sender.close()


SIMPLE = {"to": ["{mail}"], "subject": "New {full_name}", "body": "Hello {full_name}"}


async def test_message_arrives_with_recipients_headers_body_and_json_attachment(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    target = {
        "to": ["Clerk <clerk@example.org>", "{mail}"],
        "cc": ["audit@example.org"],
        "bcc": ["archive@example.org"],
        "reply_to": "{full_name} <{mail}>",
        "subject": "Permit for {full_name}",
        "body": "Applicant: {full_name}\nZip: {zip}\n",
        "attach": "json",
    }
    payload = {"full_name": "Ada", "mail": "ada@example.org", "zip": "N1 9GU"}

    result = await dispatcher.deliver(delivery(target, payload))

    [received] = sink.received
    message = received.message
    assert received.mail_from == "forms@example.org"
    assert received.rcpt_tos == [
        "clerk@example.org",
        "ada@example.org",
        "audit@example.org",
        "archive@example.org",
    ]
    assert message["From"] == "forms@example.org"
    assert message["To"] == "Clerk <clerk@example.org>, ada@example.org"
    assert message["Cc"] == "audit@example.org"
    assert message["Bcc"] is None
    assert "archive@example.org" not in received.raw.decode("ascii")
    assert message["Reply-To"] == "Ada <ada@example.org>"
    assert message["Subject"] == "Permit for Ada"
    assert parsedate_to_datetime(message["Date"]).timestamp() == STARTED_AT
    assert message["Message-ID"] == f"<{SUB_ID}@example.org>"
    assert message["Auto-Submitted"] == "auto-generated"
    body = message.get_body(("plain",))
    assert body is not None
    assert body.get_content() == "Applicant: Ada\nZip: N1 9GU\n"
    [attachment] = message.iter_attachments()
    assert attachment.get_content_type() == "application/json"
    assert attachment.get_filename() == "city-permit.json"
    assert json.loads(attachment.get_content()) == payload
    assert result.status == 250
    assert result.response_data == {
        "message_id": f"<{SUB_ID}@example.org>",
        "refused": [],
    }


async def test_csv_attachment_is_utf8_with_formulas_neutralised(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    target = {**SIMPLE, "attach": "csv"}
    payload = {"full_name": "=HYPERLINK(1)", "mail": "ada@example.org", "n": -5}

    await dispatcher.deliver(delivery(target, payload))

    [attachment] = sink.received[0].message.iter_attachments()
    assert attachment.get_content_type() == "text/csv"
    assert attachment.get_content_charset() == "utf-8"
    rows = list(csv.reader(io.StringIO(attachment.get_content())))
    assert rows == [
        ["full_name", "mail", "n"],
        ["'=HYPERLINK(1)", "ada@example.org", "-5"],
    ]


async def test_non_ascii_subject_name_body_and_file_name_round_trip(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    name = "Zoë Ærøskøbing 申請 📨"
    long_name = " ".join([name] * 4)
    subject = "Antrag für " + " ".join(["Grüße 🎉 日本語の件名"] * 6)
    target = {
        "to": ["{name} <zoe@example.org>"],
        "cc": ["{long_name} <long@example.org>"],
        "subject": "{subject}",
        "body": "Grüße, {name}! 🎉",
        "attach": "json",
    }
    payload = {"name": name, "long_name": long_name, "subject": subject}

    await dispatcher.deliver(delivery(target, payload, name="Antrag Müller 申請"))

    [received] = sink.received
    message = received.message
    raw = received.raw.decode("ascii")  # every non-ASCII byte was encoded
    assert all(len(line) <= 78 for line in raw.split("\r\n")[:20])
    assert message["Subject"] == subject
    assert message["To"].addresses[0].display_name == name
    # Python 3.11's own parser adds a space between the encoded words of a
    # long name; the RFC 2047 decoder reads them back as written.
    raw_cc = email.message_from_bytes(received.raw, policy=compat32)["Cc"]
    cc = make_header(decode_header(raw_cc.split("<")[0]))
    assert str(cc).strip() == long_name
    body = message.get_body(("plain",))
    assert body is not None
    # Base64 text carries the canonical CRLF line ends of RFC 2045.
    assert body.get_content().replace("\r\n", "\n") == f"Grüße, {name}! 🎉\n"
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "Antrag Müller 申請.json"
    assert json.loads(attachment.get_content()) == payload


async def test_one_connection_is_reused_and_message_id_is_stable(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    for attempt in (1, 2, 3):
        await dispatcher.deliver(delivery(SIMPLE, attempt=attempt))

    assert sink.connections == 1
    assert {r.message["Message-ID"] for r in sink.received} == {
        f"<{SUB_ID}@example.org>"
    }


async def test_a_connection_the_server_closed_is_opened_again(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    await dispatcher.deliver(delivery(SIMPLE))
    sink.drop_connections()
    await asyncio.sleep(0.05)  # the close reaches the client

    await dispatcher.deliver(delivery(SIMPLE, sub_id="second"))

    assert sink.connections == 2
    assert len(sink.received) == 2


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [("451 4.3.0 try again later", True), ("550 5.7.1 rejected by policy", False)],
)
async def test_smtp_reply_code_decides_retry_and_is_kept(
    sink: SmtpSink, dispatcher: EmailDispatcher, reply: str, retryable: bool
):
    sink.script(reply)

    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(SIMPLE))

    error = caught.value
    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is retryable
    assert error.status == int(reply[:3])
    assert error.details["body"] == reply[4:]
    # The connection stays usable after a refusal.
    await dispatcher.deliver(delivery(SIMPLE))
    assert sink.connections == 1


async def test_a_dropped_session_is_a_retryable_network_error(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    sink.script(DROP)

    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(SIMPLE))
    await dispatcher.deliver(delivery(SIMPLE))

    assert caught.value.category is ErrorCategory.NETWORK
    assert caught.value.retryable is True
    assert len(sink.received) == 1
    assert sink.connections == 2


async def test_some_refused_recipients_complete_and_are_listed(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    target = {**SIMPLE, "to": ["{mail}", "nobody@example.org"]}

    result = await dispatcher.deliver(delivery(target))

    assert sink.received[0].rcpt_tos == ["ada@example.org"]
    assert result.response_data["refused"] == [
        {
            "address": "nobody@example.org",
            "status": 550,
            "reply": "5.1.1 no such mailbox",
        }
    ]


async def test_every_recipient_refused_is_final(
    sink: SmtpSink, dispatcher: EmailDispatcher
):
    target = {**SIMPLE, "to": ["nobody@example.org"]}

    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(target))

    assert caught.value.category is ErrorCategory.REMOTE
    assert caught.value.retryable is False
    assert caught.value.status == 550
    assert sink.received == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"full_name": "Ada"}, "mail"),
        ({"full_name": "Ada", "mail": "not an address"}, "target.to"),
        ({"full_name": "Ada", "mail": "a@example.org, b@example.org"}, "target.to"),
        ({"full_name": "Ada", "mail": "a@example.org\r\nBcc: b@x.org"}, "target.to"),
    ],
    ids=["missing field", "not an address", "two addresses", "header injection"],
)
async def test_bad_data_is_a_validation_error_that_names_the_field(
    sink: SmtpSink, dispatcher: EmailDispatcher, payload: dict[str, Any], field: str
):
    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(SIMPLE, payload))

    assert caught.value.category is ErrorCategory.VALIDATION
    assert caught.value.retryable is False
    assert caught.value.details["field"] == field
    assert sink.data_count == 0


@pytest.mark.parametrize("value", ["Ada\r\nBcc: evil@example.org", "Ada\nX", "Ada\0"])
async def test_a_line_break_in_the_subject_data_fails_as_validation(
    sink: SmtpSink, dispatcher: EmailDispatcher, value: str
):
    payload = {"full_name": value, "mail": "a@example.org"}

    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(SIMPLE, payload))

    assert caught.value.category is ErrorCategory.VALIDATION
    assert caught.value.retryable is False
    assert "line break" in str(caught.value)
    assert sink.data_count == 0


async def test_placeholders_reach_no_attribute_of_python_objects(
    dispatcher: EmailDispatcher,
):
    target = {**SIMPLE, "subject": "{full_name.__class__}"}

    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery(target))

    assert caught.value.category is ErrorCategory.VALIDATION


def test_check_target_refuses_bad_literal_addresses_and_placeholders():
    sender = EmailDispatcher(smtp_config(25))
    good = EmailTarget(to=["{mail}", "Clerk <c@example.org>"], subject="{a}")
    sender.check_target(good)

    for bad in (
        EmailTarget(to=[], subject="s"),
        EmailTarget(to=["clerk"], subject="s"),
        EmailTarget(to=["a@example.org"], cc=["x@"], subject="s"),
        EmailTarget(to=["a@example.org"], subject="{a.b[0]}"),
        EmailTarget(to=["a@example.org"], reply_to="{", subject="s"),
        EmailTarget(to=["a@example.org"], subject="Hi\r\nBcc: x@example.org"),
        EmailTarget(to=["a@example.org"], subject="Hi\0"),
        EmailTarget(to=["a@example.org\n"], subject="s"),
    ):
        with pytest.raises(InvalidError):
            sender.check_target(bad)


def test_a_from_address_that_is_not_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"smtp\.from"):
        EmailDispatcher(smtp_config(25, **{"from": "forms"}))


async def test_connection_refused_is_a_network_error():
    sender = EmailDispatcher(smtp_config(free_port()))

    with pytest.raises(DeliveryError) as caught:
        await sender.deliver(delivery(SIMPLE))

    assert caught.value.category is ErrorCategory.NETWORK
    assert caught.value.retryable is True


async def test_a_server_that_never_answers_times_out():
    transports: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # accepts, never greets

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = EmailDispatcher(smtp_config(port))
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.deliver(delivery(SIMPLE, timeout=0.3))
    finally:
        await sender.close()
        for transport in transports:
            transport.close()
        server.close()
        await server.wait_closed()

    assert caught.value.category is ErrorCategory.TIMEOUT
    assert caught.value.retryable is True


# -- TLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_starttls_with_login(ca: trustme.CA, ca_file: Path):
    sink = SmtpSink(starttls=server_context(ca), login=("forms", "pa55-wörd"))
    await sink.start()
    config = smtp_config(sink.port, tls="starttls", username="forms")
    sender = EmailDispatcher(config, password=Secret("pa55-wörd"), ca_path=ca_file)
    try:
        await sender.deliver(delivery(SIMPLE))
    finally:
        await sender.close()
        await sink.stop()

    assert sink.logins == ["forms"]
    assert len(sink.received) == 1


async def test_implicit_tls(ca: trustme.CA, ca_file: Path):
    sink = SmtpSink(tls=server_context(ca))
    await sink.start()
    sender = EmailDispatcher(smtp_config(sink.port, tls="implicit"), ca_path=ca_file)
    try:
        await sender.deliver(delivery(SIMPLE))
    finally:
        await sender.close()
        await sink.stop()

    assert len(sink.received) == 1


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_an_untrusted_certificate_is_a_network_error(ca: trustme.CA, tls: str):
    context = server_context(ca)
    sink = SmtpSink(tls=context) if tls == "implicit" else SmtpSink(starttls=context)
    await sink.start()
    sender = EmailDispatcher(smtp_config(sink.port, tls=tls))
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.deliver(delivery(SIMPLE))
    finally:
        await sender.close()
        await sink.stop()

    assert caught.value.category is ErrorCategory.NETWORK
    assert caught.value.retryable is True
    assert "issuer certificate" in caught.value.message
    assert sink.received == []
