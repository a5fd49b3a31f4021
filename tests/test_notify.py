"""The notify protocol through a datagram socket of the test's own."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptdaemon.notify import Notifier, watchdog_seconds


class Listener:
    """A service manager's end: a datagram socket read by a thread of its own."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        return [line for _, text in self.messages for line in text.split("\n")]

    def pings(self) -> list[float]:
        return [at for at, text in self.messages if "WATCHDOG=1" in text.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    receiver = Listener(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


async def wait_until(check, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_without_notify_socket_nothing_is_sent_and_no_timer_runs():
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    tasks_before = asyncio.all_tasks()

    notifier.ready("ready")
    notifier.start_watchdog()

    assert not notifier.is_enabled
    assert notifier.watchdog_seconds is None
    assert asyncio.all_tasks() == tasks_before
    await notifier.close()


async def test_without_watchdog_usec_no_timer_runs(listener, tmp_path):
    notifier = Notifier(address=str(tmp_path / "notify.sock"))
    tasks_before = asyncio.all_tasks()

    notifier.start_watchdog()

    assert asyncio.all_tasks() == tasks_before
    await notifier.close()


async def test_ready_status_and_stopping_arrive_in_order(listener, tmp_path):
    notifier = Notifier(address=str(tmp_path / "notify.sock"))

    notifier.ready("3 due")
    notifier.status("2 due")
    notifier.stopping()
    await wait_until(lambda: len(listener.messages) == 3)
    await notifier.close()

    assert listener.fields() == [
        "READY=1",
        "STATUS=3 due",
        "STATUS=2 due",
        "STOPPING=1",
        "STATUS=stopping",
    ]


async def test_an_abstract_socket_name_is_reached(tmp_path):
    name = f"ptdaemon-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = Listener(b"\0" + name.encode())
    try:
        notifier = Notifier(address="@" + name)
        notifier.ready("ready")
        await wait_until(lambda: receiver.messages)
        await notifier.close()
    finally:
        receiver.close()

    assert receiver.fields() == ["READY=1", "STATUS=ready"]


async def test_a_missing_socket_is_logged_once_and_not_raised(tmp_path, caplog):
    notifier = Notifier(address=str(tmp_path / "nobody-listens.sock"))

    notifier.ready("ready")
    notifier.stopping()
    await notifier.close()

    assert [r.message for r in caplog.records].count("notify failed") == 1


async def test_watchdog_pings_at_half_the_interval_with_a_status(listener, tmp_path):
    notifier = Notifier(address=str(tmp_path / "notify.sock"), watchdog_seconds=0.2)
    lines = iter(range(1000))

    async def status() -> str:
        return f"{next(lines)} due"

    notifier.start_watchdog(status)
    await wait_until(lambda: len(listener.pings()) >= 4)
    await notifier.close()

    fields = listener.fields()
    assert fields[:4] == ["WATCHDOG=1", "STATUS=0 due", "WATCHDOG=1", "STATUS=1 due"]
    pings = listener.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Half of 0.2 s; a busy machine only makes gaps longer.
    assert min(gaps) >= 0.08


async def test_a_blocked_loop_stops_the_pings(listener, tmp_path):
    notifier = Notifier(address=str(tmp_path / "notify.sock"), watchdog_seconds=0.1)
    notifier.start_watchdog()
    await wait_until(lambda: len(listener.pings()) >= 3)

    blocked_at = time.monotonic()
    time.sleep(1.0)  # the point: the loop cannot run
    unblocked_at = time.monotonic()
    await wait_until(lambda: listener.pings()[-1] > unblocked_at)
    await notifier.close()

    # A ping already in the socket when the block began may be read just after.
    during = [at for at in listener.pings() if blocked_at + 0.05 < at < unblocked_at]
    assert during == []
    assert len(listener.pings()) >= 4


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_comes_from_the_environment(environ, expected):
    assert watchdog_seconds(environ, 4242) == expected
