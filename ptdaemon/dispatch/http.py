"""HTTP_POST and API delivery over one shared aiohttp client session.

The client never follows a redirect on its own, never retries on its own
and takes no proxy from the environment: each reply is judged here, as
the contract's section 5 says.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import socket
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from ptdaemon import __version__
from ptdaemon.dispatch.base import REPLY_KEEP_BYTES, REPLY_READ_BYTES, Delivery, Result
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.mapping import form_pairs
from ptdaemon.models import (
    ApiTarget,
    BasicAuth,
    BearerAuth,
    ErrorCategory,
    HeaderAuth,
    HttpPostTarget,
    Method,
    Template,
)
from ptdaemon.netpolicy import AddressPolicy, AddressRefused, literal_address
from ptdaemon.redact import is_sensitive_header
from ptdaemon.retry import is_retryable_status, parse_retry_after
from ptdaemon.signing import signature_headers
from ptdaemon.timeutil import now as wall_now

log = logging.getLogger(__name__)

MAX_HOPS: Final = 5
USER_AGENT: Final = f"ptdaemon/{__version__}"
# Framing and routing are this client's; letting a template set them would
# corrupt or redirect the request.
RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "cookie", "proxy-authorization"}
)


ResolverFactory = Callable[[], AbstractResolver]


class PolicyResolver(AbstractResolver):
    """Resolves names, keeping only the answers the address policy allows."""

    def __init__(self, inner: AbstractResolver, policy: AddressPolicy) -> None:
        self.inner = inner
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        allowed = [a for a in answers if self.policy.refusal(a["host"]) is None]
        if answers and not allowed:
            self.policy.check(host, answers[0]["host"])
        return allowed

    async def close(self) -> None:
        await self.inner.close()


class HttpDispatcher:
    """Delivers HTTP_POST (web forms) and API (JSON) templates."""

    def __init__(
        self,
        method: Method,
        *,
        policy: AddressPolicy,
        connector_limit: int = 100,
        resolver: ResolverFactory | None = None,
        dns_cache_seconds: int = 60,
    ) -> None:
        self.method = method
        self.policy = policy
        self._connector_limit = connector_limit
        self._resolver = resolver or aiohttp.ThreadedResolver
        self._dns_cache_seconds = dns_cache_seconds
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._connector_limit,
                ttl_dns_cache=self._dns_cache_seconds,
                use_dns_cache=self._dns_cache_seconds > 0,
                resolver=PolicyResolver(self._resolver(), self.policy),
                socket_factory=self._open_socket,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _open_socket(self, addr_info: Any) -> socket.socket:
        # The last word: whatever a resolver answered or a URL spelled, this is
        # the address the connection is about to be made to.
        family, kind, proto, _, address = addr_info
        self.policy.check(str(address[0]), str(address[0]))
        return socket.socket(family=family, type=kind, proto=proto)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_target(self, target: msgspec.Struct) -> None:
        url = getattr(target, "url", "")
        check_url(url)
        rule = self.policy.check_url_host(URL(url).host or "")
        if rule is not None:
            raise InvalidError(
                f"url leads to an address that is refused: {rule}",
                code="address_refused",
            )
        if isinstance(target, ApiTarget):
            headers = {**target.headers, **_auth_headers(target.auth)}
            for name, value in headers.items():
                check_header(name, value)
            if isinstance(target.auth, BasicAuth):
                pair = target.auth.username + target.auth.password
                check_header("Authorization", pair)

    def destination_key(self, template: Template) -> str:
        url = URL(str(template.target["url"]))
        return f"http:{url.scheme}://{url.host}:{url.port}"

    async def deliver(self, delivery: Delivery) -> Result:
        request = build_request(delivery)
        url = URL(request.url, encoded=False)
        origin = url.origin()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delivery.template.timeout_seconds
        for _ in range(MAX_HOPS + 1):
            self._check_literal(url)
            remaining = max(deadline - loop.time(), 0.001)
            status, headers, reply = await self._send(request, url, remaining)
            if status not in (307, 308):
                return judge(self.method, status, headers, reply)
            url = _redirect_target(url, status, headers.get("Location"), reply)
            if url.origin() != origin:
                request.drop_credentials()
                origin = url.origin()
        raise DeliveryError(
            f"more than {MAX_HOPS} redirects",
            category=ErrorCategory.REMOTE,
            retryable=False,
            details={"exception": "TooManyRedirects", "location": str(url)},
        )

    def _check_literal(self, url: URL) -> None:
        host = url.host or ""
        address = literal_address(host)
        if address is not None:
            rule = self.policy.refusal(address)
            if rule is not None:
                raise _refused(AddressRefused(host, str(address), rule))

    async def _send(
        self, request: _Request, url: URL, timeout_seconds: float
    ) -> tuple[int, CIMultiDict[str], bytes]:
        timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=min(timeout_seconds, 30.0)
        )
        try:
            async with self._client().request(
                request.method,
                url,
                data=request.body,
                headers=request.headers,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                reply = await _read_capped(response)
                return response.status, CIMultiDict(response.headers), reply
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            message = f"no answer within {timeout_seconds:.3g} s"
            raise _failure(exc, ErrorCategory.TIMEOUT, message) from exc
        except AddressRefused as exc:
            raise _refused(exc) from exc
        except aiohttp.InvalidURL as exc:
            raise _failure(exc, ErrorCategory.VALIDATION, "invalid URL") from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise _refused(exc.os_error) from exc
            raise _failure(exc, ErrorCategory.NETWORK, _network_message(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _failure(exc, ErrorCategory.NETWORK, _network_message(exc)) from exc


def _redirect_target(url: URL, status: int, location: str | None, reply: bytes) -> URL:
    """Where a 307 or 308 leads; a Location that cannot be followed is final."""
    if not location:
        raise _remote(status, reply, "redirect without a Location")
    try:
        target = url.join(URL(location))
    except (ValueError, TypeError):
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.host:
        error = _remote(status, reply, "redirect to a location that cannot be followed")
        error.details["location"] = location
        raise error
    return target


class _Request:
    """One attempt's request; the same bytes and headers on every redirect hop."""

    def __init__(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: dict[str, str],
        credentials: frozenset[str],
    ) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.headers = headers
        self.credentials = credentials

    def drop_credentials(self) -> None:
        """Forget every header that carries a credential (on a change of origin)."""
        self.headers = {
            k: v for k, v in self.headers.items() if k.lower() not in self.credentials
        }


def build_request(delivery: Delivery) -> _Request:
    """Encode the mapped payload and the headers of one attempt, signed once."""
    template = delivery.template
    headers: dict[str, str] = {}
    credentials = set(CREDENTIAL_HEADERS)
    if template.method is Method.API:
        target: Any = msgspec.convert(template.target, ApiTarget)
        headers.update(target.headers)
        auth = _auth_headers(target.auth)
        headers.update(auth)
        credentials.update(name.lower() for name in auth)
        credentials.update(
            name.lower() for name in target.headers if is_sensitive_header(name)
        )
        body = msgspec.json.encode(delivery.payload)
        headers["Content-Type"] = "application/json"
        method = target.method
    else:
        target = msgspec.convert(template.target, HttpPostTarget)
        body, content_type = encode_form(
            delivery.payload, target.encoding, seed=delivery.submission_id
        )
        headers["Content-Type"] = content_type
        method = "POST"
    headers["User-Agent"] = USER_AGENT
    headers["Idempotency-Key"] = delivery.submission_id
    keys = _signing_keys(template, delivery.started_at)
    if keys:
        timestamp = int(delivery.started_at)
        headers.update(signature_headers(keys, delivery.submission_id, timestamp, body))
    return _Request(method, target.url, body, headers, frozenset(credentials))


def _signing_keys(template: Template, now: float) -> list[str]:
    keys = [template.signing_secret] if template.signing_secret else []
    if (
        template.previous_secret
        and template.previous_secret_until is not None
        and template.previous_secret_until > now
    ):
        keys.append(template.previous_secret)
    return keys


def _auth_headers(auth: BearerAuth | BasicAuth | HeaderAuth | None) -> dict[str, str]:
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {auth.token}"}
    if isinstance(auth, BasicAuth):
        pair = f"{auth.username}:{auth.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    if isinstance(auth, HeaderAuth):
        return {auth.name: auth.value}
    return {}


def encode_form(
    payload: dict[str, Any], encoding: str, *, seed: str = ""
) -> tuple[bytes, str]:
    """Encode a mapped payload as a browser would post it.

    A multipart boundary is derived from `seed` (the submission id), so that
    every attempt sends the same bytes.
    """
    if encoding == "json":
        return msgspec.json.encode(payload), "application/json"
    pairs = form_pairs(payload)
    if encoding == "form":
        body = urllib.parse.urlencode(pairs, encoding="utf-8").encode("ascii")
        return body, "application/x-www-form-urlencoded"
    return encode_multipart(pairs, seed)


def encode_multipart(pairs: list[tuple[str, str]], seed: str = "") -> tuple[bytes, str]:
    token = hashlib.sha256(seed.encode()).hexdigest()[:24] if seed else ""
    boundary = "----ptdaemon" + token
    if not token or any(boundary in name or boundary in v for name, v in pairs):
        boundary = "----ptdaemon" + secrets.token_hex(12)
    parts: list[bytes] = []
    for name, value in pairs:
        parts.append(
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{_quote_name(name)}"\r\n'
            f"\r\n{value}\r\n".encode()
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _quote_name(name: str) -> str:
    # The HTML standard's escaping of field names inside a multipart header.
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size < REPLY_READ_BYTES:
            chunk = await response.content.read(REPLY_READ_BYTES - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
        # The status already carries the verdict; a cut or slow body is kept as
        # far as it was read.
        pass
    return b"".join(chunks)


def judge(
    method: Method, status: int, headers: CIMultiDict[str], reply: bytes
) -> Result:
    """Turn a final reply into a Result, or raise the DeliveryError it means."""
    if 200 <= status < 300:
        return Result(
            status=status,
            response_data=_parse_json(reply),
            reply=_excerpt(reply),
        )
    location = headers.get("Location")
    if method is Method.HTTP_POST and status in (302, 303):
        return Result(
            status=status,
            response_data={"status": status, "location": location},
            reply=_excerpt(reply),
        )
    if 300 <= status < 400:
        error = _remote(status, reply, f"redirected with {status}")
        error.details["location"] = location
        raise error
    if is_retryable_status(status):
        error = _remote(status, reply, f"destination answered {status}", True)
        error.retry_after_seconds = parse_retry_after(
            headers.get("Retry-After"), now=wall_now()
        )
        raise error
    raise _remote(status, reply, f"destination answered {status}")


def _remote(
    status: int, reply: bytes, message: str, retryable: bool = False
) -> DeliveryError:
    return DeliveryError(
        message,
        category=ErrorCategory.REMOTE,
        retryable=retryable,
        status=status,
        details={"exception": "HTTPStatus", "status": status, "body": _excerpt(reply)},
    )


def _failure(
    exc: BaseException, category: ErrorCategory, message: str
) -> DeliveryError:
    return DeliveryError(
        message,
        category=category,
        details={"exception": type(exc).__name__},
    )


def _refused(exc: AddressRefused) -> DeliveryError:
    return DeliveryError(
        f"destination refused by the outbound address policy: {exc}",
        category=ErrorCategory.VALIDATION,
        retryable=False,
        details={"exception": "AddressRefused", "rule": exc.rule},
    )


def _network_message(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return (
            f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc}"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return f"network error: {type(exc).__name__}"


def _excerpt(reply: bytes) -> str:
    return reply[:REPLY_KEEP_BYTES].decode("utf-8", errors="replace")


def _parse_json(reply: bytes) -> Any:
    if not reply:
        return None
    try:
        return msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return None


def _has_control(text: str) -> bool:
    return any(ch in text for ch in "\r\n\x00")


def check_url(url: str) -> None:
    """Refuse, when a template is saved, a URL that can never be delivered to."""
    if _has_control(url) or any(ord(ch) < 0x20 for ch in url):
        raise InvalidError("url holds a control character", code="invalid_url")
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise InvalidError(f"url is not valid: {exc}", code="invalid_url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidError(
            "url must be absolute, with scheme http or https", code="invalid_url"
        )
    if parsed.user is not None or parsed.password is not None:
        raise InvalidError(
            "url must not hold a user or password; use target.auth",
            code="invalid_url",
        )


def check_header(name: str, value: str) -> None:
    """Refuse a header that is malformed or that this client must set itself."""
    if not _TOKEN.fullmatch(name):
        raise InvalidError(
            "a header name must be a non-empty HTTP token", code="invalid_header"
        )
    if name.lower() in RESERVED_HEADERS:
        raise InvalidError(
            f"header {name} is set by ptdaemon and cannot be given",
            code="invalid_header",
        )
    if any((ord(ch) < 0x20 and ch != "\t") or ch == "\x7f" for ch in value):
        raise InvalidError(
            f"header {name} holds a control character", code="invalid_header"
        )


__all__ = ["HttpDispatcher", "build_request", "check_url", "encode_form", "judge"]
