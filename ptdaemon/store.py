"""SQLite state: schema, migrations, and every query, behind one group-commit writer.

Writes are functions run on the writer connection's thread; the writer task
takes every write queued since its last commit and runs them in one
transaction, so one fsync serves many callers. Reads use their own
connection and run in parallel with writes (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite
import msgspec

from ptdaemon.errors import StorageFailedError, StorageUnavailableError, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]

MAX_BATCH: Final = 2000
BUSY_TIMEOUT_MS: Final = 5000
# Reader connections, each with its own thread: reads run in parallel with
# each other and with the writer (WAL).
READERS: Final = 2

MIGRATIONS: Final[list[str]] = [
    # 1: the first schema.
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        admin INTEGER NOT NULL,
        token_hash TEXT UNIQUE,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE UNIQUE INDEX users_live_name ON users(name) WHERE deleted_at IS NULL;
    CREATE TABLE templates (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (user_id, name)
    );
    CREATE TABLE submissions (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        form_template_id TEXT NOT NULL,
        data BLOB NOT NULL,
        status TEXT NOT NULL,
        retry_count INTEGER NOT NULL DEFAULT 0,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL,
        retry_backoff_seconds REAL NOT NULL,
        retry_backoff_max_seconds REAL NOT NULL,
        retry_jitter REAL NOT NULL,
        next_retry_at REAL,
        processing_started_at REAL,
        processing_completed_at REAL,
        processing_duration_ms INTEGER,
        response_data BLOB,
        error_message TEXT,
        error_category TEXT,
        error_details BLOB,
        idempotency_key TEXT,
        request_hash TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX submissions_due ON submissions(next_retry_at, seq)
        WHERE status IN ('pending', 'retrying');
    CREATE INDEX submissions_processing ON submissions(status)
        WHERE status = 'processing';
    CREATE INDEX submissions_user ON submissions(user_id, seq);
    CREATE INDEX submissions_user_status ON submissions(user_id, status, seq);
    CREATE INDEX submissions_template ON submissions(form_template_id, status);
    CREATE UNIQUE INDEX submissions_idempotency
        ON submissions(user_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        started_at REAL NOT NULL,
        duration_ms INTEGER,
        outcome TEXT NOT NULL,
        status INTEGER,
        error_category TEXT,
        error_message TEXT,
        error_details BLOB,
        reply TEXT
    );
    CREATE INDEX attempts_submission ON attempts(submission_id, number);
    CREATE INDEX attempts_started ON attempts(started_at);
    """,
    # 2: one row that readiness probes write, to prove the disk takes writes.
    """
    CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
    """,
    # 3: unfinished submissions per user, kept by triggers so that the
    # [limits] cap costs one lookup instead of a count.
    """
    CREATE TABLE unfinished (
        user_id TEXT PRIMARY KEY,
        n INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO unfinished (user_id, n)
        SELECT user_id, count(*) FROM submissions
        WHERE status IN ('pending', 'processing', 'retrying') GROUP BY user_id;
    CREATE TRIGGER unfinished_insert AFTER INSERT ON submissions
    WHEN NEW.status IN ('pending', 'processing', 'retrying')
    BEGIN
        INSERT INTO unfinished (user_id, n) VALUES (NEW.user_id, 1)
            ON CONFLICT (user_id) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER unfinished_update AFTER UPDATE OF status ON submissions
    WHEN (OLD.status IN ('pending', 'processing', 'retrying'))
        != (NEW.status IN ('pending', 'processing', 'retrying'))
    BEGIN
        INSERT INTO unfinished (user_id, n) VALUES (NEW.user_id,
            CASE WHEN NEW.status IN ('pending', 'processing', 'retrying')
            THEN 1 ELSE -1 END)
            ON CONFLICT (user_id) DO UPDATE SET n = n + excluded.n;
    END;
    CREATE TRIGGER unfinished_delete AFTER DELETE ON submissions
    WHEN OLD.status IN ('pending', 'processing', 'retrying')
    BEGIN
        UPDATE unfinished SET n = n - 1 WHERE user_id = OLD.user_id;
    END;
    """,
    # 4: statistics. Attempts carry their submission's template, so figures per
    # template need no join; the indexes cover each statistics query.
    # Limit: on an existing database, filling the new column reads every
    # attempt once, in the first start after the upgrade.
    """
    ALTER TABLE attempts ADD COLUMN form_template_id TEXT;
    UPDATE attempts SET form_template_id = (
        SELECT s.form_template_id FROM submissions AS s
        WHERE s.id = attempts.submission_id
    );
    CREATE INDEX attempts_template_started ON attempts(
        form_template_id, started_at, duration_ms, outcome, error_category
    );
    CREATE INDEX attempts_template_duration ON attempts(
        form_template_id, duration_ms, started_at
    );
    CREATE INDEX submissions_user_template ON submissions(
        user_id, form_template_id, status, created_at
    );
    CREATE INDEX submissions_user_due ON submissions(user_id, next_retry_at)
        WHERE status IN ('pending', 'retrying');
    CREATE INDEX submissions_unfinished ON submissions(status, next_retry_at)
        WHERE status IN ('pending', 'retrying', 'processing');
    """,
    # 5: retention finds finished submissions by age without a full scan.
    """
    CREATE INDEX submissions_finished ON submissions(updated_at)
        WHERE status IN ('completed', 'failed', 'cancelled');
    """,
    # 6: the statements that change a submission's state keep `unfinished`
    # themselves: row triggers made every UPDATE of a submission several
    # times dearer, claims included.
    """
    DROP TRIGGER unfinished_insert;
    DROP TRIGGER unfinished_update;
    DROP TRIGGER unfinished_delete;
    DELETE FROM unfinished;
    INSERT INTO unfinished (user_id, n)
        SELECT user_id, count(*) FROM submissions
        WHERE status IN ('pending', 'processing', 'retrying') GROUP BY user_id;
    """,
]


def encode_json(value: Any) -> bytes | None:
    return None if value is None else msgspec.json.encode(value)


def decode_json(blob: bytes | str | None) -> Any:
    return None if blob is None else msgspec.json.decode(blob)


SQLITE_IOERR: Final = 10


def is_io_failure(exc: BaseException) -> bool:
    """An I/O error of the disk (a failed write or fsync), not a full disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error)
        and code is not None
        and code & 0xFF == SQLITE_IOERR
    )


def is_storage_fault(exc: BaseException) -> bool:
    """Tell a full disk or a busy database from a bug."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return any(phrase in text for phrase in ("full", "locked", "busy", "disk i/o"))


@dataclass
class _Op:
    fn: WriteFn
    future: asyncio.Future[Any]


class Store:
    """The database of one daemon. Open with `await Store.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._pending: list[_Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Set once the disk failed a write: the daemon must stop.
        self.failed = asyncio.Event()
        self.commits = 0
        self.committed_ops = 0
        # Called after each group commit with its duration and size.
        self.on_commit: Callable[[float, int], None] | None = None

    @classmethod
    async def open(cls, path: Path) -> Store:
        store = cls(path)
        await store._connect()
        return store

    async def _connect(self) -> None:
        is_new = not self.path.exists() or self.path.stat().st_size == 0
        # SQLite gives the -wal and -shm files the mode of the database file,
        # so a private database file keeps them private from their first byte.
        await asyncio.to_thread(_create_private, self.path)
        try:
            self._writer = await aiosqlite.connect(self.path, isolation_level=None)
            await self._writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if is_new:
                # Must precede the first table: it cannot be switched on later
                # without a full VACUUM.
                await self._writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
            await self._writer.execute("PRAGMA journal_mode = WAL")
            await self._writer.execute("PRAGMA synchronous = FULL")
            await self._writer.execute("PRAGMA journal_size_limit = 67108864")
            await self._migrate()
            for _ in range(READERS):
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                self._readers.append(reader)
                await reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                await reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            await self._close_connections()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        await asyncio.to_thread(_make_private, self.path)
        self._task = asyncio.create_task(self._write_loop(), name="store-writer")
        log.info("store opened", extra={"path": str(self.path)})

    async def _migrate(self) -> None:
        assert self._writer is not None
        async with self._writer.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database {self.path} has schema {version}, newer than this "
                f"ptdaemon knows ({len(MIGRATIONS)})"
            )
        for number in range(version, len(MIGRATIONS)):
            script = MIGRATIONS[number]
            await self._writer.executescript(
                f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number + 1};"
                " COMMIT;"
            )
            log.info("store migrated", extra={"schema": number + 1})

    # -- writing -----------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` inside the next group commit; return once it is durable.

        `fn` runs on the store thread inside a savepoint: if it raises, its
        own changes are rolled back, the exception reaches this caller, and
        the other writes of the group still commit.
        """
        if self.failed.is_set():
            raise StorageFailedError("the store stopped after a disk I/O error")
        if self._closing or self._task is None:
            raise StorageUnavailableError("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(fn, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        assert self._writer is not None
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            ops = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            if self.failed.is_set():
                _fail_all(ops)
                continue
            await self._commit_group(ops)

    async def _commit_group(self, ops: list[_Op]) -> None:
        assert self._writer is not None
        raw = self._writer._conn
        started = time.perf_counter()
        try:
            results: list[tuple[bool, Any]] = await _on_thread(
                self._writer, _run_group, raw, [op.fn for op in ops]
            )
        except Exception as exc:
            error = _translate(exc)
            if isinstance(error, StorageFailedError):
                self.failed.set()
            log.exception("store commit failed", extra={"ops": len(ops)})
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(error)
            return
        self.commits += 1
        self.committed_ops += len(ops)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(ops))
        for op, (ok, value) in zip(ops, results, strict=True):
            if op.future.done():
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(_translate(value))

    async def maintain(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer's thread between two group commits.

        For statements that must run outside a transaction (incremental
        vacuum, checkpoints). `fn` must be short: writes wait while it runs.
        """
        if self._closing or self._writer is None or self.failed.is_set():
            raise StorageUnavailableError("the store is closed")
        try:
            result: T = await _on_thread(self._writer, fn, self._writer._conn)
        except sqlite3.Error as exc:
            error = _translate(exc)
            if isinstance(error, StorageFailedError):
                self.failed.set()
            raise error from exc
        return result

    # -- reading -----------------------------------------------------------

    async def read(
        self, fn: Callable[[sqlite3.Connection], T], *, ordered: bool = False
    ) -> T:
        """Run `fn` on a reader connection's thread, outside any write.

        Reads are spread over the readers; `ordered` ones all go to the first,
        so they finish in the order they were asked for.
        """
        if not self._readers:
            raise StorageUnavailableError("the store is closed")
        if ordered:
            reader = self._readers[0]
        else:
            self._next_reader = (self._next_reader + 1) % len(self._readers)
            reader = self._readers[self._next_reader]
        try:
            result: T = await _on_thread(reader, fn, reader._conn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        return result

    async def close(self) -> None:
        """Commit what is queued, then close the connections."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # The writer ends by itself once the queue is empty.
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        await self._close_connections()
        log.info("store closed", extra={"path": str(self.path)})

    async def _close_connections(self) -> None:
        for conn in [*self._readers, self._writer]:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()
        self._readers = []
        self._writer = None


def _create_private(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with contextlib.suppress(OSError):
        path.chmod(0o600)


def _make_private(path: Path) -> None:
    """The database and its WAL hold secrets: owner only, whatever the umask."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").chmod(0o600)


async def _on_thread(
    conn: aiosqlite.Connection, fn: Callable[..., Any], *args: Any
) -> Any:
    """Run `fn(*args)` on the connection's own thread, as one hop.

    Limit: aiosqlite has no public call for this; `_execute` is the one its
    own methods use, and the pinned version is what the tests run.
    """
    return await conn._execute(fn, *args)  # type: ignore[no-untyped-call]


def _run_group(conn: sqlite3.Connection, fns: list[WriteFn]) -> list[tuple[bool, Any]]:
    """Run a group of writes in one transaction (on the store thread)."""
    results: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for fn in fns:
            conn.execute("SAVEPOINT op")
            try:
                value = fn(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                if is_storage_fault(exc):
                    raise
                results.append((False, exc))
            else:
                conn.execute("RELEASE op")
                results.append((True, value))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _fail_all(ops: list[_Op]) -> None:
    for op in ops:
        if not op.future.done():
            op.future.set_exception(
                StorageFailedError("the store stopped after a disk I/O error")
            )


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        if is_io_failure(exc):
            return StorageFailedError(f"disk I/O error: {exc}")
        if is_storage_fault(exc):
            return StorageUnavailableError(f"storage unavailable: {exc}")
        return StoreError(f"database error: {exc}")
    return exc
