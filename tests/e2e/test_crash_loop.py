"""SIGKILL at random moments under load, then count what was lost or doubled.

The CI run kills the daemon at least 50 times while 16 clients submit and
a receiver fails some deliveries, and needs at least 20,000 acknowledged
submissions. The long run, by hand:

    PTDAEMON_CRASH_KILLS=500 PTDAEMON_CRASH_BUDGET_SECONDS=3600 \\
        .venv/bin/python -m pytest tests/e2e/test_crash_loop.py

Both print the counts at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.conftest import DaemonProcess

KILLS = int(os.environ.get("PTDAEMON_CRASH_KILLS", "50"))
ACKS = int(os.environ.get("PTDAEMON_CRASH_ACKS", "20000"))
BUDGET_SECONDS = float(os.environ.get("PTDAEMON_CRASH_BUDGET_SECONDS", "240"))
SUBMITTERS = 16
FAIL_RATE = 0.15
UPTIME_SECONDS = (0.2, 1.5)
DRAIN_SECONDS = 120.0
UNFINISHED = "('pending', 'retrying', 'processing')"


@dataclass
class Receiver:
    """A destination on 127.0.0.1 that fails some requests on purpose."""

    rng: random.Random
    requests: Counter[str] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    runner: web.AppRunner | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        self.requests[key] += 1
        await request.read()
        if self.rng.random() < FAIL_RATE:
            return web.Response(status=503)
        self.successes[key] += 1
        return web.Response(status=200, text='{"ok": true}')

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/in", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/in"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Load:
    """Clients that submit until told to stop or the daemon goes away."""

    session: aiohttp.ClientSession
    token: str
    template_id: str
    acked: list[str] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)

    async def submitter(self, base: str, stop: asyncio.Event, worker: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        body = {"form_template_id": self.template_id, "data": {"worker": worker}}
        while not stop.is_set():
            try:
                async with self.session.post(
                    base + "/v1/submissions", json=body, headers=headers
                ) as response:
                    payload = await response.json()
            except (aiohttp.ClientError, TimeoutError):
                return  # killed: whatever was in flight is not acknowledged
            if response.status == 202:
                self.acked.append(payload["id"])
            else:
                self.refused[response.status] += 1


def configure(process: DaemonProcess) -> None:
    text = process.config_path.read_text().replace(
        'log_level = "debug"', 'log_level = "info"'
    )
    text = text.replace(
        "[dispatch]\n", "[dispatch]\nconcurrency = 64\nper_host_concurrency = 32\n"
    )
    process.config_path.write_text(text)


def unfinished(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        query = f"SELECT count(*) FROM submissions WHERE status IN {UNFINISHED}"  # noqa: S608
        return int(conn.execute(query).fetchone()[0])
    finally:
        conn.close()


def stored(db: Path) -> tuple[dict[str, str], Counter[str]]:
    """Each submission's status, and its attempts that may have sent a request."""
    conn = sqlite3.connect(db)
    try:
        statuses = dict(conn.execute("SELECT id, status FROM submissions"))
        attempts = Counter(
            row[0]
            for row in conn.execute(
                "SELECT submission_id FROM attempts"
                " WHERE outcome IN ('success', 'error', 'interrupted')"
            )
        )
    finally:
        conn.close()
    return statuses, attempts


async def drain(process: DaemonProcess) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    while unfinished(process.state / "ptdaemon.db"):
        assert time.monotonic() < deadline, "the queue did not drain"
        await asyncio.sleep(0.2)


async def setup_template(process: DaemonProcess, url: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            process.base + "/v1/templates",
            json={
                "name": "crash",
                "method": "API",
                "target": {"url": url},
                "max_retries": 100,
                "retry_backoff_seconds": 0.05,
                "retry_backoff_max_seconds": 0.5,
                "timeout_seconds": 10,
            },
            headers={"Authorization": f"Bearer {process.token}"},
        ) as response,
    ):
        assert response.status == 201
        return str((await response.json())["id"])


@pytest.mark.timeout(BUDGET_SECONDS + DRAIN_SECONDS + 60)
async def test_random_sigkills_under_load_lose_and_double_nothing(tmp_path, capsys):
    rng = random.Random(int(os.environ.get("PTDAEMON_CRASH_SEED", "5")))
    receiver = Receiver(random.Random(rng.random()))
    await receiver.start()
    process = DaemonProcess(tmp_path)
    configure(process)
    db = process.state / "ptdaemon.db"
    started = time.monotonic()
    kills = 0
    bad_checks: list[str] = []
    connector = aiohttp.TCPConnector(limit=SUBMITTERS)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    )
    try:
        await process.start()
        load = Load(session, process.token, await setup_template(process, receiver.url))
        while kills < KILLS or len(load.acked) < ACKS:
            assert time.monotonic() - started < BUDGET_SECONDS, (
                f"only {kills} kills and {len(load.acked)} acknowledged in time"
            )
            if kills:
                await process.start()
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(load.submitter(process.base, stop, n))
                for n in range(SUBMITTERS)
            ]
            await asyncio.sleep(rng.uniform(*UPTIME_SECONDS))
            process.kill()
            kills += 1
            stop.set()
            await asyncio.gather(*workers)
            verdict = process.integrity_check()
            if verdict != "ok":
                bad_checks.append(verdict)
        loop_seconds = time.monotonic() - started

        await process.start()
        await drain(process)
        assert await process.terminate() == 0
    finally:
        await session.close()
        await receiver.stop()
        if process.proc is not None and process.proc.poll() is None:
            process.kill()

    statuses, attempts = stored(db)
    acked = set(load.acked)
    lost = [i for i in acked if i not in statuses]
    undelivered = [i for i in acked if receiver.successes[i] == 0]
    not_completed = [i for i in acked if statuses.get(i) != "completed"]
    doubled = [i for i, n in receiver.requests.items() if n > attempts[i]]
    processing = [i for i, s in statuses.items() if s == "processing"]
    report = (
        f"\ncrash loop: {kills} kills in {loop_seconds:.0f} s,"
        f" {len(acked)} acknowledged, {sum(receiver.requests.values())} deliveries"
        f" ({sum(receiver.successes.values())} answered 200),"
        f" {sum(attempts.values())} attempts recorded,"
        f" refused {dict(load.refused)};"
        f" lost {len(lost)}, acknowledged but never delivered {len(undelivered)},"
        f" not completed {len(not_completed)},"
        f" deliveries beyond recorded attempts {len(doubled)},"
        f" left processing {len(processing)},"
        f" integrity checks failed {len(bad_checks)} of {kills}"
    )
    with capsys.disabled():
        print(report)  # noqa: T201 - the counts are this test's report
    assert kills >= KILLS
    assert len(acked) >= ACKS
    assert lost == []
    assert undelivered == []
    assert not_completed == []
    assert doubled == []
    assert processing == []
    assert bad_checks == []
