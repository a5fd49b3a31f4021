"""The real daemon under a service manager's eyes: notify protocol and lock."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

from tests.e2e.conftest import DaemonProcess, Reply
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


async def second_serve(process: DaemonProcess) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "ptdaemon",
            "serve",
            "--config",
            str(process.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_a_second_serve_exits_naming_the_holder_also_when_it_is_stopped(
    start_daemon,
):
    process, _ = await start_daemon()

    running = await second_serve(process)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        stopped = await second_serve(process)
    finally:
        os.kill(process.pid, signal.SIGCONT)

    for result in (running, stopped):
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert f"in use by another ptdaemon (pid {process.pid})" in line
    assert await process.terminate() == 0


async def test_sigterm_during_a_slow_burst_drains_cuts_and_exits_0(sink, start_daemon):
    grace = 2.0
    url = sink.script(
        "/slow",
        *[Reply(200, delay=0.5), Reply(200, delay=20)] * 5,
        then=Reply(200),
    )
    process, api = await start_daemon(grace=grace)
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=60, max_retries=3
    )
    subs = [await api.submit(template["id"], {"n": n}) for n in range(15)]
    await sink.wait_for("/slow", 10)  # 10 in flight (per-host limit), 5 queued

    signalled = time.monotonic()
    assert process.proc is not None
    process.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: "draining attempts" in process.log())
    refused = await api.send("GET", "/v1/submissions")
    code = await asyncio.to_thread(process.proc.wait, 30)
    took = time.monotonic() - signalled
    rows = stored_states(process)

    assert code == 0
    assert refused.status == 503
    assert refused.json["error"]["code"] == "shutting_down"
    # Well before a service manager's stop timeout (45 s in the unit).
    assert took < grace + 10
    first_ten = {s["id"] for s in subs[:10]}
    arrived = {seen.headers["Idempotency-Key"] for seen in sink.seen("/slow")}
    assert arrived == first_ten
    outcomes = Counter(rows[i] for i in first_ten)
    assert outcomes == {
        ("completed", ("success",)): 5,
        ("retrying", ("interrupted",)): 5,
    }
    for sub in subs[10:]:
        assert rows[sub["id"]] == ("pending", ())


def stored_states(process: DaemonProcess) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each submission's status and its attempts' outcomes, from the file."""
    conn = sqlite3.connect(process.state / "ptdaemon.db")
    try:
        statuses = dict(conn.execute("SELECT id, status FROM submissions"))
        outcomes: dict[str, list[str]] = {i: [] for i in statuses}
        for sub_id, outcome in conn.execute(
            "SELECT submission_id, outcome FROM attempts ORDER BY number"
        ):
            outcomes[sub_id].append(outcome)
    finally:
        conn.close()
    return {i: (s, tuple(outcomes[i])) for i, s in statuses.items()}
