"""The CUSTOM dispatcher: hands the mapped payload to a plugin function.

A handler is `package.module:function` or the name of an entry point in
group `ptdaemon.dispatchers`. Plain functions run in a small pool of daemon
threads of their own; coroutine functions are awaited on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import inspect
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ptdaemon.dispatch.base import REPLY_READ_BYTES, Delivery, Result
from ptdaemon.errors import DeliveryError, InvalidError, PermanentFailure, RetryLater
from ptdaemon.models import CustomTarget, ErrorCategory, Method, Template

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "ptdaemon.dispatchers"
POOL_THREADS: Final = 4
TRACEBACK_KEEP_CHARS: Final = 4096

Handler = Callable[[dict[str, Any], "PluginContext"], Any]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin learns about the attempt it runs for (read-only)."""

    submission_id: str
    attempt: int
    template_name: str


class HandlerError(ValueError):
    """A handler name that leads to no callable."""


def resolve_handler(name: str) -> Handler:
    """Find the callable a handler name means; raise HandlerError if none."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise HandlerError(f"cannot import module {module_name!r}: {exc}") from exc
        for part in attribute.split("."):
            if not hasattr(found, part):
                raise HandlerError(f"module {module_name!r} has no {attribute!r}")
            found = getattr(found, part)
    else:
        points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
        if not points:
            raise HandlerError(
                f"no entry point {name!r} in group {ENTRY_POINT_GROUP}"
                " (or use package.module:function)"
            )
        try:
            found = next(iter(points)).load()
        except (ImportError, AttributeError) as exc:
            raise HandlerError(f"entry point {name!r} cannot be loaded: {exc}") from exc
    if not callable(found):
        raise HandlerError(f"{name!r} is not callable")

    return found  # type: ignore[no-any-return]


def _is_coroutine_function(handler: Any) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - objects with async __call__
    return inspect.iscoroutinefunction(call)


class _ThreadPool:
    """A few daemon threads that run blocking plugin calls.

    Daemon threads, unlike a ThreadPoolExecutor's, do not hold up the
    process at exit when a plugin never returns.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, func: Callable[[], Any]) -> asyncio.Future[Any]:
        """Start `func` in a pool thread; the future gets its result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(outcome: Any, failed: bool) -> None:
            if future.done():
                return
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        def job() -> None:
            try:
                outcome, failed = func(), False
            # Handed to the awaiting task, which turns it into an attempt error.
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
                outcome, failed = exc, True
            # The loop is closed when the daemon stopped while the plugin ran.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, outcome, failed)

        self._start_threads()
        self._jobs.put(job)

        return future

    def _start_threads(self) -> None:
        while len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name="ptdaemon-plugin", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def shutdown(self) -> None:
        """Let idle threads end; a thread stuck in a plugin is left behind."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()


class CustomDispatcher:
    """Delivers CUSTOM templates by calling their plugin handler."""

    method = Method.CUSTOM

    def __init__(self, *, threads: int = POOL_THREADS) -> None:
        self._pool = _ThreadPool(threads)
        self._handlers: dict[str, Handler] = {}

    def check_target(self, target: msgspec.Struct) -> None:
        assert isinstance(target, CustomTarget)
        try:
            self._handlers[target.handler] = resolve_handler(target.handler)
        except HandlerError as exc:
            raise InvalidError(
                f"target.handler: {exc}",
                code="unknown_handler",
                details={"field": "target.handler"},
            ) from exc

    def destination_key(self, template: Template) -> str:
        return f"custom:{template.target.get('handler', '')}"

    async def deliver(self, delivery: Delivery) -> Result:
        name = str(delivery.template.target.get("handler", ""))
        handler = self._handler(name)
        context = PluginContext(
            submission_id=delivery.submission_id,
            attempt=delivery.attempt,
            template_name=delivery.template.name,
        )
        timeout_seconds = delivery.template.timeout_seconds
        try:
            value = await self._call(
                handler, delivery.payload, context, timeout_seconds
            )
        except _PluginTimeoutError as exc:
            log.warning(
                "plugin timed out",
                extra={"submission_id": delivery.submission_id, "handler": name},
            )
            raise DeliveryError(
                f"plugin {name} did not return within {timeout_seconds:g} s",
                category=ErrorCategory.TIMEOUT,
                details={"exception": "TimeoutError"},
            ) from exc
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            raise _plugin_failure(name, delivery, exc) from exc

        encoded = _json_bytes(name, value)
        if len(encoded) > REPLY_READ_BYTES:
            # The work is done: keep the verdict, not a reply too big to store.
            log.warning(
                "plugin reply not kept",
                extra={"handler": name, "bytes": len(encoded)},
            )
            return Result(details={"response_bytes": len(encoded)})
        return Result(response_data=msgspec.json.decode(encoded))

    async def close(self) -> None:
        self._pool.shutdown()

    def _handler(self, name: str) -> Handler:
        handler = self._handlers.get(name)
        if handler is None:
            try:
                handler = resolve_handler(name)
            except HandlerError as exc:
                raise DeliveryError(
                    f"handler {name}: {exc}",
                    category=ErrorCategory.VALIDATION,
                    details={"exception": "HandlerError"},
                ) from exc
            self._handlers[name] = handler
        return handler

    async def _call(
        self,
        handler: Handler,
        payload: dict[str, Any],
        context: PluginContext,
        timeout_seconds: float,
    ) -> Any:
        # Limit: a plain function that never returns keeps its pool thread;
        # once every thread is stuck, further sync plugin calls time out.
        if _is_coroutine_function(handler):
            pending: Any = handler(payload, context)
        else:
            pending = self._pool.run(lambda: handler(payload, context))
        timer = asyncio.timeout(timeout_seconds)
        try:
            async with timer:
                return await pending
        except TimeoutError as exc:
            if timer.expired():
                raise _PluginTimeoutError from exc
            raise


class _PluginTimeoutError(Exception):
    """The handler ran past the template's timeout."""


def _plugin_failure(name: str, delivery: Delivery, exc: BaseException) -> DeliveryError:
    if isinstance(exc, RetryLater):
        return DeliveryError(
            str(exc),
            category=ErrorCategory.REMOTE,
            retryable=True,
            details={"exception": "RetryLater", "delay_seconds": exc.delay_seconds},
            retry_after_seconds=exc.delay_seconds,
        )
    if isinstance(exc, PermanentFailure):
        return DeliveryError(
            str(exc) or "plugin reported a permanent failure",
            category=ErrorCategory.REMOTE,
            retryable=False,
            details={"exception": "PermanentFailure"},
        )
    log.warning(
        "plugin raised",
        extra={
            "submission_id": delivery.submission_id,
            "handler": name,
            "exception": type(exc).__name__,
        },
    )
    trace = "".join(traceback.format_exception(exc))
    return DeliveryError(
        f"plugin {name} raised {type(exc).__name__}: {exc}",
        category=ErrorCategory.SYSTEM,
        retryable=True,
        details={
            "exception": type(exc).__name__,
            "traceback": trace[-TRACEBACK_KEEP_CHARS:],
        },
    )


def _json_bytes(name: str, value: Any) -> bytes:
    """A plugin's return value as JSON, or the error that it is not JSON."""
    try:
        return msgspec.json.encode(value)
    except (msgspec.EncodeError, TypeError, ValueError) as exc:
        raise DeliveryError(
            f"plugin {name} returned a value that is not JSON: {exc}",
            category=ErrorCategory.SYSTEM,
            details={"exception": type(exc).__name__},
        ) from exc


__all__ = ["CustomDispatcher", "PluginContext", "resolve_handler"]
