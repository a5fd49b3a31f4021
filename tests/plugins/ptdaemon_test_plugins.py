"""Plugins for CUSTOM delivery, one per behaviour the tests check."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ptdaemon import PermanentFailure, RetryLater

# How long `hang` blocks its thread: far past any test's template timeout.
HANG_SECONDS = 30.0


def echo(payload: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return what it got, plus the context, from a worker thread."""
    return {
        "payload": payload,
        "submission_id": context.submission_id,
        "attempt": context.attempt,
        "template_name": context.template_name,
        "thread": "sync",
    }


async def async_echo(payload: dict[str, Any], context: Any) -> dict[str, Any]:
    """The same as `echo`, awaited on the daemon's event loop."""
    await asyncio.sleep(0)
    return {**echo(payload, context), "thread": "async"}


def busy(payload: dict[str, Any], context: Any) -> dict[str, Any]:
    """Ask for a retry on the first attempt, then accept."""
    if context.attempt == 1:
        raise RetryLater(delay_seconds=0.2)
    return {"accepted_on": context.attempt}


def refuse(payload: dict[str, Any], context: Any) -> None:
    raise PermanentFailure("the registry refused this form")


def crash(payload: dict[str, Any], context: Any) -> None:
    raise KeyError("missing_column")


def hang(payload: dict[str, Any], context: Any) -> None:
    """Block its thread well past the timeout (a hung plugin)."""
    time.sleep(HANG_SECONDS)
