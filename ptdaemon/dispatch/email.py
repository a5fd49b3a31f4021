"""The EMAIL dispatcher: one message per submission through the `[smtp]` server.

One SMTP connection is kept open and reused for every message, one mail
transaction at a time, and opened again when the server has dropped it.
"""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import email.policy
import email.utils
import logging
import socket
import ssl
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final

import aiosmtplib
import msgspec

from ptdaemon.config import Secret, SmtpConfig
from ptdaemon.dispatch.base import REPLY_KEEP_BYTES, Delivery, Result
from ptdaemon.errors import ConfigError, DeliveryError, InvalidError
from ptdaemon.mapping import check_template_text, csv_document, render
from ptdaemon.models import EmailTarget, ErrorCategory, Method, Template

log = logging.getLogger(__name__)


class _SmtpPolicy(email.policy.EmailPolicy):
    """The stdlib's SMTP policy, with a subject folder that keeps every space.

    Python 3.11 drops the space between two encoded words when it folds a
    long non-ASCII subject; the older `Header` encoder puts spaces inside
    the encoded words, where decoders keep them.
    """

    def fold(self, name: str, value: str) -> str:
        if name.lower() != "subject" or str(value).isascii():
            folded: str = super().fold(name, value)
            return folded
        header = email.header.Header(
            str(value),
            "utf-8",
            maxlinelen=self.max_line_length,
            header_name=name,
        )

        return f"{name}: {header.encode(linesep=self.linesep)}{self.linesep}"

    def fold_binary(self, name: str, value: str) -> bytes:
        if name.lower() != "subject" or str(value).isascii():
            return super().fold_binary(name, value)
        return self.fold(name, value).encode("ascii")


# RFC 5322 line folding and CRLF; bodies and attachments in quoted-printable
# or base64, so that the message passes any server, with or without 8BITMIME.
POLICY: Final = _SmtpPolicy(linesep="\r\n", cte_type="7bit")
QUIT_TIMEOUT_SECONDS: Final = 2.0
_FORBIDDEN_IN_NAMES: Final = frozenset('/\\\0"')


class _AddressError(ValueError):
    """Text that is not exactly one usable e-mail address."""


def parse_address(text: str) -> Address:
    """Read one address, `a@example.org` or `Name <a@example.org>`."""
    if any(char in text for char in "\r\n\0"):
        raise _AddressError("holds a line break or NUL")
    try:
        header = POLICY.header_factory("to", text)
    except (email.errors.HeaderParseError, ValueError, IndexError) as exc:
        # The stdlib parser raises on some malformed input instead of a defect.
        raise _AddressError(f"{text!r} is not one e-mail address") from exc
    addresses: Any = getattr(header, "addresses", ())
    defects: Any = getattr(header, "defects", ())
    if len(addresses) != 1 or defects:
        raise _AddressError(f"{text!r} is not one e-mail address")
    found: Address = addresses[0]
    if not found.username or not found.domain or "@" in found.domain:
        raise _AddressError(f"{text!r} is not one e-mail address")
    if not found.username.isascii():
        # Limit: SMTPUTF8 is not used, so a mailbox name must be ASCII.
        raise _AddressError(f"{text!r}: the part before @ must be ASCII")
    domain = found.domain
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise _AddressError(f"{text!r}: the domain is not valid") from exc

    return Address(found.display_name, found.username, domain)


class _Envelope(msgspec.Struct, frozen=True):
    sender: str
    recipients: list[str]
    message_id: str


def build_message(
    target: EmailTarget, delivery: Delivery, *, from_address: str
) -> tuple[EmailMessage, _Envelope]:
    """Render the target's templates with the payload into one message."""
    fields = delivery.payload
    sender = _address_or_validation("smtp.from", from_address)
    to = _render_addresses("to", target.to, fields)
    cc = _render_addresses("cc", target.cc, fields)
    bcc = _render_addresses("bcc", target.bcc, fields)
    subject = render(target.subject, fields).strip()
    if _has_break(subject):
        # Data that would start a new header line is refused, not mended.
        raise DeliveryError(
            "subject: the data holds a line break or NUL",
            category=ErrorCategory.VALIDATION,
            details={"exception": "HeaderInjection", "field": "subject"},
        )
    message_id = f"<{delivery.submission_id}@{sender.domain}>"

    message = EmailMessage(policy=POLICY)
    message["From"] = sender
    message["To"] = to
    if cc:
        message["Cc"] = cc
    if target.reply_to:
        message["Reply-To"] = _render_addresses("reply_to", [target.reply_to], fields)
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(
        datetime.fromtimestamp(delivery.started_at, UTC)
    )
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(render(target.body, fields))
    _attach(message, target, delivery)

    recipients = [address.addr_spec for address in (*to, *cc, *bcc)]
    envelope = _Envelope(sender.addr_spec, list(dict.fromkeys(recipients)), message_id)

    return message, envelope


def _render_addresses(
    field: str, texts: list[str], fields: dict[str, Any]
) -> list[Address]:
    return [
        _address_or_validation(f"target.{field}", render(text, fields))
        for text in texts
    ]


def _address_or_validation(field: str, text: str) -> Address:
    try:
        return parse_address(text)
    except _AddressError as exc:
        raise DeliveryError(
            f"{field}: {exc}",
            category=ErrorCategory.VALIDATION,
            details={"exception": "AddressError", "field": field},
        ) from exc


def attachment_name(template_name: str, extension: str) -> str:
    """A file name for the attachment, from the template's name."""
    stem = "".join(
        "_" if char in _FORBIDDEN_IN_NAMES or not char.isprintable() else char
        for char in template_name
    ).strip(" .")

    return f"{stem or 'submission'}.{extension}"


def _attach(message: EmailMessage, target: EmailTarget, delivery: Delivery) -> None:
    name = delivery.template.name
    if target.attach == "json":
        message.add_attachment(
            msgspec.json.encode(delivery.payload),
            maintype="application",
            subtype="json",
            filename=attachment_name(name, "json"),
        )
    elif target.attach == "csv":
        text = csv_document(delivery.payload, neutralise=target.csv_neutralise)
        message.add_attachment(
            text, subtype="csv", charset="utf-8", filename=attachment_name(name, "csv")
        )


class EmailDispatcher:
    """Delivers EMAIL templates through the one SMTP server of the config."""

    method = Method.EMAIL

    def __init__(
        self,
        smtp: SmtpConfig,
        *,
        password: Secret | None = None,
        ca_path: Path | None = None,
    ) -> None:
        try:
            parse_address(smtp.from_address)
        except _AddressError as exc:
            raise ConfigError(f"smtp.from: {exc}") from exc
        self._smtp = smtp
        self._password = password
        self._ca_path = ca_path
        self._client: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    def check_target(self, target: msgspec.Struct) -> None:
        assert isinstance(target, EmailTarget)
        if not target.to:
            raise _invalid("target.to", "name at least one address")
        texts = [("subject", target.subject), ("body", target.body)]
        for field in ("to", "cc", "bcc"):
            values = getattr(target, field)
            texts += [(f"{field}[{i}]", text) for i, text in enumerate(values)]
        if target.reply_to is not None:
            texts.append(("reply_to", target.reply_to))
        for field, text in texts:
            _check_text(field, text)

    def destination_key(self, template: Template) -> str:
        return f"smtp:{self._smtp.host}:{self._smtp.port}"

    async def deliver(self, delivery: Delivery) -> Result:
        target = _delivery_target(delivery.template)
        message, envelope = build_message(
            target, delivery, from_address=self._smtp.from_address
        )
        data = message.as_bytes(policy=POLICY)

        timer = asyncio.timeout(delivery.template.timeout_seconds)
        try:
            async with timer:
                refused, reply = await self._send(envelope, data)
        except TimeoutError as exc:
            if not timer.expired() and not isinstance(exc, aiosmtplib.SMTPException):
                raise
            raise _timeout_error(delivery.template.timeout_seconds, exc) from exc
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            raise translate_error(exc) from exc

        return Result(
            status=250,
            response_data={
                "message_id": envelope.message_id,
                "refused": [
                    {"address": address, "status": answer.code, "reply": answer.message}
                    for address, answer in refused.items()
                ],
            },
            reply=reply[:REPLY_KEEP_BYTES],
        )

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is None or not client.is_connected:
                return
            try:
                await client.quit(timeout=QUIT_TIMEOUT_SECONDS)
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    async def _send(
        self, envelope: _Envelope, data: bytes
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """Run one mail transaction on the shared connection."""
        async with self._lock:
            try:
                return await self._send_locked(envelope, data)
            except aiosmtplib.SMTPResponseException as exc:
                # After a refusal the library has reset the envelope; the
                # connection stays usable unless the server is closing it.
                if exc.code == 421:
                    self._drop()
                raise
            except BaseException:
                # A timeout or a cut connection leaves the session in an unknown
                # state: the next message starts on a new one.
                self._drop()
                raise

    async def _send_locked(
        self, envelope: _Envelope, data: bytes
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        client, fresh = await self._connection()
        try:
            return await client.sendmail(envelope.sender, envelope.recipients, data)
        except aiosmtplib.SMTPServerDisconnected:
            if fresh:
                raise
        # The server closed the idle connection before this message: send it
        # once more on a new connection.
        log.debug("smtp connection dropped, reconnecting")
        self._drop()
        client, _ = await self._connection()

        return await client.sendmail(envelope.sender, envelope.recipients, data)

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The open connection, or a new one; True when it is new."""
        if self._client is not None and self._client.is_connected:
            return self._client, False
        self._drop()
        smtp = self._smtp
        client = aiosmtplib.SMTP(
            hostname=smtp.host,
            port=smtp.port,
            username=smtp.username or None,
            password=self._password.reveal() if self._password else None,
            # The host name, not getfqdn(): that may ask a DNS server.
            local_hostname=socket.gethostname(),
            timeout=smtp.timeout_seconds,
            use_tls=smtp.tls == "implicit",
            start_tls=smtp.tls == "starttls",
            tls_context=self._tls_context() if smtp.tls != "none" else None,
        )
        try:
            await client.connect()
        except BaseException:
            client.close()
            raise
        log.debug(
            "smtp connected",
            extra={"host": smtp.host, "port": smtp.port, "tls": smtp.tls},
        )
        self._client = client

        return client, True

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._ca_path is not None:
            context.load_verify_locations(cafile=str(self._ca_path))
        return context

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def translate_error(exc: BaseException) -> DeliveryError:
    """Turn what the SMTP client raised into the contract's categories."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return _all_refused(exc)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _smtp_reply(exc.code, exc.message, type(exc).__name__)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return _timeout_error(None, exc)
    # A certificate failure is also a ValueError; it is the network's fault.
    is_tls = isinstance(exc, ssl.SSLError | ssl.CertificateError)
    if isinstance(exc, ValueError) and not is_tls:
        return DeliveryError(
            f"an address cannot be sent: {exc}",
            category=ErrorCategory.VALIDATION,
            details={"exception": type(exc).__name__},
        )
    return DeliveryError(
        _network_message(exc),
        category=ErrorCategory.NETWORK,
        details={"exception": type(exc).__name__},
    )


def _smtp_reply(code: int, text: str, exception: str) -> DeliveryError:
    final = 500 <= code <= 599
    return DeliveryError(
        f"smtp server answered {code}",
        category=ErrorCategory.REMOTE,
        retryable=not final,
        status=code,
        details={"exception": exception, "body": text[:REPLY_KEEP_BYTES]},
    )


def _all_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> DeliveryError:
    answers = exc.recipients
    codes = [answer.code for answer in answers]
    error = _smtp_reply(
        next((c for c in codes if c < 500), codes[0]) if codes else 550,
        "; ".join(f"{a.recipient}: {a.code} {a.message}" for a in answers),
        "SMTPRecipientsRefused",
    )
    error.message = "the smtp server refused every recipient"
    error.details["refused"] = [
        {"address": a.recipient, "status": a.code, "reply": a.message} for a in answers
    ]

    return error


def _timeout_error(limit: float | None, exc: BaseException) -> DeliveryError:
    message = "the smtp server did not answer in time"
    if limit is not None:
        message = f"the smtp server did not answer within {limit:g} s"
    return DeliveryError(
        message,
        category=ErrorCategory.TIMEOUT,
        details={"exception": type(exc).__name__},
    )


def _network_message(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "the smtp server closed the connection"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
        return f"tls failure with the smtp server: {reason or type(exc).__name__}"
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return f"the smtp server does not support what is configured: {exc}"
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return f"cannot connect to the smtp server: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot reach the smtp server: {exc.strerror}"
    return f"smtp error: {type(exc).__name__}"


def _has_break(text: str) -> bool:
    return any(char in text for char in "\r\n\0")


def _check_text(field: str, text: str) -> None:
    if field != "body" and _has_break(text):
        raise _invalid(f"target.{field}", "holds a line break or NUL", "invalid")
    try:
        check_template_text(text)
    except InvalidError as exc:
        raise _invalid(f"target.{field}", exc.message, "invalid") from exc
    is_address = field != "subject" and field != "body"
    if is_address and "{" not in text.replace("{{", ""):
        try:
            parse_address(render(text, {}))
        except _AddressError as exc:
            raise _invalid(f"target.{field}", str(exc)) from exc


def _invalid(field: str, message: str, code: str = "invalid_address") -> InvalidError:
    return InvalidError(f"{field}: {message}", code=code, details={"field": field})


def _delivery_target(template: Template) -> EmailTarget:
    try:
        return msgspec.convert(template.target, EmailTarget)
    except msgspec.ValidationError as exc:
        raise DeliveryError(
            f"target: {exc}",
            category=ErrorCategory.VALIDATION,
            details={"exception": type(exc).__name__},
        ) from exc


__all__ = ["EmailDispatcher", "build_message", "parse_address", "translate_error"]
