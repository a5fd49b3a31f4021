"""Fixtures that run the real `ptdaemon serve` and real destinations on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

# The ready line in either log format: `listen=ADDR` or `"listen": "ADDR"`.
READY = re.compile(r'daemon ready.*?listen"?(?:=|: ")([^\s",}]+)')
START_TIMEOUT_SECONDS = 15.0


@dataclass
class Reply:
    """One scripted answer of a sink."""

    status: int = 200
    body: bytes | str = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # With `drip` > 0: send the status and headers at once, then `count` bytes
    # of the body (taken from `body`, padded with spaces), one per `drip` s.
    drip: float = 0.0
    count: int = 0


@dataclass
class Seen:
    at: float
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


class Sink:
    """An aiohttp destination on 127.0.0.1 that answers from a script per path."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.defaults: dict[str, Reply] = {}
        self.requests: list[Seen] = []
        self.arrived = asyncio.Condition()
        self.port = 0
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *replies: Reply, then: Reply | None = None) -> str:
        self.scripts[path] = list(replies)
        self.defaults[path] = then or Reply()
        return self.url(path)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(
        self, path: str, count: int, timeout: float = 15.0
    ) -> list[Seen]:
        async with asyncio.timeout(timeout):
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.seen(path)) >= count)
        return self.seen(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(
            time.time(),
            request.method,
            request.path,
            CIMultiDict(request.headers),
            body,
        )
        self.requests.append(seen)
        async with self.arrived:
            self.arrived.notify_all()
        queue = self.scripts.get(request.path)
        reply = queue.pop(0) if queue else self.defaults.get(request.path, Reply())
        if reply.delay:
            # A delay ends early when the sink stops, so that teardown never
            # waits for a reply that nobody reads any more.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
        if reply.drip:
            return await self._drip(request, reply)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    async def _drip(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        """Headers now, then the body byte by byte; ends early when the sink stops."""
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        payload = body.ljust(reply.count)[: reply.count]
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            for index in range(len(payload)):
                await response.write(payload[index : index + 1])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), reply.drip)
                if self._stopping.is_set():
                    break
            await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def free_port() -> int:
    """A loopback port that nothing listens on (bound once, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    await server.stop()


@dataclass
class Answer:
    """One answer of the control API, whatever its body."""

    status: int
    headers: CIMultiDict[str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Api:
    """A JSON client of a running daemon."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, data=data, headers=sent
        ) as response:
            text = await response.read()
            payload = json.loads(text) if text else None
            return response.status, payload

    async def send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        auth: bool = True,
    ) -> Answer:
        """Send exactly these headers and bytes; `auth=False` sends no token."""
        sent = {"Authorization": f"Bearer {self.token}"} if auth else {}
        sent.update(headers or {})
        data: bytes | io.BytesIO | None = raw
        if raw is not None and len(raw) > 65536:
            data = io.BytesIO(raw)  # aiohttp warns about large raw bytes
        async with self.session.request(
            method, self.base + path, data=data, headers=sent
        ) as response:
            body = await response.read()
            return Answer(response.status, CIMultiDict(response.headers), body)

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = await self.request(method, path, body)
        assert status < 300, (status, payload)
        return payload

    async def template(self, **fields: Any) -> dict[str, Any]:
        body = {"name": f"t-{time.monotonic_ns()}", "retry_backoff_seconds": 0.2}
        body.update(fields)
        status, payload = await self.request("POST", "/v1/templates", body)
        assert status == 201, payload
        return payload  # type: ignore[no-any-return]

    async def submit(self, template_id: str, data: dict[str, Any], **extra: Any) -> Any:
        body = {"form_template_id": template_id, "data": data, **extra}
        status, payload = await self.request("POST", "/v1/submissions", body)
        assert status == 202, payload
        return payload

    async def wait_final(
        self, sub_id: str, timeout: float = 20.0, states: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        wanted = states or ("completed", "failed", "cancelled")
        deadline = time.monotonic() + timeout
        while True:
            sub = await self.ok("GET", f"/v1/submissions/{sub_id}")
            if sub["status"] in wanted:
                return sub  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, f"still {sub['status']}"
            await asyncio.sleep(0.05)

    async def attempts(self, sub_id: str) -> list[dict[str, Any]]:
        page = await self.ok("GET", f"/v1/submissions/{sub_id}/attempts")
        return page["items"]  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.session.close()


class DaemonProcess:
    """The real `ptdaemon serve`, run as a child process on a temporary state dir."""

    def __init__(
        self,
        root: Path,
        extra_config: str = "",
        *,
        grace: float = 5.0,
        allow_networks: str = '["127.0.0.0/8"]',
        daemon_config: str = 'log_level = "debug"\n',
        api_config: str = "rate_per_second = 0\n",
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        # Extra environment variables of the process, read at each start.
        self.env: dict[str, str] = dict(env or {})
        self.config_path = root / "config.toml"
        self.log_path = root / "daemon.log"
        self.drop = root / "drop"
        self.config_path.write_text(
            "[daemon]\n"
            'state_dir = "state"\n'
            f"shutdown_grace_seconds = {grace}\n" + daemon_config + "[api]\n"
            'listen = "127.0.0.1:0"\n' + api_config + "[dispatch]\n"
            'file_roots = ["drop"]\n'
            "timeout_seconds = 5\n"
            "[security]\n"
            f"allow_networks = {allow_networks}\n" + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        # A command that runs the daemon, such as strace with its options.
        self.wrapper: list[str] = []

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def token(self) -> str:
        return (self.state / "admin.token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def integrity_check(self) -> str:
        """SQLite's verdict on the database file ("ok" when sound)."""
        conn = sqlite3.connect(self.state / "ptdaemon.db", timeout=10)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()

    async def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "ptdaemon",
                    "serve",
                    "--config",
                    str(self.config_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=self.root,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            match = READY.search(self.log()[offset:])
            if match:
                self.base = "http://" + match.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.log()[offset:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.log()[offset:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def context_switches(self) -> int:
        """Voluntary and involuntary context switches of all the daemon's threads."""
        total = 0
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in status.read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split(":")[1])
        return total

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("daemon did not stop after SIGTERM")
            await asyncio.sleep(0.05)
        return self.proc.returncode


@pytest.fixture
async def start_daemon(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Start `ptdaemon serve`; returns (process, Api). Stopped at teardown."""
    started: list[tuple[DaemonProcess, Api]] = []

    async def start(
        extra_config: str = "",
        *,
        grace: float = 5.0,
        allow_networks: str = '["127.0.0.0/8"]',
        **options: Any,
    ) -> tuple[DaemonProcess, Api]:
        """`grace` is [daemon] shutdown_grace_seconds; `allow_networks` a TOML list.

        `options` go to DaemonProcess: `daemon_config` and `api_config` (lines
        of those tables), `env` (extra environment of the process).
        """
        process = DaemonProcess(
            tmp_path,
            extra_config,
            grace=grace,
            allow_networks=allow_networks,
            **options,
        )
        await process.start()
        api = Api(process.base, process.token)
        started.append((process, api))
        return process, api

    yield start
    for process, api in started:
        await api.close()
        if process.proc is not None and process.proc.poll() is None:
            await process.terminate()
