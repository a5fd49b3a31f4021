"""The daemon run in-process with its API on 127.0.0.1, and a client of it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from ptdaemon.config import load_config
from ptdaemon.daemon import Daemon

NOWHERE = "http://127.0.0.1:9/x"


class Client:
    def __init__(
        self, daemon: Daemon, token: str, session: aiohttp.ClientSession
    ) -> None:
        self.daemon = daemon
        self.base = f"http://{daemon.listen_address}"
        self.token = token
        self.session = session

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + path, data=data, headers=headers
        ) as reply:
            raw = await reply.read()
            return reply.status, json.loads(raw) if raw else None

    async def template(self, **fields: Any) -> dict[str, Any]:
        body = {"name": "t", "method": "API", "target": {"url": NOWHERE}, **fields}
        status, created = await self.call("POST", "/v1/templates", body)
        assert status == 201, created
        return created  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def running(config_path: Path) -> AsyncIterator[Client]:
    """The daemon in-process with its API on 127.0.0.1, and a client of it."""
    async with (
        Daemon(load_config(config_path), api=True) as daemon,
        aiohttp.ClientSession() as session,
    ):
        token_file = config_path.parent / "state" / "admin.token"
        yield Client(daemon, token_file.read_text().strip(), session)
