"""What leaves the host, byte for byte: form, multipart and JSON bodies, headers."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from typing import Any

import msgspec
import pytest

import ptdaemon
from tests.e2e.conftest import Reply, Seen

# Written by hand as raw JSON, so that `1.50` and the big integer reach the
# daemon exactly as a client wrote them.
DATA_JSON = (
    '{"name": "Ada Lovelace", "yes": true, "no": false, "nothing": null,'
    ' "tags": ["a", "b c"], "price": 1.50, "sci": 1e20,'
    ' "big": 123456789012345678901234567890, "neg": -7,'
    ' "city": "Z\\u00fcrich", "\\u00fcn\\u00ef": "\\u00fc&=+%/?"}'
)

# The same fields as (name, value) pairs, the way a browser would post them.
FORM_PAIRS = [
    ("name", "Ada Lovelace"),
    ("yes", "true"),
    ("no", "false"),
    ("nothing", ""),
    ("tags", "a"),
    ("tags", "b c"),
    ("price", "1.5"),
    ("sci", "1e+20"),
    ("big", "123456789012345678901234567890"),
    ("neg", "-7"),
    ("city", "Zürich"),
    ("ünï", "ü&=+%/?"),
]

# application/x-www-form-urlencoded as the WHATWG URL standard serialises it:
# UTF-8, percent-encoded, a space as `+`.
FORM_BODY = (
    b"name=Ada+Lovelace&yes=true&no=false&nothing=&tags=a&tags=b+c"
    b"&price=1.5&sci=1e%2B20&big=123456789012345678901234567890&neg=-7"
    b"&city=Z%C3%BCrich&%C3%BCn%C3%AF=%C3%BC%26%3D%2B%25%2F%3F"
)


async def submit_raw(api: Any, template_id: str, data_json: str) -> dict[str, Any]:
    body = f'{{"form_template_id": {json.dumps(template_id)}, "data": {data_json}}}'
    answer = await api.send(
        "POST",
        "/v1/submissions",
        headers={"Content-Type": "application/json"},
        raw=body.encode(),
    )
    assert answer.status == 202, answer.raw
    return answer.json  # type: ignore[no-any-return]


async def deliver_once(
    sink: Any, api: Any, method: str, target: dict[str, Any], data_json: str, **extra
) -> tuple[dict[str, Any], Seen]:
    template = await api.template(method=method, target=target, **extra)
    sub = await submit_raw(api, template["id"], data_json)
    final = await api.wait_final(sub["id"])
    assert final["status"] == "completed", final
    [seen] = sink.seen("/in")
    return final, seen


def multipart_fields(seen: Seen) -> list[tuple[str, str]]:
    """Parse a multipart/form-data body by hand, checking its framing."""
    content_type = seen.headers["Content-Type"]
    match = re.fullmatch(r"multipart/form-data; boundary=(\S+)", content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    body = seen.body
    assert body.startswith(delimiter + b"\r\n")
    assert body.endswith(delimiter + b"--\r\n")
    chunks = body[: -len(delimiter) - 4].split(delimiter + b"\r\n")
    assert chunks[0] == b""
    fields = []
    for chunk in chunks[1:]:
        head, sep, value = chunk.partition(b"\r\n\r\n")
        assert sep, chunk
        assert value.endswith(b"\r\n"), chunk
        lines = head.decode("utf-8").split("\r\n")
        assert len(lines) == 1, lines
        disposition = re.fullmatch(
            r'Content-Disposition: form-data; name="(.*)"', lines[0]
        )
        assert disposition, lines[0]
        fields.append((disposition.group(1), value[:-2].decode("utf-8")))
    return fields


async def test_form_body_byte_for_byte(sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()

    _, seen = await deliver_once(
        sink, api, "HTTP_POST", {"url": url, "encoding": "form"}, DATA_JSON
    )

    assert seen.method == "POST"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.body == FORM_BODY


async def test_multipart_body_fields_are_utf8(sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()

    _, seen = await deliver_once(
        sink, api, "HTTP_POST", {"url": url, "encoding": "multipart"}, DATA_JSON
    )

    assert seen.method == "POST"
    assert multipart_fields(seen) == FORM_PAIRS


async def test_web_form_json_encoding_keeps_types(sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()

    _, seen = await deliver_once(
        sink, api, "HTTP_POST", {"url": url, "encoding": "json"}, DATA_JSON
    )

    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == msgspec.json.encode(json.loads(DATA_JSON))
    decoded = json.loads(seen.body)
    assert decoded["big"] == 123456789012345678901234567890
    assert decoded["yes"] is True
    assert decoded["nothing"] is None


async def test_api_body_is_the_mapped_payload_in_map_order(sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()
    nfd_cafe = unicodedata.normalize("NFD", "café")
    nfd_ueber = unicodedata.normalize("NFD", "über")
    assert nfd_cafe != "café"
    data = {
        "a": {"x": 1.5, "y": "unused"},
        "b": True,
        "k.with.dot": "dotted",
        "tags": ["first", "second"],
        nfd_cafe: "crème",  # NFD key in the data, NFC path in the map
        "über": {"deep": None},  # NFC key in the data, NFD path in the map
        "obj": {"kept": [1, {"z": "as is"}]},
        "unmapped": "left out",
    }
    field_map = {
        "zeta": "b",
        "alpha": "a.x",
        "dotted": ["k.with.dot"],
        "first_tag": "tags.1",
        "missing": "nope.none",
        "café": "café",
        "ueber": f"{nfd_ueber}.deep",
        "object": "obj",
    }
    template = await api.template(
        method="API", target={"url": url}, field_map=field_map
    )

    sub = await api.submit(template["id"], data)
    final = await api.wait_final(sub["id"])
    [seen] = sink.seen("/in")

    expected = {
        "zeta": True,
        "alpha": 1.5,
        "dotted": "dotted",
        "first_tag": "second",
        "café": "crème",
        "ueber": None,
        "object": {"kept": [1, {"z": "as is"}]},
    }
    assert final["status"] == "completed"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == msgspec.json.encode(expected)
    assert list(json.loads(seen.body)) == list(expected)
    # The stored data is kept exactly as given, NFD key included.
    assert final["data"] == data


@pytest.mark.parametrize("encoding", ["form", "multipart"])
@pytest.mark.parametrize(
    "value", [{"city": "Paris"}, ["ok", {"inner": 1}], [["nested"]]]
)
async def test_an_object_in_a_form_is_a_validation_failure(
    encoding, value, sink, start_daemon
):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="HTTP_POST",
        target={"url": url, "encoding": encoding},
        field_map={"name": "name", "address": "address"},
        max_retries=3,
        retry_backoff_seconds=0.05,
    )

    sub = await api.submit(template["id"], {"name": "Ada", "address": value})
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "validation"
    assert final["error_details"]["retryable"] is False
    assert len(attempts) == 1
    assert sink.seen("/in") == []


@pytest.mark.parametrize(
    ("auth", "header", "value"),
    [
        ({"type": "bearer", "token": "s3cr3t"}, "Authorization", "Bearer s3cr3t"),
        (
            {"type": "basic", "username": "jürgen", "password": "pä:ss"},
            "Authorization",
            "Basic " + base64.b64encode("jürgen:pä:ss".encode()).decode(),
        ),
        (
            {"type": "header", "name": "X-Api-Key", "value": "k-123"},
            "X-Api-Key",
            "k-123",
        ),
    ],
)
async def test_api_auth_headers(auth, header, value, sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API",
        target={"url": url, "auth": auth, "headers": {"X-Tenant": "acme"}},
    )

    sub = await api.submit(template["id"], {"name": "Ada"})
    final = await api.wait_final(sub["id"])
    [seen] = sink.seen("/in")

    assert final["status"] == "completed"
    assert seen.headers.getall(header) == [value]
    assert seen.headers["X-Tenant"] == "acme"
    assert seen.headers["User-Agent"] == f"ptdaemon/{ptdaemon.__version__}"
    assert seen.headers["Idempotency-Key"] == sub["id"]
    # Secrets are write-only.
    assert "s3cr3t" not in json.dumps(template)
    assert "pä:ss" not in json.dumps(template)
    assert "k-123" not in json.dumps(template)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_api_method(method, sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": url, "method": method})

    sub = await api.submit(template["id"], {"name": "Ada", "n": 2})
    final = await api.wait_final(sub["id"])
    [seen] = sink.seen("/in")

    assert final["status"] == "completed"
    assert seen.method == method
    assert seen.body == b'{"name":"Ada","n":2}'
    assert seen.headers["Idempotency-Key"] == sub["id"]
