"""Tests of the CUSTOM dispatcher with real plugins: entry points and module paths."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ptdaemon.dispatch.base import Delivery
from ptdaemon.dispatch.custom import CustomDispatcher, PluginContext
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import CustomTarget, ErrorCategory, Method, Template
from tests.factories import make_template

SUB_ID = "0b7e5a0e-0f38-4c1e-9a43-6f1f2b0c9d21"


def where_am_i(payload: dict[str, Any], context: PluginContext) -> dict[str, Any]:
    """A plain handler found by module path: says which thread ran it."""
    return {"thread": threading.current_thread().name, "got": payload}


def returns_a_lot(payload: dict[str, Any], context: PluginContext) -> Any:
    return {"blob": "x" * (200 * 1024)}


def returns_an_object(payload: dict[str, Any], context: PluginContext) -> Any:
    return object()


class Counter:
    """A callable object with an async __call__ (also awaited)."""

    async def __call__(self, payload: dict[str, Any], context: Any) -> int:
        await asyncio.sleep(0)
        return context.attempt


counter = Counter()


def _template(handler: str, timeout: float) -> Template:
    return make_template(
        Method.CUSTOM,
        {"handler": handler},
        name="registry-plugin",
        timeout_seconds=timeout,
    )


def delivery(handler: str, *, attempt: int = 1, timeout: float = 5.0) -> Delivery:
    return Delivery(
        submission_id=SUB_ID,
        attempt=attempt,
        template=_template(handler, timeout),
        payload={"full_name": "Ada"},
        started_at=0.0,
    )


@pytest.fixture
async def dispatcher() -> AsyncIterator[CustomDispatcher]:
    plugins = CustomDispatcher()
    yield plugins
    await plugins.close()


async def test_sync_entry_point_gets_payload_and_context(dispatcher: CustomDispatcher):
    result = await dispatcher.deliver(delivery("test-echo", attempt=2))

    assert result.response_data == {
        "payload": {"full_name": "Ada"},
        "submission_id": SUB_ID,
        "attempt": 2,
        "template_name": "registry-plugin",
        "thread": "sync",
    }


async def test_async_entry_point_is_awaited(dispatcher: CustomDispatcher):
    result = await dispatcher.deliver(delivery("test-async-echo"))

    assert result.response_data["thread"] == "async"
    assert result.response_data["payload"] == {"full_name": "Ada"}


async def test_plain_function_runs_in_the_plugin_pool(dispatcher: CustomDispatcher):
    result = await dispatcher.deliver(delivery("tests.test_dispatch_custom:where_am_i"))

    assert result.response_data["thread"] == "ptdaemon-plugin"
    assert threading.current_thread().name != "ptdaemon-plugin"


async def test_an_object_with_async_call_is_awaited(dispatcher: CustomDispatcher):
    result = await dispatcher.deliver(
        delivery("tests.test_dispatch_custom:counter", attempt=3)
    )

    assert result.response_data == 3


def test_context_is_read_only():
    context = PluginContext(submission_id="s", attempt=1, template_name="t")

    with pytest.raises(AttributeError):
        context.attempt = 2  # type: ignore[misc]


async def test_retry_later_is_a_retryable_remote_error_with_its_delay(
    dispatcher: CustomDispatcher,
):
    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery("test-retry", attempt=1))
    second = await dispatcher.deliver(delivery("test-retry", attempt=2))

    assert caught.value.category is ErrorCategory.REMOTE
    assert caught.value.retryable is True
    assert caught.value.retry_after_seconds == 0.2
    assert second.response_data == {"accepted_on": 2}


async def test_permanent_failure_is_final_with_its_message(
    dispatcher: CustomDispatcher,
):
    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery("test-refuse"))

    assert caught.value.category is ErrorCategory.REMOTE
    assert caught.value.retryable is False
    assert caught.value.message == "the registry refused this form"


async def test_any_other_exception_is_system_with_its_traceback(
    dispatcher: CustomDispatcher,
):
    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(delivery("test-crash"))

    error = caught.value
    assert error.category is ErrorCategory.SYSTEM
    assert error.retryable is True
    assert error.details["exception"] == "KeyError"
    assert "ptdaemon_test_plugins.py" in error.details["traceback"]
    assert "KeyError: 'missing_column'" in error.details["traceback"]


async def test_a_value_that_is_not_json_is_a_system_error(
    dispatcher: CustomDispatcher,
):
    with pytest.raises(DeliveryError) as caught:
        await dispatcher.deliver(
            delivery("tests.test_dispatch_custom:returns_an_object")
        )

    assert caught.value.category is ErrorCategory.SYSTEM


async def test_a_reply_over_64_kib_completes_without_being_kept(
    dispatcher: CustomDispatcher,
):
    result = await dispatcher.deliver(
        delivery("tests.test_dispatch_custom:returns_a_lot")
    )

    assert result.response_data is None
    assert result.details["response_bytes"] > 200 * 1024


async def test_a_hung_plugin_times_out_and_others_still_run(
    dispatcher: CustomDispatcher,
):
    hung = asyncio.create_task(dispatcher.deliver(delivery("test-hang", timeout=0.5)))
    started = time.monotonic()

    # While the hung call holds its thread, the loop and the pool keep working.
    echo = await dispatcher.deliver(delivery("test-echo"))
    with pytest.raises(DeliveryError) as caught:
        await hung

    assert echo.response_data["thread"] == "sync"
    assert caught.value.category is ErrorCategory.TIMEOUT
    assert caught.value.retryable is True
    assert time.monotonic() - started < 20  # far less than the plugin's 30 s


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        ("no-such-plugin", "no entry point"),
        ("no_such_module_here:run", "cannot import module"),
        ("os:no_such_function", "has no"),
        ("os:sep", "not callable"),
    ],
)
def test_an_unknown_handler_is_refused_when_saved(handler: str, words: str):
    with pytest.raises(InvalidError) as caught:
        CustomDispatcher().check_target(CustomTarget(handler=handler))

    assert caught.value.http_status == 422
    assert words in caught.value.message


def test_plugin_signals_are_importable_from_the_package():
    import ptdaemon

    assert ptdaemon.RetryLater(1.5).delay_seconds == 1.5
    assert str(ptdaemon.PermanentFailure("no")) == "no"
