"""The system calls prove the order: fsync before 202, claim commit before sending.

The daemon runs under strace; each submission is sent, acknowledged and
delivered before the next, so the trace reads as one story per submission.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Api, DaemonProcess, Reply

SUBMISSIONS = 10
SYSCALLS = "fdatasync,fsync,read,write,writev,sendto,sendmsg,recvfrom,connect"
LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed"
)


@dataclass
class Event:
    kind: str  # post, ack, sync, connect, send
    line: str


def classify(syscall: str, rest: str, api_port: int, sink_port: int) -> str | None:
    if syscall in ("fdatasync", "fsync"):
        return "sync" if "ptdaemon.db-wal>" in rest and "= 0" in rest else None
    if syscall == "connect":
        return "connect" if f"htons({sink_port})" in rest else None
    if f"127.0.0.1:{api_port}->" in rest:
        if syscall in ("read", "recvfrom") and "POST /v1/submissions " in rest:
            return "post"
        if (
            syscall in ("write", "writev", "sendto", "sendmsg")
            and "HTTP/1.1 202" in rest
        ):
            return "ack"
    if f"->127.0.0.1:{sink_port}]" in rest and "POST /in " in rest:
        return "send" if syscall in ("write", "writev", "sendto", "sendmsg") else None
    return None


def read_trace(path: Path, api_port: int, sink_port: int) -> list[Event]:
    """Events in the order they happened; a sync counts once it has returned."""
    events: list[Event] = []
    waiting_sync: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        pid, resumed, syscall, rest = match.groups()
        if resumed is not None:
            started = waiting_sync.pop(pid, None)
            if started is not None and "= 0" in rest:
                events.append(Event("sync", started + rest))
            continue
        if syscall in ("fdatasync", "fsync") and "<unfinished" in rest:
            if "ptdaemon.db-wal>" in rest:
                waiting_sync[pid] = rest
            continue
        kind = classify(syscall, rest, api_port, sink_port)
        if kind is not None:
            events.append(Event(kind, line))
    return events


def synced_between(events: list[Event], start: str, end: str) -> tuple[int, int]:
    """For each `end` event: is there a sync since the last `start` event?"""
    ends = without_sync = 0
    since_start = False
    for event in events:
        if event.kind == start:
            since_start = False
        elif event.kind == "sync":
            since_start = True
        elif event.kind == end:
            ends += 1
            if not since_start:
                without_sync += 1
    return ends, without_sync


def daemon_child(strace_pid: int) -> int:
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text()
    return int(children.split()[0])


async def test_every_202_follows_a_wal_fsync_and_every_send_a_claim_commit(
    sink, tmp_path
):
    url = sink.script("/in", then=Reply(200))
    trace = tmp_path / "trace.txt"
    process = DaemonProcess(tmp_path)
    process.wrapper = [
        "strace", "-f", "-qq", "-yy", "-s", "48",
        "-e", f"trace={SYSCALLS}", "-o", str(trace),
    ]  # fmt: skip
    await process.start()
    api = Api(process.base, process.token)
    try:
        template = await api.template(method="API", target={"url": url})
        for n in range(SUBMISSIONS):
            sub = await api.submit(template["id"], {"n": n})
            await api.wait_final(sub["id"])
    finally:
        await api.close()
        assert process.proc is not None
        os.kill(daemon_child(process.proc.pid), signal.SIGTERM)
        await asyncio.to_thread(process.proc.wait, 30)

    api_port = int(process.base.rsplit(":", 1)[1])
    events = read_trace(trace, api_port, sink.port)
    kinds = [event.kind for event in events]

    assert kinds.count("post") == SUBMISSIONS
    assert kinds.count("ack") == SUBMISSIONS
    assert kinds.count("send") == SUBMISSIONS
    assert kinds.count("connect") >= 1
    # The row is synced to the WAL between the request and its 202.
    assert synced_between(events, "post", "ack") == (SUBMISSIONS, 0)
    # The claim is synced between the 202 and the request to the destination,
    # and before the connection is opened.
    assert synced_between(events, "ack", "send") == (SUBMISSIONS, 0)
    connects, unsynced = synced_between(events, "ack", "connect")
    assert unsynced == 0
    assert connects >= 1
