"""The composition root: opens the state, starts the pieces, stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web

from ptdaemon import queries
from ptdaemon.api.app import STATE_KEY, build_app
from ptdaemon.cache import TemplateCache
from ptdaemon.config import Config, load_config
from ptdaemon.dispatch.base import Dispatcher
from ptdaemon.dispatch.http import ResolverFactory
from ptdaemon.dispatch.registry import build_dispatchers, close_dispatchers
from ptdaemon.engine import Engine, interrupted_finish
from ptdaemon.errors import (
    ConfigError,
    ListenError,
    LockedError,
    ServiceError,
    StoreError,
)
from ptdaemon.metrics import Metrics
from ptdaemon.models import (
    Method,
    Status,
    Submission,
    TemplateIn,
    User,
    submission_view,
)
from ptdaemon.notify import Notifier
from ptdaemon.retention import Retention, max_age_seconds
from ptdaemon.service import ADMIN_NAME, Service
from ptdaemon.store import Store
from ptdaemon.templates import TemplateRules
from ptdaemon.timeutil import now as wall_now

log = logging.getLogger(__name__)

DB_NAME = "ptdaemon.db"
LOCK_NAME = "lock"
TOKEN_NAME = "admin.token"  # noqa: S105 - a file name


class StateLock:
    """An exclusive lock on the state directory, held by one process."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"state dir {self.path.parent} is in use by another ptdaemon "
                f"(pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the process that holds the lock; None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Daemon:
    """The whole daemon, for `ptdaemon serve` or inside another asyncio program.

    Embedded use::

        async with Daemon(config, api=False) as daemon:
            submission = await daemon.submit(template_id, {"name": "Ada"})
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | None = None,
        *,
        api: bool = True,
        user: str | None = None,
        resolver: ResolverFactory | None = None,
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(config)
        self.config = config
        self._api_enabled = api
        self._user_name = user or ADMIN_NAME
        self._resolver = resolver
        self._lock = StateLock(config.state_path)
        self._store: Store | None = None
        self._dispatchers: dict[Method, Dispatcher] = {}
        self._engine: Engine | None = None
        self._retention: Retention | None = None
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self._service: Service | None = None
        self._user: User | None = None
        self.listen_address: str | None = None
        self.metrics = Metrics()

    @property
    def service(self) -> Service:
        if self._service is None:
            raise RuntimeError("the daemon is not started")
        return self._service

    async def wait_failed(self) -> None:
        """Return once the store has failed a write to disk; the daemon must stop."""
        if self._store is None:
            raise RuntimeError("the daemon is not started")
        await self._store.failed.wait()

    @property
    def user(self) -> User:
        if self._user is None:
            raise RuntimeError("the daemon is not started")
        return self._user

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        check_templates(config)
        state_dir = config.state_path
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            state_dir.chmod(0o700)
            for root in config.file_root_paths:
                root.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as exc:
            raise StoreError(
                f"cannot use state dir {state_dir}: {exc.strerror or exc}"
            ) from exc
        log.info("config loaded", extra=config.summary())
        try:
            await self._start_pieces(state_dir)
        except BaseException:
            await self.stop()
            raise

    async def _start_pieces(self, state_dir: Path) -> None:
        config = self.config
        # Storage first: everything else reads from it.
        self._store = store = await Store.open(state_dir / DB_NAME)
        store.on_commit = self.metrics.committed
        self._dispatchers = build_dispatchers(config, resolver=self._resolver)
        templates = TemplateCache(store)
        self._engine = engine = Engine(
            store,
            self._dispatchers,
            concurrency=config.dispatch.concurrency,
            per_destination=config.dispatch.per_host_concurrency,
            window=config.dispatch.heap_window,
            metrics=self.metrics,
            templates=templates,
        )
        scheduler = engine.scheduler
        self._service = service = Service(
            store,
            scheduler,
            self._dispatchers,
            default_timeout_seconds=config.dispatch.timeout_seconds,
            base_dir=config.base_dir,
            templates_per_user=config.limits.templates_per_user,
            unfinished_per_user=config.limits.unfinished_per_user,
            metrics=self.metrics,
            templates=templates,
        )

        # Users and the templates of the config file.
        await service.ensure_admin(state_dir / TOKEN_NAME)
        await self._sync_templates(service)
        user = await service.user_by_name(self._user_name)
        if user is None:
            raise ConfigError(f"no user named {self._user_name!r}")
        self._user = user

        # Recover what a crash left in flight, then start delivering.
        recovered = await store.write(recover_processing)
        if recovered:
            log.warning("interrupted attempts recovered", extra={"count": recovered})
        await scheduler.load()
        self._engine.start()
        self._retention = Retention(
            store, max_age_seconds=max_age_seconds(config.retention.finished_days)
        )
        self._retention.start()

        if self._api_enabled:
            await self._start_api(service)
        log.info(
            "daemon ready",
            extra={
                "state_dir": str(state_dir),
                "listen": self.listen_address,
                "queued": len(scheduler),
                "concurrency": config.dispatch.concurrency,
            },
        )

    async def _sync_templates(self, service: Service) -> None:
        if not self.config.templates:
            return
        admin = await service.user_by_name(ADMIN_NAME)
        if admin is None:
            raise ConfigError("templates in the config need the user 'admin'")
        for index, raw in enumerate(self.config.templates):
            spec = msgspec.convert(raw, TemplateIn, strict=True)
            try:
                await service.upsert_template(admin, spec)
            except ServiceError as exc:
                raise ConfigError(f"templates[{index}]: {exc.message}") from exc
        log.info(
            "config templates applied", extra={"count": len(self.config.templates)}
        )

    async def _start_api(self, service: Service) -> None:
        api = self.config.api
        self._app = build_app(
            service,
            max_body_bytes=api.max_body_bytes,
            rate_per_second=api.rate_per_second,
            rate_burst=api.rate_burst,
            metrics=self.metrics,
            metrics_public=api.metrics_public,
        )
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await self._bind(api.parse_listen())
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {api.listen}: {exc.strerror or exc}"
            ) from exc

    async def _bind(self, listen: tuple[str, int] | str) -> None:
        assert self._runner is not None
        site: web.BaseSite
        if isinstance(listen, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen)
            site = web.UnixSite(self._runner, listen)
            # Owner-only from the moment the socket exists: its clients send
            # bearer tokens.
            umask = os.umask(0o177)
            try:
                await site.start()
            finally:
                os.umask(umask)
            os.chmod(listen, 0o600)
            self.listen_address = f"unix:{listen}"
        else:
            host, port = listen
            site = web.TCPSite(self._runner, host, port)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            bound = sockets[0].getsockname()[1] if sockets else port
            self.listen_address = f"{host}:{bound}"

    async def stop(self) -> None:
        """Stop intake, drain attempts up to the grace period, close the store."""
        log.info("daemon stopping")
        # The API stays up while attempts drain, answering 503 to new calls.
        if self._app is not None:
            self._app[STATE_KEY]["stopping"] = True
        if self._retention is not None:
            await self._retention.stop()
            self._retention = None
        if self._engine is not None:
            await self._engine.stop(
                grace_seconds=self.config.daemon.shutdown_grace_seconds
            )
            self._engine = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            if self.listen_address and self.listen_address.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.listen_address.removeprefix("unix:"))
        await close_dispatchers(self._dispatchers)
        if self._store is not None:
            await self._store.close()
            self._store = None
        self._lock.release()
        log.info("daemon stopped")

    async def submit(
        self,
        template_id: str,
        data: dict[str, Any],
        *,
        scheduled_at: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a submission as this daemon's user; return it once stored."""
        body: dict[str, Any] = {"form_template_id": template_id, "data": data}
        if scheduled_at is not None:
            body["scheduled_at"] = scheduled_at
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        sub, _ = await self.service.create_submission(self.user, body)
        return submission_view(sub)

    async def get(self, submission_id: str) -> dict[str, Any]:
        return submission_view(
            await self.service.get_submission(self.user, submission_id)
        )

    async def queue_summary(self) -> queries.QueueSummary:
        """Due and running submissions of every user, read from the store."""
        if self._store is None:
            raise RuntimeError("the daemon is not started")
        now = wall_now()
        return await self._store.read(lambda conn: queries.queue_summary(conn, now))

    async def status_line(self) -> str:
        """A one-line summary for the service manager's status display."""
        summary = await self.queue_summary()
        oldest = summary.oldest_due_age_seconds
        line = f"{summary.depth} due, {summary.processing} in flight"

        return line if oldest is None else f"{line}, oldest due {oldest:.1f}s ago"


def check_templates(config: Config) -> None:
    """Apply the save rules to the config's templates, before any state exists."""
    rules = TemplateRules(
        build_dispatchers(config),
        default_timeout_seconds=config.dispatch.timeout_seconds,
        base_dir=config.base_dir,
    )
    owner = User(id="", name=ADMIN_NAME, admin=True, created_at=0.0)
    for index, raw in enumerate(config.templates):
        spec = msgspec.convert(raw, TemplateIn, strict=True)
        try:
            rules.build(owner, spec, None, 0.0)
        except ServiceError as exc:
            raise ConfigError(f"templates[{index}]: {exc.message}") from exc


def recover_processing(conn: Any) -> int:
    """Record the attempts a crash cut short (one transaction, at start)."""
    rows: list[Submission] = queries.processing_rows(conn)
    for sub in rows:
        number = sub.attempt_count + 1
        started = sub.processing_started_at or wall_now()
        finish = interrupted_finish(sub, number, started, None)
        queries.finish_attempt(conn, finish)
    return len(rows)


async def serve(config: Config, *, notifier: Notifier | None = None) -> int:
    """Run until SIGTERM or SIGINT; return the exit code.

    `notifier` tells a service manager when the daemon is ready and when it
    stops, and pings its watchdog; by default it is read from the environment.
    """
    if notifier is None:
        notifier = Notifier.from_environment(os.environ)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(config, api=True)
    await daemon.start()
    try:
        # Ready means: store open, scheduler loaded, API listening.
        notifier.ready(await _status_or(daemon, "ready"))
        notifier.start_watchdog(daemon.status_line)
        code = await _run_until_stopped(daemon, stop)
    finally:
        notifier.stopping()
        await daemon.stop()
        await notifier.close()
    return code


async def _run_until_stopped(daemon: Daemon, stop: asyncio.Event) -> int:
    """Wait for a signal (exit code 0) or a failed disk write (exit code 1)."""
    signalled = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(daemon.wait_failed())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    for task in (signalled, failed):
        task.cancel()
    if failed.done() and not failed.cancelled():
        log.error("disk write failed, stopping")
        return 1
    log.info("signal received, draining")
    return 0


async def _status_or(daemon: Daemon, fallback: str) -> str:
    try:
        return await daemon.status_line()
    except StoreError:
        return fallback


__all__ = ["Daemon", "StateLock", "Status", "recover_processing", "serve"]
