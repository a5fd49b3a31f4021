"""HTTP_POST and API delivery, one module at a time: no daemon, no real network."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from multidict import CIMultiDict
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from yarl import URL

from ptdaemon import __version__
from ptdaemon.dispatch.base import Delivery
from ptdaemon.dispatch.http import HttpDispatcher, build_request, encode_form, judge
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import ErrorCategory, Method, Template
from ptdaemon.netpolicy import AddressPolicy
from ptdaemon.signing import generate_secret, secret_bytes
from tests import factories

URL_TEXT = "https://forms.example.test/submit"
KIB = 1024
UNICODE_PAYLOAD: dict[str, Any] = {
    "名前": "Zoë Ångström 😀",
    "city": "Łódź",
    "amount": 1.5,
    "agree": True,
    "tags": ["ä", "b"],
}


def make_template(
    method: Method = Method.HTTP_POST,
    target: dict[str, Any] | None = None,
    **fields: Any,
) -> Template:
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "user_id": str(uuid.uuid4()),
        "name": "t",
        "retry_backoff_seconds": 1.0,
        "retry_backoff_max_seconds": 60.0,
        "timeout_seconds": 5.0,
        "created_at": 1.0,
        "updated_at": 1.0,
    }
    values.update(fields)
    return factories.make_template(method, target or {"url": URL_TEXT}, **values)


def make_delivery(
    template: Template, payload: dict[str, Any] | None = None
) -> Delivery:
    return Delivery(
        submission_id=str(uuid.uuid4()),
        attempt=1,
        template=template,
        payload={"name": "Ada"} if payload is None else payload,
        started_at=time.time(),
    )


def reply_headers(**headers: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})


def refused(method: Method, status: int, body: bytes = b"", **headers: str) -> Any:
    with pytest.raises(DeliveryError) as caught:
        judge(method, status, reply_headers(**headers), body)
    return caught.value


# -- judge: the verdict of a final reply ---------------------------------------


@pytest.mark.parametrize("method", [Method.HTTP_POST, Method.API])
@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_with_a_json_body_completes_with_the_parsed_body(method, status):
    body = json.dumps({"ok": True, "ref": "Ä-1"}).encode()

    result = judge(method, status, reply_headers(), body)

    assert result.status == status
    assert result.response_data == {"ok": True, "ref": "Ä-1"}
    assert result.reply == body.decode()


@pytest.mark.parametrize("method", [Method.HTTP_POST, Method.API])
@pytest.mark.parametrize(
    "body", [b"", b"<html>thanks</html>", b'{"cut": ', b"\xff\xfe not utf-8"]
)
def test_2xx_with_a_body_that_is_not_json_completes_without_data(method, body):
    result = judge(method, 200, reply_headers(Content_Type="application/json"), body)

    assert result.status == 200
    assert result.response_data is None


def test_2xx_json_is_parsed_whatever_the_content_type():
    result = judge(Method.API, 200, reply_headers(Content_Type="text/plain"), b"[1]")

    assert result.response_data == [1]


@pytest.mark.parametrize("status", [302, 303])
def test_web_form_302_303_completes_with_status_and_location(status):
    result = judge(
        Method.HTTP_POST, status, reply_headers(Location="/thanks?id=7"), b"see"
    )

    assert result.status == status
    assert result.response_data == {"status": status, "location": "/thanks?id=7"}


def test_web_form_301_fails_as_remote_not_retried_with_location():
    error = refused(Method.HTTP_POST, 301, b"moved", Location="https://new.test/f")

    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is False
    assert error.status == 301
    assert error.details["location"] == "https://new.test/f"
    assert error.details["status"] == 301
    assert error.details["body"] == "moved"


@pytest.mark.parametrize("status", [301, 302, 303])
def test_api_redirects_fail_as_remote_not_retried_with_location(status):
    error = refused(Method.API, status, b"", Location="https://elsewhere.test/x")

    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is False
    assert error.status == status
    assert error.details["location"] == "https://elsewhere.test/x"


@pytest.mark.parametrize("method", [Method.HTTP_POST, Method.API])
@pytest.mark.parametrize("status", [300, 304])
def test_other_3xx_fail_as_remote_not_retried(method, status):
    error = refused(method, status, b"choose")

    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is False
    assert error.details["status"] == status
    assert error.details["body"] == "choose"


@pytest.mark.parametrize("method", [Method.HTTP_POST, Method.API])
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 451])
def test_client_errors_fail_as_remote_not_retried(method, status):
    error = refused(method, status, b'{"error": "bad zip"}', Retry_After="5")

    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is False
    assert error.status == status
    assert error.details["status"] == status
    assert error.details["body"] == '{"error": "bad zip"}'
    assert isinstance(error.details["exception"], str)


@pytest.mark.parametrize("method", [Method.HTTP_POST, Method.API])
@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_busy_answers_are_remote_and_retried(method, status):
    error = refused(method, status, b"busy")

    assert error.category is ErrorCategory.REMOTE
    assert error.retryable is True
    assert error.status == status
    assert error.details["status"] == status
    assert error.details["body"] == "busy"
    assert error.retry_after_seconds is None


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 7 ", 7.0)])
def test_retry_after_in_seconds_is_read(value, seconds):
    error = refused(Method.API, 429, Retry_After=value)

    assert error.retry_after_seconds == seconds


def test_retry_after_as_an_http_date_is_read_as_seconds_from_now():
    when = datetime.now(UTC) + timedelta(seconds=600)
    value = email.utils.format_datetime(when, usegmt=True)

    error = refused(Method.HTTP_POST, 503, Retry_After=value)

    # The date has whole seconds and some time passes while the test runs.
    assert 500 < error.retry_after_seconds <= 600


def test_retry_after_as_a_past_http_date_means_now():
    value = email.utils.format_datetime(datetime(2001, 1, 1, tzinfo=UTC), usegmt=True)

    error = refused(Method.API, 503, Retry_After=value)

    assert error.retry_after_seconds == 0


@pytest.mark.parametrize("value", ["soon", "-5", "", "Mon, 99 Foo 2020"])
def test_unreadable_retry_after_is_ignored(value):
    error = refused(Method.API, 503, Retry_After=value)

    assert error.retryable is True
    assert error.retry_after_seconds is None


@pytest.mark.parametrize("status", [404, 503])
def test_error_body_keeps_only_the_first_4_kib(status):
    body = b"x" * (4 * KIB) + b"TAIL" * 300

    error = refused(Method.API, status, body)

    assert error.details["body"] == "x" * (4 * KIB)


def test_2xx_reply_excerpt_keeps_only_the_first_4_kib():
    body = json.dumps({"pad": "y" * (8 * KIB)}).encode()

    result = judge(Method.API, 200, reply_headers(), body)

    assert result.response_data == {"pad": "y" * (8 * KIB)}
    assert result.reply == body[: 4 * KIB].decode()


def test_error_body_is_text_even_when_not_utf_8():
    error = refused(Method.API, 500, b"caf\xe9 \xff")

    assert isinstance(error.details["body"], str)
    assert error.details["body"].startswith("caf")


# -- encode_form ---------------------------------------------------------------


def test_urlencoded_body_is_exact_utf_8_percent_encoding():
    payload = {
        "a b": "x y&z=1+%",
        "é": "中",
        "emoji": "😀",
        "yes": True,
        "no": False,
        "nothing": None,
        "list": [1, 2],
        "price": 1.50,
        "big": 12345678901234567890,
    }

    body, content_type = encode_form(payload, "form")

    assert content_type == "application/x-www-form-urlencoded"
    assert body == (
        b"a+b=x+y%26z%3D1%2B%25&%C3%A9=%E4%B8%AD&emoji=%F0%9F%98%80"
        b"&yes=true&no=false&nothing=&list=1&list=2&price=1.5"
        b"&big=12345678901234567890"
    )


def test_json_encoding_keeps_types_and_utf_8():
    body, content_type = encode_form(UNICODE_PAYLOAD, "json")

    assert content_type == "application/json"
    assert json.loads(body.decode("utf-8")) == UNICODE_PAYLOAD


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """Read a multipart/form-data body back with the stdlib e-mail parser."""
    raw = b"Content-Type: " + content_type.encode("ascii") + b"\r\n\r\n" + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    fields = []
    for part in message.iter_parts():
        assert part.get_content_disposition() == "form-data"
        name = part.get_param("name", header="content-disposition")
        fields.append((str(name), part.get_payload(decode=True)))
    return fields


def test_multipart_parses_back_to_the_same_pairs():
    payload = {
        "名前": "Zoë 😀",
        "note": "two\r\nlines -- and a boundary-ish ------ptdaemon",
        "tags": ["a", "ä"],
        "ok": True,
        "empty": None,
        "n": 2.50,
    }

    body, content_type = encode_form(payload, "multipart")

    assert content_type.startswith("multipart/form-data; boundary=")
    assert parse_multipart(body, content_type) == [
        ("名前", "Zoë 😀".encode()),
        ("note", b"two\r\nlines -- and a boundary-ish ------ptdaemon"),
        ("tags", b"a"),
        ("tags", "ä".encode()),
        ("ok", b"true"),
        ("empty", b""),
        ("n", b"2.5"),
    ]


def test_multipart_names_are_utf_8_bytes_on_the_wire():
    body, _ = encode_form({"é": "ü"}, "multipart")

    assert b'name="\xc3\xa9"\r\n\r\n\xc3\xbc\r\n' in body


def test_multipart_quotes_and_line_breaks_in_names_are_escaped():
    body, content_type = encode_form({'say "hi"': 'v"1', "a\r\nb": "x"}, "multipart")

    assert b'name="say %22hi%22"' in body
    assert b'name="a%0D%0Ab"' in body
    assert parse_multipart(body, content_type) == [
        ("say %22hi%22", b'v"1'),
        ("a%0D%0Ab", b"x"),
    ]


def test_each_multipart_body_has_its_own_boundary():
    _, first = encode_form({"a": "1"}, "multipart")
    _, second = encode_form({"a": "1"}, "multipart")

    assert first != second


# -- Standard Webhooks signatures -----------------------------------------------


def signed_template(method: Method, encoding: str, **fields: Any) -> Template:
    target: dict[str, Any] = {"url": URL_TEXT}
    if method is Method.HTTP_POST:
        target["encoding"] = encoding
    return make_template(method, target, signing_secret=generate_secret(), **fields)


SIGNED_CASES = [
    (Method.HTTP_POST, "json"),
    (Method.HTTP_POST, "form"),
    (Method.HTTP_POST, "multipart"),
    (Method.API, "json"),
]


@pytest.mark.parametrize(("method", "encoding"), SIGNED_CASES)
def test_signed_request_verifies_with_standardwebhooks(method, encoding):
    template = signed_template(method, encoding)
    delivery = make_delivery(template, UNICODE_PAYLOAD)

    request = build_request(delivery)

    assert request.headers["webhook-id"] == delivery.submission_id
    assert request.headers["webhook-timestamp"] == str(int(delivery.started_at))
    assert request.headers["webhook-signature"].startswith("v1,")
    assert " " not in request.headers["webhook-signature"]
    assert b"\xc3" in request.body or b"%C3" in request.body  # non-ASCII is in it
    Webhook(template.signing_secret).verify(
        request.body, request.headers, json_parse=False
    )


@pytest.mark.parametrize(("method", "encoding"), SIGNED_CASES)
def test_a_body_changed_by_one_byte_fails_verification(method, encoding):
    template = signed_template(method, encoding)
    request = build_request(make_delivery(template, UNICODE_PAYLOAD))
    changed = bytearray(request.body)
    changed[len(changed) // 2] ^= 0x01

    with pytest.raises(WebhookVerificationError):
        Webhook(template.signing_secret).verify(
            bytes(changed), request.headers, json_parse=False
        )


def test_a_changed_id_or_timestamp_fails_verification():
    template = signed_template(Method.API, "json")
    request = build_request(make_delivery(template))
    wh = Webhook(template.signing_secret)

    other_id = {**request.headers, "webhook-id": str(uuid.uuid4())}
    later = int(request.headers["webhook-timestamp"]) + 1
    other_time = {**request.headers, "webhook-timestamp": str(later)}

    for headers in (other_id, other_time):
        with pytest.raises(WebhookVerificationError):
            wh.verify(request.body, headers, json_parse=False)


def test_during_a_rotation_both_secrets_sign_and_each_verifies():
    old = generate_secret()
    template = signed_template(
        Method.HTTP_POST,
        "form",
        previous_secret=old,
        previous_secret_until=time.time() + 3600,
    )

    request = build_request(make_delivery(template, UNICODE_PAYLOAD))

    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    assert signatures[0] != signatures[1]
    for secret in (template.signing_secret, old):
        Webhook(secret).verify(request.body, request.headers, json_parse=False)


def test_after_the_grace_period_only_the_new_secret_signs():
    old = generate_secret()
    template = signed_template(
        Method.API, "json", previous_secret=old, previous_secret_until=time.time() - 1
    )

    request = build_request(make_delivery(template))

    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(template.signing_secret).verify(
        request.body, request.headers, json_parse=False
    )
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(request.body, request.headers, json_parse=False)


def test_without_a_secret_nothing_is_signed():
    request = build_request(make_delivery(make_template(Method.API)))

    assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & {
        name.lower() for name in request.headers
    }


def test_generated_secrets_are_whsec_base64_of_32_random_bytes():
    first, second = generate_secret(), generate_secret()

    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert secret_bytes(first) == base64.b64decode(first.removeprefix("whsec_"))
    assert first != second


def test_secret_bytes_takes_bare_base64_and_24_bytes_at_least():
    key = bytes(range(24))
    bare = base64.b64encode(key).decode()

    assert secret_bytes(bare) == key
    assert secret_bytes("whsec_" + bare) == key


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_not base64!",
        "whsec_" + "%" * 44,
        "whsec_" + base64.b64encode(b"k" * 32).decode()[:-1],  # bad padding
        "whsec_" + base64.b64encode(b"k" * 16).decode(),  # short
        "whsec_" + base64.b64encode(b"k" * 23).decode(),  # one byte short
        "whsec_",
        "",
    ],
)
def test_secret_bytes_refuses_unusable_secrets(secret):
    with pytest.raises(InvalidError):
        secret_bytes(secret)


# -- HttpDispatcher.deliver against aioresponses --------------------------------


@pytest.fixture
async def api_dispatcher() -> AsyncIterator[HttpDispatcher]:
    dispatcher = HttpDispatcher(Method.API, policy=AddressPolicy())
    yield dispatcher
    await dispatcher.close()


@pytest.fixture
async def form_dispatcher() -> AsyncIterator[HttpDispatcher]:
    dispatcher = HttpDispatcher(Method.HTTP_POST, policy=AddressPolicy())
    yield dispatcher
    await dispatcher.close()


class _RequestAlreadySent:
    output_size = 0


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds replies without aiohttp 3.14's `stream_writer`
    argument (pnuckowski/aioresponses#289); supply one for a request already sent.
    """

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _RequestAlreadySent())
        super().__init__(method, url, **kwargs)


class MockHttp(aioresponses):
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", CompatResponse)
        super().add(url, method, *args, **kwargs)


def only_call(mocked: aioresponses, method: str = "POST") -> dict[str, Any]:
    calls = mocked.requests[(method, URL(URL_TEXT))]
    assert len(calls) == 1
    return dict(calls[0].kwargs)


async def test_deliver_sends_user_agent_and_idempotency_key(api_dispatcher):
    delivery = make_delivery(make_template(Method.API), {"name": "Zoë"})

    with MockHttp() as mocked:
        mocked.post(URL_TEXT, status=201, payload={"id": "r-1"})
        result = await api_dispatcher.deliver(delivery)
        sent = only_call(mocked)

    assert result.status == 201
    assert result.response_data == {"id": "r-1"}
    headers = CIMultiDict(sent["headers"])
    assert headers["User-Agent"] == f"ptdaemon/{__version__}"
    assert headers["Idempotency-Key"] == delivery.submission_id
    assert headers["Content-Type"] == "application/json"
    assert json.loads(sent["data"]) == {"name": "Zoë"}
    assert sent["allow_redirects"] is False


async def test_deliver_uses_the_api_method_and_auth(api_dispatcher):
    template = make_template(
        Method.API,
        {
            "url": URL_TEXT,
            "method": "PUT",
            "headers": {"X-Tenant": "7"},
            "auth": {"type": "basic", "username": "zoë", "password": "pä"},
        },
    )

    with MockHttp() as mocked:
        mocked.put(URL_TEXT, status=204)
        result = await api_dispatcher.deliver(make_delivery(template))
        sent = only_call(mocked, "PUT")

    assert result.status == 204
    headers = CIMultiDict(sent["headers"])
    assert headers["X-Tenant"] == "7"
    expected = base64.b64encode("zoë:pä".encode()).decode()
    assert headers["Authorization"] == f"Basic {expected}"


async def test_deliver_posts_a_web_form_and_judges_see_other(form_dispatcher):
    template = make_template(Method.HTTP_POST, {"url": URL_TEXT, "encoding": "form"})
    delivery = make_delivery(template, {"name": "Zoë"})

    with MockHttp() as mocked:
        mocked.post(URL_TEXT, status=303, headers={"Location": "/done"})
        result = await form_dispatcher.deliver(delivery)
        sent = only_call(mocked)

    assert result.response_data == {"status": 303, "location": "/done"}
    assert sent["data"] == b"name=Zo%C3%AB"
    headers = CIMultiDict(sent["headers"])
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Idempotency-Key"] == delivery.submission_id


async def test_deliver_reads_at_most_64_kib_of_a_reply(api_dispatcher):
    body = json.dumps({"pad": "z" * (80 * KIB)})

    with MockHttp() as mocked:
        mocked.post(URL_TEXT, status=200, body=body)
        result = await api_dispatcher.deliver(make_delivery(make_template(Method.API)))

    assert result.status == 200
    assert result.response_data is None  # cut at 64 KiB: no longer JSON
    assert result.reply == body[: 4 * KIB]


async def test_deliver_raises_the_judged_error(api_dispatcher):
    with MockHttp() as mocked:
        mocked.post(URL_TEXT, status=503, body="later", headers={"Retry-After": "9"})
        with pytest.raises(DeliveryError) as caught:
            await api_dispatcher.deliver(make_delivery(make_template(Method.API)))

    assert caught.value.category is ErrorCategory.REMOTE
    assert caught.value.retryable is True
    assert caught.value.retry_after_seconds == 9
    assert caught.value.details["body"] == "later"


async def test_a_refused_connection_is_a_network_error(api_dispatcher):
    key = ConnectionKey(
        "forms.example.test", 443, True, True, None, None, None, "forms.example.test"
    )
    refusal = aiohttp.ClientConnectorError(
        key, ConnectionRefusedError(111, "Connection refused")
    )

    with MockHttp() as mocked:
        mocked.post(URL_TEXT, exception=refusal)
        with pytest.raises(DeliveryError) as caught:
            await api_dispatcher.deliver(make_delivery(make_template(Method.API)))

    assert caught.value.category is ErrorCategory.NETWORK
    assert caught.value.retryable is True
    assert caught.value.details["exception"] == "ClientConnectorError"
    assert "forms.example.test" in caught.value.message


@pytest.mark.parametrize(
    "exception", [TimeoutError(), aiohttp.ServerTimeoutError("read")]
)
async def test_a_timeout_is_a_timeout_error(api_dispatcher, exception):
    with MockHttp() as mocked:
        mocked.post(URL_TEXT, exception=exception)
        with pytest.raises(DeliveryError) as caught:
            await api_dispatcher.deliver(make_delivery(make_template(Method.API)))

    assert caught.value.category is ErrorCategory.TIMEOUT
    assert caught.value.retryable is True


async def test_a_disconnect_is_a_network_error(api_dispatcher):
    with MockHttp() as mocked:
        mocked.post(URL_TEXT, exception=aiohttp.ServerDisconnectedError())
        with pytest.raises(DeliveryError) as caught:
            await api_dispatcher.deliver(make_delivery(make_template(Method.API)))

    assert caught.value.category is ErrorCategory.NETWORK
    assert caught.value.retryable is True


async def test_no_proxy_is_taken_from_the_environment(api_dispatcher, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    with MockHttp() as mocked:
        mocked.post(URL_TEXT, status=200)
        await api_dispatcher.deliver(make_delivery(make_template(Method.API)))
        sent = only_call(mocked)

    session = api_dispatcher._session
    assert session is not None
    assert session.trust_env is False
    assert sent.get("proxy") is None
