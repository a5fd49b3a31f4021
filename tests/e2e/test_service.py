"""The real daemon under a service manager's eyes: notify protocol and lock."""

from __future__ import annotations

from tests.e2e.conftest import DaemonProcess
from tests.test_notify import Listener, wait_until


async def test_serve_sends_ready_status_watchdog_then_stopping(tmp_path):
    listener = Listener(str(tmp_path / "notify.sock"))
    process = DaemonProcess(tmp_path)
    process.env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "400000",
    }
    try:
        await process.start()
        await wait_until(lambda: len(listener.pings()) >= 2, timeout=10)
        assert await process.terminate() == 0
        await wait_until(lambda: "STOPPING=1" in listener.fields())
    finally:
        listener.close()

    fields = listener.fields()
    assert fields[0] == "READY=1"
    assert fields[1] == "STATUS=0 due, 0 in flight"
    first_ping = fields.index("WATCHDOG=1")
    assert "STATUS=0 due, 0 in flight" in fields[first_ping:]
    assert first_ping < fields.index("STOPPING=1")
    assert "watchdog on" in process.log()
