"""The metric set: fixed label values, one registry per daemon, store commit hook."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ptdaemon.metrics import CONTENT_TYPE, Metrics
from ptdaemon.models import Method
from ptdaemon.store import Store


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_content_type_is_text_format_0_0_4():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_no_created_timestamp_series():
    metrics = Metrics()
    metrics.submission_created("API")

    text = metrics.render().decode()

    assert "_created" not in text.replace("ptdaemon_submissions_created_total", "")


def test_known_series_start_at_zero():
    found = samples(Metrics())

    for method in Method:
        key = ("ptdaemon_submissions_created_total", (("method", method.value),))
        assert found[key] == 0
    for status in ("pending", "processing", "retrying"):
        assert found[("ptdaemon_queue_depth", (("status", status),))] == 0


def test_attempts_without_a_category_are_labelled_none():
    metrics = Metrics()

    metrics.attempt_finished("API", "success", None, 0.02)
    metrics.attempt_finished("API", "error", "timeout", 5.0)

    found = samples(metrics)
    labels = (("error_category", "none"), ("method", "API"), ("outcome", "success"))
    assert found[("ptdaemon_attempts_total", labels)] == 1
    timeout = (("error_category", "timeout"), ("method", "API"), ("outcome", "error"))
    assert found[("ptdaemon_attempts_total", timeout)] == 1
    count = ("ptdaemon_attempt_duration_seconds_count", (("method", "API"),))
    assert found[count] == 2


def test_each_daemon_counts_in_its_own_registry():
    first, second = Metrics(), Metrics()

    first.submission_created("FILE")

    key = ("ptdaemon_submissions_created_total", (("method", "FILE"),))
    assert samples(first)[key] == 1
    assert samples(second)[key] == 0


async def test_store_reports_each_group_commit(tmp_path: Path):
    store = await Store.open(tmp_path / "db.sqlite")
    commits: list[tuple[float, int]] = []
    store.on_commit = lambda seconds, size: commits.append((seconds, size))
    try:
        await asyncio.gather(*(store.write(lambda conn: None) for _ in range(5)))
    finally:
        await store.close()

    assert sum(size for _, size in commits) == 5
    assert all(seconds >= 0 for seconds, _ in commits)
