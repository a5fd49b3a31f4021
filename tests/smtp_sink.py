"""A real SMTP server (aiosmtpd) on 127.0.0.1 that answers from a script."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

# A scripted answer to the end of DATA: an SMTP reply line, or DROP to close
# the connection without answering.
DROP = "drop"
ACCEPT = "250 2.0.0 queued"


@dataclass
class Received:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        # Read as a mail client stores it: with local line endings.
        local = self.raw.replace(b"\r\n", b"\n")
        parsed = email.message_from_bytes(local, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class SmtpSink:
    """aiosmtpd in the test's own loop; each DATA takes the next scripted reply.

    `tls` serves implicit TLS with that context; `starttls` offers and
    requires STARTTLS; `login` requires AUTH with that (user, password).
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
        refuse: frozenset[str] = frozenset(),
    ) -> None:
        self.replies: list[str] = []
        self.received: list[Received] = []
        self.data_count = 0
        # Every message that reached the end of DATA, accepted or not.
        self.offered: list[Received] = []
        self.connections = 0
        self.logins: list[str] = []
        self.port = 0
        self.arrived = asyncio.Condition()
        self._tls = tls
        self._starttls = starttls
        self._login = login
        self._refuse = refuse
        self._sessions: list[SMTP] = []
        self._server: asyncio.Server | None = None

    def script(self, *replies: str) -> None:
        self.replies = list(replies)

    def _protocol(self) -> SMTP:
        self.connections += 1
        options: dict[str, Any] = {}
        if self._starttls is not None:
            options.update(tls_context=self._starttls, require_starttls=True)
        if self._login is not None:
            options.update(
                authenticator=self._authenticate,
                auth_required=True,
                auth_require_tls=self._starttls is not None or self._tls is not None,
            )
        session = SMTP(self, hostname="sink.test", **options)
        self._sessions.append(session)
        return session

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self._login == (
            data.login.decode(),
            data.password.decode(),
        )
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self._refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Any, envelope: Any
    ) -> str:
        self.data_count += 1
        seen = Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        self.offered.append(seen)
        reply = self.replies.pop(0) if self.replies else ACCEPT
        if reply == DROP:
            assert server.transport is not None
            server.transport.close()
        elif reply.startswith("250"):
            self.received.append(seen)
        async with self.arrived:
            self.arrived.notify_all()
        return reply

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)
        return self.received

    def drop_connections(self) -> None:
        """Close every open session, as a server does with idle clients."""
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, "127.0.0.1", 0, ssl=self._tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
