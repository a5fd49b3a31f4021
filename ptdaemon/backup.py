"""Consistent copies of a live database, and what a status report reads from it.

Both open a connection of their own, never the daemon's: in WAL mode a
reader does not block the daemon's writer, it only holds back checkpoints
while it reads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Final

import msgspec

from ptdaemon import queries
from ptdaemon.errors import StoreError
from ptdaemon.store import BUSY_TIMEOUT_MS
from ptdaemon.timeutil import now as wall_now


class BackupResult(msgspec.Struct, kw_only=True):
    path: str
    bytes: int
    submissions: int
    attempts: int


class DatabaseSize(msgspec.Struct, kw_only=True):
    path: str
    bytes: int
    wal_bytes: int
    free_bytes: int


COUNTS: Final = (
    "SELECT (SELECT count(*) FROM submissions), (SELECT count(*) FROM attempts)"
)


def _open(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(f"no database at {path}")
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return conn


def backup_database(source: Path, destination: Path) -> BackupResult:
    """Copy `source` to `destination` as one snapshot; refuse to overwrite.

    The copy is written beside the destination, checked, synced and then
    renamed into place, so `destination` only ever holds a whole backup.
    """
    if destination.exists():
        raise FileExistsError(f"{destination} already exists")
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        _copy(source, partial)
        counts = _check(partial)
        _sync_file(partial)
        partial.rename(destination)
        _sync_file(destination.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise

    return BackupResult(
        path=str(destination),
        bytes=destination.stat().st_size,
        submissions=counts[0],
        attempts=counts[1],
    )


def _copy(source: Path, partial: Path) -> None:
    src = _open(source)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            # One step: the whole copy comes from one read snapshot. Smaller
            # steps would start over each time the daemon commits.
            src.backup(dst)
            # A backup is one self-contained file, not a WAL database.
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise StoreError(f"backup of {source} failed: {exc}") from exc
    finally:
        src.close()


def _check(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        [(verdict,)] = conn.execute("PRAGMA integrity_check").fetchall()
        if verdict != "ok":
            raise StoreError(f"the backup at {path} fails its check: {verdict}")
        submissions, attempts = conn.execute(COUNTS).fetchone()
    finally:
        conn.close()

    return int(submissions), int(attempts)


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_queue(path: Path) -> queries.QueueSummary:
    """The due queue of a database, read through a connection of its own."""
    conn = _open(path)
    try:
        return queries.queue_summary(conn, wall_now())
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()


def database_size(path: Path) -> DatabaseSize:
    """Bytes on disk of the database and its WAL, and how much of it is free."""
    conn = _open(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()
    wal = Path(f"{path}-wal")

    return DatabaseSize(
        path=str(path),
        bytes=path.stat().st_size,
        wal_bytes=wal.stat().st_size if wal.exists() else 0,
        free_bytes=int(page_size) * int(free_pages),
    )
