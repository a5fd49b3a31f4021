"""The systems under test, each behind the same small interface.

A system starts its processes through the bench's `Children`, names the
PIDs whose trees its figures cover (`roots`), and offers three ways to
hand it forms: `burst` (as fast as it takes them), `open_loop` (form i at
start + i / rate, whether or not earlier ones were answered) and `at`
(form i due at dues[i]). Every form is delivered as a JSON POST to the
receiver.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from bench.procs import Children, free_port

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60.0
READY = re.compile(r"daemon ready .*listen=(\S+)")
Form = dict[str, Any]


@dataclass
class Env:
    children: Children
    work: Path
    target: str
    counter: itertools.count[int]

    def folder(self, name: str) -> Path:
        path = self.work / f"{name}-{next(self.counter)}"
        path.mkdir(parents=True)
        return path


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def wait_for_log(
    path: Path, pattern: re.Pattern[str], proc: Any
) -> re.Match[str]:
    """Wait for a line of a child's log (start-up only: the bench may poll)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: exited early:\n{text[-2000:]}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{path.name}: not ready in {START_TIMEOUT_SECONDS} s")


async def read_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(
        asyncio.to_thread(proc.stdout.readline), START_TIMEOUT_SECONDS
    )
    if not line:
        raise RuntimeError(f"{proc.args!r} closed its output")
    return line.decode().strip()


class System:
    """One system under test; subclasses fill in the hooks."""

    name: ClassVar[str]
    workloads: ClassVar[frozenset[str]] = frozenset({"burst", "open", "at", "idle"})
    # False where `burst` cannot tell when the last submission was accepted.
    has_submit: ClassVar[bool] = True
    # Set by a system that times its own first submission (the bare loop,
    # which gets its forms before it starts); 0 means the bench's clock.
    started = 0.0

    async def start(self, env: Env) -> None:
        raise NotImplementedError

    def roots(self) -> list[int]:
        raise NotImplementedError

    async def burst(self, forms: Sequence[Form]) -> float:
        """Hand over every form as fast as taken; the time the last was accepted."""
        raise NotImplementedError

    async def open_loop(self, forms: Sequence[Form], start: float, rate: float) -> None:
        raise NotImplementedError

    async def at(self, forms: Sequence[Form], dues: Sequence[float]) -> None:
        raise NotImplementedError

    async def stop(self, env: Env) -> None:
        raise NotImplementedError

    async def quiesce(self) -> None:
        """Close the bench's own connections to the system before an idle window."""


# -- systems with ptdaemon's API: ptdaemon itself and its shape -------------


class ApiSystem(System):
    """Creates over ptdaemon's routes, single or in batches."""

    batch: ClassVar[bool] = False
    single_concurrency = 64
    batch_size = 500
    batch_concurrency = 2

    def __init__(self) -> None:
        self.base = ""
        self.headers: dict[str, str] = {}
        self.template_id = "bench"
        self.session: aiohttp.ClientSession | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def roots(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def _open_session(self) -> None:
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=120)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    def _body(self, form: Form, due: float | None = None) -> Form:
        body: Form = {"form_template_id": self.template_id, "data": form}
        if due is not None:
            body["scheduled_at"] = iso(due)
        return body

    async def _post(self, path: str, body: Any) -> Any:
        assert self.session is not None
        headers = {**self.headers, "Content-Type": "application/json"}
        data = json.dumps(body).encode()
        async with self.session.post(self.base + path, data=data, headers=headers) as r:
            payload = await r.read()
            if r.status not in (201, 202):
                raise RuntimeError(
                    f"{self.name}: {path} answered {r.status}: {payload[:300]!r}"
                )
            return json.loads(payload)

    async def _create_many(self, bodies: list[Form]) -> None:
        for start in range(0, len(bodies), 1000):
            await self._post(
                "/v1/submissions/batch", {"items": bodies[start : start + 1000]}
            )

    async def burst(self, forms: Sequence[Form]) -> float:
        if self.batch:
            chunks = [
                [self._body(f) for f in forms[i : i + self.batch_size]]
                for i in range(0, len(forms), self.batch_size)
            ]
            pending = iter(chunks)
            workers = self.batch_concurrency

            async def work() -> None:
                for chunk in pending:
                    await self._post("/v1/submissions/batch", {"items": chunk})
        else:
            pending_forms = iter(forms)
            workers = self.single_concurrency

            async def work() -> None:
                for form in pending_forms:
                    await self._post("/v1/submissions", self._body(form))

        await asyncio.gather(*(work() for _ in range(workers)))
        return time.time()

    async def open_loop(self, forms: Sequence[Form], start: float, rate: float) -> None:
        tasks = []
        for index, form in enumerate(forms):
            delay = start + index / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(self._post("/v1/submissions", self._body(form)))
            )
        await asyncio.gather(*tasks)

    async def at(self, forms: Sequence[Form], dues: Sequence[float]) -> None:
        await self._create_many(
            [self._body(f, d) for f, d in zip(forms, dues, strict=True)]
        )

    async def quiesce(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def stop(self, env: Env) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.proc is not None:
            env.children.stop(self.proc, timeout=30)
            self.proc = None


# The one destination may take every attempt in flight, in ptdaemon and in
# its shape alike: with synchronous=FULL each attempt waits for two commits,
# so ten at a time (the default per host) would measure fsync latency.
CONCURRENCY = 100
PER_HOST = 100

PTDAEMON_CONFIG = f"""\
[daemon]
state_dir = "state"
log_level = "info"
[api]
listen = "127.0.0.1:0"
rate_per_second = 0
[dispatch]
timeout_seconds = 30
concurrency = {CONCURRENCY}
per_host_concurrency = {PER_HOST}
[limits]
unfinished_per_user = 100000000
[security]
allow_networks = ["127.0.0.0/8"]
"""


class Ptdaemon(ApiSystem):
    name = "ptdaemon"

    def __init__(self) -> None:
        super().__init__()
        self.root: Path | None = None
        # A command to run the daemon under, such as a profiler.
        self.wrapper: list[str] = []

    async def start(self, env: Env, root: Path | None = None) -> None:
        self.root = root or env.folder("ptdaemon")
        config = self.root / "config.toml"
        if not config.exists():
            config.write_text(PTDAEMON_CONFIG)
        await self.launch(env)
        self.template_id = await self._template(env.target)

    async def launch(self, env: Env) -> float:
        """Start `ptdaemon serve` on this root; return the seconds until ready."""
        assert self.root is not None
        log = self.root / "daemon.log"
        offset = log.stat().st_size if log.exists() else 0
        started = time.monotonic()
        self.proc = env.children.start(
            [
                *self.wrapper,
                PYTHON,
                "-m",
                "ptdaemon",
                "serve",
                "--config",
                str(self.root / "config.toml"),
            ],
            log=log,
            cwd=self.root,
        )
        match = await wait_for_log_after(log, offset, self.proc)
        ready = time.monotonic() - started
        self.base = "http://" + match.group(1)
        token = (self.root / "state" / "admin.token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        if self.session is None:
            self._open_session()
        return ready

    async def _template(self, target: str) -> str:
        assert self.session is not None
        async with self.session.get(
            self.base + "/v1/templates", headers=self.headers
        ) as r:
            for item in (await r.json())["items"]:
                if item["name"] == "bench":
                    return str(item["id"])
        template = {
            "name": "bench",
            "method": "HTTP_POST",
            "target": {"url": target, "encoding": "json"},
            "max_retries": 3,
            "retry_backoff_seconds": 1,
        }
        return str((await self._post("/v1/templates", template))["id"])


async def wait_for_log_after(
    path: Path, offset: int, proc: subprocess.Popen[bytes]
) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        match = READY.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"ptdaemon exited early:\n{text[-2000:]}")
        await asyncio.sleep(0.01)
    raise RuntimeError("ptdaemon not ready in time")


class PtdaemonBatch(Ptdaemon):
    name = "ptdaemon batch"
    batch = True
    workloads = frozenset({"burst"})


class Shape(ApiSystem):
    name = "shape"

    async def start(self, env: Env) -> None:
        self.proc = env.children.start(
            [PYTHON, "-m", "bench.shape", env.target, str(CONCURRENCY), str(PER_HOST)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        port = await read_line(self.proc)
        self.base = f"http://127.0.0.1:{port}"
        self._open_session()


class ShapeBatch(Shape):
    name = "shape batch"
    batch = True
    workloads = frozenset({"burst"})


# -- the bare client loop ----------------------------------------------------


class Bare(System):
    name = "bare loop"
    workloads = frozenset({"burst", "open", "at"})
    has_submit = False

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, env: Env) -> None:
        self.proc = env.children.start(
            [PYTHON, "-m", "bench.bare", env.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        await read_line(self.proc)

    def roots(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    async def _command(self, command: dict[str, Any]) -> float:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(
            asyncio.to_thread(self.proc.stdout.readline),  # type: ignore[union-attr]
            600,
        )
        self.started = float(json.loads(line)["started"])
        return time.time()

    async def burst(self, forms: Sequence[Form]) -> float:
        return await self._command(
            {"mode": "burst", "bodies": list(forms), "concurrency": 100}
        )

    async def open_loop(self, forms: Sequence[Form], start: float, rate: float) -> None:
        await self._command(
            {"mode": "open", "bodies": list(forms), "start": start, "rate": rate}
        )

    async def at(self, forms: Sequence[Form], dues: Sequence[float]) -> None:
        await self._command({"mode": "at", "bodies": list(forms), "dues": list(dues)})

    async def stop(self, env: Env) -> None:
        if self.proc is not None:
            env.children.stop(self.proc)
            self.proc = None


# -- peers with a broker or a queue file -------------------------------------


async def start_redis(env: Env, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's redis-server on a free loopback port, no persistence."""
    port = free_port()
    proc = env.children.start(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(folder),
            "--loglevel",
            "warning",
        ],
        log=folder / "redis.log",
    )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return proc, port
    raise RuntimeError("redis-server did not start")


class ThreadProducer(System):
    """Peers whose client is blocking: submissions go from one bench thread."""

    def send(self, form: Form, due: float | None = None) -> None:
        raise NotImplementedError

    async def burst(self, forms: Sequence[Form]) -> float:
        def run() -> float:
            for form in forms:
                self.send(form)
            return time.time()

        return await asyncio.to_thread(run)

    async def open_loop(self, forms: Sequence[Form], start: float, rate: float) -> None:
        def run() -> None:
            for index, form in enumerate(forms):
                delay = start + index / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                self.send(form)

        await asyncio.to_thread(run)

    async def at(self, forms: Sequence[Form], dues: Sequence[float]) -> None:
        def run() -> None:
            for form, due in zip(forms, dues, strict=True):
                self.send(form, due)

        await asyncio.to_thread(run)


class CeleryPrefork(ThreadProducer):
    name = "celery prefork"
    mode = "replaced"
    pool_args: ClassVar[list[str]] = ["--pool", "prefork"]

    def __init__(self) -> None:
        self.redis: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.app: Any = None

    async def start(self, env: Env) -> None:
        from celery import Celery

        folder = env.folder("celery")
        self.redis, port = await start_redis(env, folder)
        url = f"redis://127.0.0.1:{port}/0"
        self.worker = env.children.start(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "bench.peers.celery_app",
                "worker",
                "--loglevel",
                "INFO",
                *self.pool_args,
            ],
            log=folder / "worker.log",
            env={
                "BENCH_REDIS_URL": url,
                "BENCH_TARGET_URL": env.target,
                "BENCH_CELERY": self.mode,
            },
            cwd=REPO,
        )
        self.app = Celery("bench", broker=url, backend=url)
        self.app.conf.update(
            task_serializer="json", accept_content=["json"], task_track_started=True
        )

    def roots(self) -> list[int]:
        assert self.redis is not None and self.worker is not None
        return [self.worker.pid, self.redis.pid]

    def send(self, form: Form, due: float | None = None) -> None:
        eta = None if due is None else datetime.fromtimestamp(due, UTC)
        self.app.send_task("post", args=[form], eta=eta)

    async def stop(self, env: Env) -> None:
        if self.app is not None:
            self.app.close()
            self.app = None
        for proc in (self.worker, self.redis):
            if proc is not None:
                env.children.stop(proc, timeout=30)
        self.worker = self.redis = None


class CeleryTuned(CeleryPrefork):
    name = "celery tuned"
    mode = "tuned"
    pool_args: ClassVar[list[str]] = [
        "--pool",
        "threads",
        "--concurrency",
        "16",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


class Huey(ThreadProducer):
    name = "huey sqlite"

    def __init__(self) -> None:
        self.worker: subprocess.Popen[bytes] | None = None
        self.task: Any = None

    async def start(self, env: Env) -> None:
        from bench.peers.huey_tasks import make_huey

        folder = env.folder("huey")
        db = folder / "huey.db"
        self.worker = env.children.start(
            [
                PYTHON,
                "-m",
                "huey.bin.huey_consumer",
                "bench.peers.huey_app.huey",
                "--workers",
                "8",
                "--worker-type",
                "thread",
            ],
            log=folder / "consumer.log",
            env={"BENCH_HUEY_DB": str(db), "BENCH_TARGET_URL": env.target},
            cwd=REPO,
        )
        _, self.task = make_huey(str(db))

    def roots(self) -> list[int]:
        assert self.worker is not None
        return [self.worker.pid]

    def send(self, form: Form, due: float | None = None) -> None:
        if due is None:
            self.task(form)
        else:
            eta = datetime.fromtimestamp(due, UTC).replace(tzinfo=None)
            self.task.schedule(args=(form,), eta=eta)

    async def stop(self, env: Env) -> None:
        if self.worker is not None:
            env.children.stop(self.worker, timeout=30)
            self.worker = None


class Arq(System):
    name = "arq"
    concurrency = 16

    def __init__(self) -> None:
        self.redis: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.pool: Any = None

    async def start(self, env: Env) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        folder = env.folder("arq")
        self.redis, port = await start_redis(env, folder)
        self.worker = env.children.start(
            [PYTHON, "-m", "arq", "bench.peers.arq_app.WorkerSettings"],
            log=folder / "worker.log",
            env={"BENCH_REDIS_PORT": str(port), "BENCH_TARGET_URL": env.target},
            cwd=REPO,
        )
        self.pool = await create_pool(RedisSettings(host="127.0.0.1", port=port))

    def roots(self) -> list[int]:
        assert self.redis is not None and self.worker is not None
        return [self.worker.pid, self.redis.pid]

    async def send(self, form: Form, due: float | None = None) -> None:
        when = None if due is None else datetime.fromtimestamp(due, UTC)
        await self.pool.enqueue_job("post", form, _defer_until=when)

    async def burst(self, forms: Sequence[Form]) -> float:
        pending = iter(forms)

        async def work() -> None:
            for form in pending:
                await self.send(form)

        await asyncio.gather(*(work() for _ in range(self.concurrency)))
        return time.time()

    async def open_loop(self, forms: Sequence[Form], start: float, rate: float) -> None:
        tasks = []
        for index, form in enumerate(forms):
            delay = start + index / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(form)))
        await asyncio.gather(*tasks)

    async def at(self, forms: Sequence[Form], dues: Sequence[float]) -> None:
        for form, due in zip(forms, dues, strict=True):
            await self.send(form, due)

    async def stop(self, env: Env) -> None:
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None
        for proc in (self.worker, self.redis):
            if proc is not None:
                env.children.stop(proc, timeout=30)
        self.worker = self.redis = None


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        Ptdaemon,
        PtdaemonBatch,
        Shape,
        ShapeBatch,
        Bare,
        CeleryPrefork,
        CeleryTuned,
        Huey,
        Arq,
    )
}
