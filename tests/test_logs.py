"""Tests of the log line formats, secret masking and logger levels."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from ptdaemon.logs import ACCESS_LOGGER, setup_logging

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger("ptdaemon")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


def fail(error: Exception) -> None:
    raise error


def text_log(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level=level, fmt="text", stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_text_line_carries_extras():
    stream = text_log()

    logging.getLogger("ptdaemon.engine").info(
        "attempt finished",
        extra={"submission_id": "abc", "status": 200, "duration_ms": 12},
    )

    line = stream.getvalue()
    expected = (
        f"{TIME} INFO ptdaemon.engine attempt finished"
        " submission_id=abc status=200 duration_ms=12\n"
    )
    assert re.fullmatch(expected, line)


def test_text_values_are_quoted_when_needed():
    stream = text_log()

    logging.getLogger("ptdaemon.api").info(
        "request refused",
        extra={
            "reason": 'bad "name" here',
            "empty": "",
            "lines": "a\nb",
            "none": None,
            "flag": True,
        },
    )

    line = stream.getvalue()
    assert 'reason="bad \\"name\\" here"' in line
    assert 'empty="" ' in line
    assert 'lines="a\\nb"' in line
    assert "none=null flag=true\n" in line
    assert line.count("\n") == 1


def test_text_masks_secret_named_fields():
    stream = text_log()

    logging.getLogger("ptdaemon.api").warning(
        "token refused",
        extra={
            "api_token": "tok-1",
            "smtp_password": "pw-2",
            "signing_secret": "sig-3",
            "Authorization": "Bearer b-4",
            "user_id": "u1",
        },
    )

    line = stream.getvalue()
    for value in ("tok-1", "pw-2", "sig-3", "b-4"):
        assert value not in line
    assert "api_token=*** smtp_password=*** signing_secret=*** " in line
    assert "Authorization=*** user_id=u1" in line


def test_text_appends_traceback():
    stream = text_log()

    try:
        fail(ValueError("boom"))
    except ValueError:
        logging.getLogger("ptdaemon.engine").exception("attempt crashed")

    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR ptdaemon.engine attempt crashed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_json_line_carries_fields():
    stream = io.StringIO()
    setup_logging(level="info", fmt="json", stream=stream)

    logging.getLogger("ptdaemon.engine").info(
        "attempt finished",
        extra={"submission_id": "abc", "status": 200, "duration_ms": 12},
    )

    [line] = json_lines(stream)
    assert list(line) == ["time", "level", "logger", "event", "context"]
    assert re.fullmatch(TIME, str(line["time"]))
    assert line["level"] == "info"
    assert line["logger"] == "ptdaemon.engine"
    assert line["event"] == "attempt finished"
    assert line["context"] == {
        "submission_id": "abc",
        "status": 200,
        "duration_ms": 12,
    }


def test_json_masks_secrets_also_nested():
    stream = io.StringIO()
    setup_logging(level="info", fmt="json", stream=stream)

    logging.getLogger("ptdaemon.api").info(
        "user created",
        extra={"token": "tok-1", "meta": {"password": "pw-2", "size": 3}},
    )

    raw = stream.getvalue()
    assert "tok-1" not in raw
    assert "pw-2" not in raw
    [line] = json_lines(stream)
    assert line["context"] == {"token": "***", "meta": {"password": "***", "size": 3}}


def test_json_exception_is_a_string():
    stream = io.StringIO()
    setup_logging(level="info", fmt="json", stream=stream)

    try:
        fail(RuntimeError("disk gone"))
    except RuntimeError:
        logging.getLogger("ptdaemon.store").exception("write failed")

    [line] = json_lines(stream)
    assert isinstance(line["exception"], str)
    assert line["exception"].endswith("RuntimeError: disk gone")


def test_json_writes_odd_values_as_strings():
    stream = io.StringIO()
    setup_logging(level="info", fmt="json", stream=stream)

    logging.getLogger("ptdaemon").info("store opened", extra={"path": object()})

    [line] = json_lines(stream)
    assert str(line["context"]["path"]).startswith("<object object")


def test_level_filters_our_loggers():
    stream = text_log("warning")

    logging.getLogger("ptdaemon.engine").info("attempt finished")
    logging.getLogger("ptdaemon.engine").warning("submission failed")

    assert "attempt finished" not in stream.getvalue()
    assert "submission failed" in stream.getvalue()


def test_debug_level_shows_debug():
    stream = text_log("debug")

    logging.getLogger("ptdaemon.scheduler").debug("window refilled")

    assert " DEBUG ptdaemon.scheduler window refilled" in stream.getvalue()


def test_other_libraries_show_only_warnings():
    stream = text_log("debug")

    logging.getLogger("aiohttp.access").info("GET /")
    logging.getLogger("asyncio").error("Task exception was never retrieved")

    assert "GET /" not in stream.getvalue()
    assert "ERROR asyncio Task exception" in stream.getvalue()


def test_access_logger_is_written():
    stream = text_log()

    logging.getLogger(ACCESS_LOGGER).info(
        "request finished", extra={"method": "GET", "path": "/v1/stats"}
    )

    assert "INFO ptdaemon.access request finished method=GET" in stream.getvalue()


def test_second_setup_replaces_the_handler():
    first = text_log()
    second = text_log()

    logging.getLogger("ptdaemon").info("daemon ready")

    assert first.getvalue() == ""
    assert second.getvalue().count("daemon ready") == 1


def test_records_still_reach_caplog(caplog):
    text_log()

    logging.getLogger("ptdaemon.engine").info("attempt finished")

    assert caplog.messages == ["attempt finished"]


@pytest.mark.parametrize(
    ("level", "fmt"), [("loud", "text"), ("info", "xml"), ("", "json")]
)
def test_bad_level_or_format_refused(level, fmt):
    with pytest.raises(ValueError, match="unknown log"):
        setup_logging(level=level, fmt=fmt, stream=io.StringIO())


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_of_one_loop_turn_are_written_together_and_in_order():
    stream = CountingStream()
    setup_logging(level="info", fmt="text", stream=stream)
    log = logging.getLogger("ptdaemon.test")
    for number in range(3):
        log.info("line", extra={"n": number})
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit("n=", 1)[1] for line in lines] == ["0", "1", "2"]
    assert stream.writes == 1
    # A warning does not wait, and takes what waits before it along.
    log.info("before")
    log.warning("now")
    assert stream.writes == 2
    assert [line.split()[-1] for line in stream.getvalue().splitlines()[-2:]] == [
        "before",
        "now",
    ]


def test_lines_outside_an_event_loop_are_written_at_once():
    stream = CountingStream()
    setup_logging(level="info", fmt="text", stream=stream)
    logging.getLogger("ptdaemon.test").info("alone")
    assert stream.getvalue().rstrip().endswith("alone")


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


async def test_a_broken_log_stream_loses_lines_but_never_raises():
    setup_logging(level="info", fmt="text", stream=BrokenStream())
    log = logging.getLogger("ptdaemon.test")

    log.warning("written at once, and lost")
    log.info("written at the end of the turn, and lost")
    await asyncio.sleep(0)
    logging.getLogger().handlers[-1].flush()

    [handler] = [h for h in logging.getLogger().handlers if hasattr(h, "lost_lines")]
    assert handler.lost_lines == 2
