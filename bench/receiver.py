"""The destination of every system under test: records first arrivals and duplicates.

Run as `python -m bench.receiver`; it prints its port on standard output and
serves until its standard input closes. Any POST whose JSON body has an
`id` counts as a delivery and gets `200 {}`. Control routes:
`GET /wait?n=N&timeout=S` answers once N distinct ids have arrived (or the
time is up), `GET /dump` gives every first arrival time and the duplicate
count, `POST /reset` forgets them.

The HTTP/1.1 handling is a small keep-alive parser of its own (requests with
a Content-Length, no chunked bodies) so that the receiver costs far less CPU
than any sender it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from urllib.parse import parse_qs, urlsplit

import msgspec

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Delivery(msgspec.Struct):
    id: str


class Record:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.tasks: set[asyncio.Future[None]] = set()

    def arrive(self, key: str) -> None:
        if key in self.arrivals:
            self.duplicates += 1
            return
        self.arrivals[key] = time.time()
        if self.waiters and len(self.arrivals) >= min(n for n, _ in self.waiters):
            self.wake()

    def wake(self) -> None:
        count = len(self.arrivals)
        for n, future in self.waiters:
            if n <= count and not future.done():
                future.set_result(None)
        self.waiters = [(n, f) for n, f in self.waiters if not f.done()]

    async def wait(self, n: int, timeout: float) -> None:
        if len(self.arrivals) >= n:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((n, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.waiters = [(m, f) for m, f in self.waiters if f is not future]


class Http(asyncio.Protocol):
    def __init__(self, record: Record) -> None:
        self.record = record
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, target, _ = head.split(" ", 2)
            self.handle(method, target, body)

    def handle(self, method: str, target: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "POST" and not target.startswith("/reset"):
            with contextlib.suppress(msgspec.ValidationError):
                self.record.arrive(msgspec.json.decode(body, type=Delivery).id)
            self.transport.write(OK)
            return
        task = asyncio.ensure_future(self.control(method, target))
        self.record.tasks.add(task)
        task.add_done_callback(self.record.tasks.discard)

    async def control(self, method: str, target: str) -> None:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        record = self.record
        if parts.path == "/wait":
            await record.wait(int(query["n"]), float(query.get("timeout", "60")))
            payload = {"count": len(record.arrivals)}
        elif parts.path == "/dump":
            payload = {"arrivals": record.arrivals, "duplicates": record.duplicates}
        elif method == "POST" and parts.path == "/reset":
            record.arrivals = {}
            record.duplicates = 0
            payload = {}
        else:
            payload = {"error": "unknown route"}
        self.reply(msgspec.json.encode(payload))

    def reply(self, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    record = Record()
    server = await loop.create_server(lambda: Http(record), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    # Serve until the parent closes our standard input (or dies).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
