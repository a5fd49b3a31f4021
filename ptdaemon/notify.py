"""The systemd notify protocol over $NOTIFY_SOCKET, and the watchdog ping.

Without NOTIFY_SOCKET every call does nothing; without WATCHDOG_USEC no
timer runs, so an idle daemon does not wake up for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

log = logging.getLogger(__name__)

StatusFn = Callable[[], Awaitable[str]]

# How long a status line may take to compute before the ping goes without it.
STATUS_TIMEOUT_SECONDS: Final = 2.0


class Notifier:
    """Sends state changes to the service manager that started this process.

    The watchdog ping is sent by a task on the event loop itself, so a loop
    that is blocked misses it and the manager restarts the service.
    """

    def __init__(
        self, *, address: str | None, watchdog_seconds: float | None = None
    ) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_seconds = watchdog_seconds if self._address else None
        self._socket: socket.socket | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them."""
        return cls(
            address=environ.get("NOTIFY_SOCKET") or None,
            watchdog_seconds=watchdog_seconds(environ, os.getpid()),
        )

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send `KEY=value` fields in one datagram; a failure is logged once."""
        if self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("notify failed", extra={"error": str(exc)})
                self._warned = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, status: StatusFn | None = None) -> None:
        """Ping at half the watchdog interval, with a fresh status line each time."""
        if self.watchdog_seconds is None or self._pinger is not None:
            return
        self._pinger = asyncio.create_task(
            self._ping(self.watchdog_seconds / 2, status), name="watchdog"
        )
        log.info("watchdog on", extra={"interval_seconds": self.watchdog_seconds})

    async def _ping(self, interval: float, status: StatusFn | None) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send("WATCHDOG=1")
            if status is not None:
                await self._send_status(status)

    async def _send_status(self, status: StatusFn) -> None:
        try:
            async with asyncio.timeout(STATUS_TIMEOUT_SECONDS):
                self.status(await status())
        except Exception as exc:  # noqa: BLE001 - a status line is optional
            log.debug("status line skipped", extra={"error": repr(exc)})

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
            self._pinger = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval systemd asks for, or None when it asks for none.

    WATCHDOG_PID, when set, must name this process: a child that inherited
    the environment must not ping for its parent.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None

    return value / 1_000_000 if value > 0 else None


def _socket_address(address: str) -> str | bytes:
    """A path, or for `@name` the Linux abstract socket of that name."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address
