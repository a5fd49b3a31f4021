"""Wall-clock times as float epoch seconds, and their RFC 3339 spelling."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now() -> float:
    return time.time()


def format_time(ts: float | None) -> str | None:
    """Spell an epoch time as RFC 3339 UTC with microseconds and a `Z`."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)

    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    """Read an RFC 3339 time that carries an offset; raise ValueError if not."""
    value = datetime.fromisoformat(text.replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError("time must carry a UTC offset")

    return value.timestamp()


def to_epoch(value: datetime) -> float:
    if value.tzinfo is None:
        raise ValueError("time must carry a UTC offset")
    return value.timestamp()
