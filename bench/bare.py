"""The ceiling: a bare uvloop + aiohttp client loop, no queue and no store.

Run as `python -m bench.bare URL`. It reads one JSON command per line on
standard input and answers `{"started": wall time}` when it is done:
- `{"mode": "burst", "bodies": [...], "concurrency": C}`: post them all,
  C at a time;
- `{"mode": "open", "bodies": [...], "start": T, "rate": R}`: post body i
  at wall time T + i / R without waiting for earlier replies;
- `{"mode": "at", "bodies": [...], "dues": [...]}`: post body i at wall
  time dues[i], each on its own timer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp
import msgspec


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as reply:
        await reply.read()


async def burst(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], concurrency: int
) -> None:
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            await post(session, url, body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def at_times(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], dues: list[float]
) -> None:
    async def one(body: bytes, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.time()))
        await post(session, url, body)

    await asyncio.gather(*(one(b, d) for b, d in zip(bodies, dues, strict=True)))


async def serve(url: str) -> None:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=100)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command: dict[str, Any] = msgspec.json.decode(line)
            bodies = [msgspec.json.encode(body) for body in command["bodies"]]
            started = time.time()
            if command["mode"] == "burst":
                await burst(session, url, bodies, command["concurrency"])
            elif command["mode"] == "open":
                start, rate = command["start"], command["rate"]
                dues = [start + i / rate for i in range(len(bodies))]
                await at_times(session, url, bodies, dues)
            else:
                await at_times(session, url, bodies, command["dues"])
            print(msgspec.json.encode({"started": started}).decode(), flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1]))
