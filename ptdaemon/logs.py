"""Log lines on standard error: text with key=value fields, or one JSON object a line.

Fields whose names speak of tokens, passwords, secrets or authorization print `***`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from typing import IO, Any, Final

from aiohttp.http_exceptions import HttpProcessingError

from ptdaemon.redact import MASK

# API requests go to this logger, one line each: message "request finished",
# extra {"method", "path", "status", "duration_ms", "user_id", "remote"}.
ACCESS_LOGGER: Final = "ptdaemon.access"

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
SECRET_WORDS: Final = ("token", "password", "secret", "authorization")

# Whatever a blank record carries is not an `extra` field.
_RECORD_KEYS: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None))
) | {"message", "asctime"}
# A value prints bare unless it holds a space, a quote, `=`, `\` or a control.
_BARE: Final = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def is_secret_name(name: str) -> bool:
    secret = _secret_names.get(name)
    if secret is None:
        lowered = name.lower()
        secret = any(word in lowered for word in SECRET_WORDS)
        if len(_secret_names) < NAMES_REMEMBERED:
            _secret_names[name] = secret
    return secret


# Field names repeat from line to line: each is judged once.
NAMES_REMEMBERED: Final = 1000
_secret_names: dict[str, bool] = {}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra={...}` fields of a record, secret-named ones masked."""
    return {
        key: _mask(key, value)
        for key, value in vars(record).items()
        if key not in _RECORD_KEYS
    }


def _mask(key: str, value: Any) -> Any:
    if is_secret_name(key):
        return MASK
    if isinstance(value, dict):
        return {k: _mask(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask("", item) for item in value]
    return value


# The last second formatted, and its text: most lines share it with the one
# before. One tuple, replaced whole, so that threads never see half of it.
_last_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _last_second  # noqa: PLW0603 - a one-entry cache
    whole = int(record.created)
    last = _last_second
    if last[0] != whole:
        last = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        _last_second = last
    return f"{last[1]}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    if type(value) is int:
        return str(value)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict | list):
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    if _BARE.fullmatch(text):
        return text

    return json.dumps(text, ensure_ascii=False)


class _Formatter(logging.Formatter):
    def _exception_text(self, record: logging.LogRecord) -> str | None:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return record.exc_text or None


class TextFormatter(_Formatter):
    """`<UTC time> LEVEL logger message key=value ...`, then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record)} {record.levelname} {record.name}"
        parts = [head, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in extra_fields(record).items()]
        line = " ".join(parts)
        if exception := self._exception_text(record):
            line += "\n" + exception
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)

        return line


class JsonFormatter(_Formatter):
    """One object a line: time, level, logger, event, context, then any exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "context": extra_fields(record),
        }
        if exception := self._exception_text(record):
            document["exception"] = exception
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)

        return json.dumps(document, default=str, ensure_ascii=False)


class BadRequestFilter(logging.Filter):
    """Turn aiohttp's traceback for an unparsable request into one quiet line.

    The parser's message quotes the offending header line, which may carry a
    bearer token, and any client can send such requests: keep neither the
    text nor the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and record.levelno >= logging.ERROR:
            remote = record.args[0] if isinstance(record.args, tuple) else None
            record.msg = "bad http request"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.__dict__.update(
                {"remote": remote, "error": type(exc).__name__, "status": exc.code}
            )
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_bad_requests() -> None:
    """Install BadRequestFilter on aiohttp's server logger, once."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server.filters):
        server.addFilter(BadRequestFilter())


class _Handler(logging.StreamHandler[IO[str]]):
    """Writes the lines of one turn of the event loop in one write.

    A line logged below WARNING in a thread that runs an event loop waits
    until the loop has run the callbacks that were ready with it, so that a
    busy daemon makes one system call per turn rather than one per line.
    Warnings and worse, lines from other threads, and a backlog of
    `BUFFERED_LINES` are written at once, with whatever waits before them.
    """

    BUFFERED_LINES: Final = 256

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self.lost_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own rule: report, go on
            self.handleError(record)
            return
        # Handler.handle holds self.lock here.
        self._pending.append(line)
        if (
            record.levelno < logging.WARNING
            and len(self._pending) < self.BUFFERED_LINES
        ):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                if self._flush_on is not loop:
                    self._flush_on = loop
                    loop.call_soon(self._end_of_turn)
                return
        self._write_pending()

    def _end_of_turn(self) -> None:
        self._flush_on = None
        self.flush()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # Limit: a full, closed or broken log stream loses the lines, and
            # nothing says so; the daemon itself must go on.
            self.lost_lines += text.count(self.terminator)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()
        with contextlib.suppress(OSError, ValueError):
            super().flush()


def setup_logging(*, level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Send the "ptdaemon" loggers at `level`, and others' warnings, to `stream`.

    `fmt` is "text" or "json"; `stream` defaults to the current sys.stderr.
    Calling it again replaces the handler it installed before. Records still
    propagate to the root logger, so pytest's caplog sees them.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    formatters = {"text": TextFormatter, "json": JsonFormatter}
    if fmt not in formatters:
        raise ValueError(f"unknown log format {fmt!r}")
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatters[fmt]())

    # The handler sits on the root logger so that other libraries' warnings
    # (asyncio's "Task exception was never retrieved") are written too.
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        old.flush()
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = LEVELS[level.lower()]
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("ptdaemon").setLevel(numeric)
