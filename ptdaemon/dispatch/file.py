"""The FILE dispatcher: writes each mapped payload to a file under a file root.

Confinement is checked when a template is saved and again on every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from msgspec import Struct

from ptdaemon import crashpoints
from ptdaemon.dispatch.base import Delivery, Result
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.mapping import (
    check_template_text,
    csv_document,
    placeholder_names,
    render,
)
from ptdaemon.models import ErrorCategory, FileTarget, Method, Template

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NAME_MAX_BYTES: Final = 255
_FILE_MODE: Final = 0o644
_DIR_MODE: Final = 0o755
_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK keeps a FIFO planted under the file's name from blocking the
# open forever; it changes nothing for regular files.
_OPEN_APPEND: Final = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_NONBLOCK
)


class _ConfinementError(ValueError):
    """A directory or file name lies outside what FILE targets may touch."""


def _validation_error(message: str, exception: str) -> DeliveryError:
    return DeliveryError(
        message,
        category=ErrorCategory.VALIDATION,
        details={"retryable": False, "exception": exception},
    )


def _system_error(exc: OSError, directory: str) -> DeliveryError:
    reason = exc.strerror or str(exc)
    return DeliveryError(
        f"cannot write to {directory}: {reason}",
        category=ErrorCategory.SYSTEM,
        retryable=True,
        details={
            "retryable": True,
            "exception": type(exc).__name__,
            "errno": exc.errno,
        },
    )


def _name_problem(name: str) -> str | None:
    """Say why `name` is not a single safe path component, or None if it is."""
    if name in ("", ".", ".."):
        return "must not be empty, '.' or '..'"
    if any(char in name for char in "/\\\0"):
        return "must not contain '/', '\\' or NUL"
    if any(ord(char) < 0x20 or char == "\x7f" for char in name):
        return "must not contain control characters"
    if name.startswith("."):
        # Hidden, and the name space of the temporary files of atomic writes;
        # also what an empty placeholder before an extension leaves.
        return "must not start with '.'"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > NAME_MAX_BYTES:
        return f"is longer than {NAME_MAX_BYTES} bytes"

    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_directory(root: Path, directory: Path) -> int:
    """Open `directory` below `root` one component at a time, creating any missing.

    No component may be a symbolic link, so a link swapped in after the
    confinement check fails with ELOOP instead of leading outside the root.
    """
    fd = os.open(root, _OPEN_DIR)
    try:
        for part in directory.relative_to(root).parts:
            created = False
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, _DIR_MODE, dir_fd=fd)
                created = True
            child = os.open(part, _OPEN_DIR, dir_fd=fd)
            if created:
                os.fsync(fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise

    return fd


def _write_whole(root: Path, directory: Path, name: str, content: bytes) -> None:
    """Write the file atomically: temporary file, fsync, rename, fsync directory."""
    dir_fd = _open_directory(root, directory)
    temp = f".ptdaemon-{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temp, _OPEN_NEW, _FILE_MODE, dir_fd=dir_fd)
        try:
            # Raw os.write leaves nothing in a user-space buffer to flush.
            _write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        crashpoints.reach("file-written")
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _append_line(
    root: Path, directory: Path, name: str, first: bytes, later: bytes
) -> None:
    """Append `later` to the file, or `first` when the file is new or empty."""
    dir_fd = _open_directory(root, directory)
    try:
        fd = os.open(name, _OPEN_APPEND, _FILE_MODE, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _ConfinementError(f"{name!r} is not a regular file")
            try:
                _write_all(fd, first if info.st_size == 0 else later)
                os.fsync(fd)
            except OSError:
                # A write cut short (a full disk) must not leave half a line
                # for the next append to run on from.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, info.st_size)
                raise
            if info.st_size == 0:
                # The file may be new: its directory entry must be durable too.
                os.fsync(dir_fd)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


async def _run_to_end(func: Callable[..., _T], *args: Any) -> _T:
    """Run blocking file work in a thread and outlast a cancellation.

    A thread cannot be stopped: returning early would release the per-path
    lock while the write still runs, and a second append could interleave.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # marks it retrieved; the cancel wins
        raise


def _file_contents(target: FileTarget, payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """Return the bytes for a new (or empty) file and for an existing one."""
    if target.format != "csv":
        try:
            line = msgspec.json.encode(payload) + b"\n"
        except (msgspec.EncodeError, TypeError) as exc:
            message = f"payload cannot be written as JSON: {exc}"
            raise _validation_error(message, type(exc).__name__) from exc
        return line, line

    neutralise = target.csv_neutralise
    whole = csv_document(payload, neutralise=neutralise).encode()
    if not target.append:
        return whole, whole
    row = csv_document(payload, neutralise=neutralise, header=False).encode()

    return whole, row


class FileDispatcher:
    """Deliver by writing files into directories under `[dispatch] file_roots`."""

    method = Method.FILE

    def __init__(self, *, file_roots: list[Path], state_dir: Path) -> None:
        self._roots = [Path(os.path.realpath(root)) for root in file_roots]
        self._state_dir = Path(os.path.realpath(state_dir))
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    def _confine(self, directory: str) -> tuple[Path, Path]:
        """Return (root, resolved directory); raise _ConfinementError if outside."""
        if not self._roots:
            raise _ConfinementError("no [dispatch] file_roots are configured")
        if not os.path.isabs(directory):
            raise _ConfinementError(f"directory {directory!r} is not absolute")
        if "\x00" in directory:
            raise _ConfinementError("directory holds a NUL byte")
        real = Path(os.path.realpath(directory))
        if real.is_relative_to(self._state_dir):
            raise _ConfinementError(f"directory {directory!r} is in the state dir")
        for root in self._roots:
            if real.is_relative_to(root):
                return root, real

        raise _ConfinementError(f"directory {directory!r} is outside file_roots")

    def check_target(self, target: Struct | dict[str, Any]) -> None:
        """Raise InvalidError when the target can never be written."""
        file_target = _as_file_target(target)
        if file_target.append and file_target.format == "json":
            raise _invalid("target.append", "append needs format ndjson or csv")
        _check_filename(file_target.filename)

        try:
            self._confine(file_target.directory)
        except _ConfinementError as exc:
            raise _invalid("target.directory", str(exc)) from exc

    def destination_key(self, template: Template) -> str:
        directory = str(template.target.get("directory", ""))

        return "file:" + os.path.realpath(directory)

    async def deliver(self, delivery: Delivery) -> Result:
        target = _delivery_target(delivery.template)
        name = _render_filename(target, delivery)
        first, later = _file_contents(target, delivery.payload)
        root, directory = await self._confine_for_delivery(target.directory)

        path = directory / name
        try:
            if target.append:
                async with self._path_lock(str(path)):
                    await _run_to_end(_append_line, root, directory, name, first, later)
            else:
                await _run_to_end(_write_whole, root, directory, name, first)
        except _ConfinementError as exc:
            raise _validation_error(str(exc), type(exc).__name__) from exc
        except OSError as exc:
            raise _translate_os_error(exc, target.directory) from exc

        log.debug(
            "file written",
            extra={
                "submission_id": delivery.submission_id,
                "attempt": delivery.attempt,
                "size_bytes": len(first),
                "append": target.append,
            },
        )

        return Result(response_data={"path": str(path)})

    async def close(self) -> None:
        return None

    async def _confine_for_delivery(self, directory: str) -> tuple[Path, Path]:
        try:
            return await asyncio.to_thread(self._confine, directory)
        except _ConfinementError as exc:
            raise _validation_error(str(exc), type(exc).__name__) from exc

    @contextlib.asynccontextmanager
    async def _path_lock(self, key: str) -> AsyncIterator[None]:
        """Serialise appends to one file; forget the lock once nobody holds it."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key]
                del self._locks[key]


def _invalid(field: str, message: str) -> InvalidError:
    return InvalidError(f"{field}: {message}", details={"field": field})


def _as_file_target(target: Struct | dict[str, Any]) -> FileTarget:
    if isinstance(target, FileTarget):
        return target
    raw = target if isinstance(target, dict) else msgspec.to_builtins(target)
    try:
        return msgspec.convert(raw, FileTarget)
    except msgspec.ValidationError as exc:
        raise _invalid("target", str(exc)) from exc


def _check_filename(filename: str) -> None:
    """Refuse a filename that can never render to a single path component."""
    try:
        check_template_text(filename)
        names = placeholder_names(filename)
    except InvalidError as exc:
        raise _invalid("target.filename", exc.message) from exc
    sample = render(filename, dict.fromkeys(names, "x"))
    problem = _name_problem(sample)
    if problem is not None:
        raise _invalid("target.filename", f"the file name {problem}")


def _delivery_target(template: Template) -> FileTarget:
    try:
        return msgspec.convert(template.target, FileTarget)
    except msgspec.ValidationError as exc:
        raise _validation_error(f"target: {exc}", type(exc).__name__) from exc


def _render_filename(target: FileTarget, delivery: Delivery) -> str:
    day = datetime.fromtimestamp(delivery.started_at, UTC).strftime("%Y-%m-%d")
    fields = {
        **delivery.payload,
        "id": delivery.submission_id,
        "template": delivery.template.name,
        "date": day,
    }
    name = render(target.filename, fields)
    problem = _name_problem(name)
    if problem is not None:
        raise _validation_error(f"the file name {problem}", "DeliveryError")

    return name


def _translate_os_error(exc: OSError, directory: str) -> DeliveryError:
    # Opening with O_NOFOLLOW fails on a symbolic link: ELOOP for the file
    # itself, ENOTDIR for a directory component. Either is a rule, not a fault.
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        message = f"a symbolic link or a non-directory is in the path under {directory}"
        return _validation_error(message, type(exc).__name__)

    return _system_error(exc, directory)
