"""Retry policy: exponential backoff, Retry-After hints, and what follows a failure."""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections.abc import Callable
from datetime import UTC
from typing import Final

from msgspec import Struct

from ptdaemon.errors import DeliveryError
from ptdaemon.models import Status

RETRYABLE_HTTP_STATUSES: Final = frozenset({408, 425, 429})
_SECONDS: Final = re.compile(r"[0-9]+(\.[0-9]+)?")


def is_retryable_status(code: int) -> bool:
    """Say whether an HTTP status asks for another attempt (408, 425, 429, 5xx)."""
    return code in RETRYABLE_HTTP_STATUSES or 500 <= code <= 599


def backoff_delay(
    retry_count: int,
    *,
    base: float,
    cap: float,
    jitter: float = 0.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Return base * 2**retry_count seconds, capped, lengthened by jitter."""
    try:
        delay = min(math.ldexp(base, max(retry_count, 0)), cap)
    except OverflowError:
        # ldexp refuses results past the float range; those are past any cap.
        delay = cap
    if jitter <= 0:
        return delay
    jittered = delay * (1 + rand() * min(jitter, 1.0))

    return max(delay, min(jittered, cap))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Read a Retry-After header as seconds from `now`; None when unreadable."""
    text = (value or "").strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if moment.tzinfo is None:
        # RFC 5322 "-0000" means UTC with no zone information.
        moment = moment.replace(tzinfo=UTC)

    return max(moment.timestamp() - now, 0.0)


class Decision(Struct, frozen=True):
    """What happens to a submission after a failed attempt."""

    status: Status
    retry_count: int
    next_retry_at: float | None


def _hinted_delay(error: DeliveryError, *, cap: float) -> float:
    hint = error.retry_after_seconds
    if hint is None or math.isnan(hint):
        return 0.0

    return max(min(hint, cap), 0.0)


def decide(
    *,
    retry_count: int,
    max_retries: int,
    base: float,
    cap: float,
    jitter: float,
    error: DeliveryError,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Decide between another attempt and a final failure."""
    if not error.retryable or retry_count >= max_retries:
        return Decision(
            status=Status.FAILED, retry_count=retry_count, next_retry_at=None
        )

    delay = backoff_delay(retry_count, base=base, cap=cap, jitter=jitter, rand=rand)
    delay = max(delay, _hinted_delay(error, cap=cap))

    return Decision(
        status=Status.RETRYING, retry_count=retry_count + 1, next_retry_at=now + delay
    )
