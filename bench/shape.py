"""ptdaemon's shape with nothing durable: the architecture's ceiling.

The same API routes (single and batch create), a due-time heap woken by an
event or one timer, a global and a per-destination limit, and one shared
aiohttp client session; no store, no attempt records, no retries. Run as
`python -m bench.shape URL CONCURRENCY PER_HOST`; prints its port, serves
until stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import sys
import time
import uuid
from datetime import datetime

import aiohttp
import msgspec
from aiohttp import web


class Create(msgspec.Struct):
    form_template_id: str
    data: dict[str, object]
    scheduled_at: str | None = None


class Batch(msgspec.Struct):
    items: list[Create]


class Shape:
    def __init__(self, url: str, concurrency: int, per_host: int) -> None:
        self.url = url
        self.heap: list[tuple[float, int, str, bytes]] = []
        self.seq = itertools.count()
        self.changed = asyncio.Event()
        self.slots = asyncio.Semaphore(concurrency)
        self.per_host = asyncio.Semaphore(per_host)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def push(self, item: Create) -> dict[str, str]:
        due = time.time()
        if item.scheduled_at is not None:
            due = datetime.fromisoformat(item.scheduled_at).timestamp()
        key = str(uuid.uuid4())
        heapq.heappush(
            self.heap, (due, next(self.seq), key, msgspec.json.encode(item.data))
        )
        self.changed.set()
        return {"id": key, "status": "pending"}

    async def create(self, request: web.Request) -> web.Response:
        item = msgspec.json.decode(await request.read(), type=Create)
        return web.Response(status=202, body=msgspec.json.encode(self.push(item)))

    async def batch(self, request: web.Request) -> web.Response:
        items = msgspec.json.decode(await request.read(), type=Batch).items
        answer = {"items": [self.push(item) for item in items]}
        return web.Response(status=202, body=msgspec.json.encode(answer))

    async def run(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        while True:
            await self.slots.acquire()
            while not self.heap or self.heap[0][0] > time.time():
                self.changed.clear()
                delay = self.heap[0][0] - time.time() if self.heap else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), delay)
            _, _, _, body = heapq.heappop(self.heap)
            task = asyncio.create_task(self.deliver(body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def deliver(self, body: bytes) -> None:
        assert self.session is not None
        try:
            async with self.per_host:
                headers = {"Content-Type": "application/json"}
                async with self.session.post(self.url, data=body, headers=headers) as r:
                    await r.read()
        except (aiohttp.ClientError, TimeoutError):
            pass  # Limit: no retries and no record; that is the point of it.
        finally:
            self.slots.release()


async def serve(url: str, concurrency: int, per_host: int) -> None:
    shape = Shape(url, concurrency, per_host)
    app = web.Application()
    app.router.add_post("/v1/submissions", shape.create)
    app.router.add_post("/v1/submissions/batch", shape.batch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    task = asyncio.create_task(shape.run())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    task.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
