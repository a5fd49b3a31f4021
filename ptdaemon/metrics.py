"""Prometheus metrics of one daemon: counters the pieces bump, gauges read at scrape.

Every label takes a value from a small fixed set (methods, states, error
categories, route patterns, HTTP codes); figures per template belong to
GET /v1/stats, which is scoped to its caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

from ptdaemon.models import Method

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
# A method label for attempts whose template was deleted before they ran.
UNKNOWN_METHOD: Final = "unknown"
NO_CATEGORY: Final = "none"
ATTEMPT_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
COMMIT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUEUED_STATES: Final = ("pending", "processing", "retrying")
FINAL_STATES: Final = ("completed", "failed", "cancelled")


class Metrics:
    """The metric set of one daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.created = Counter(
            "ptdaemon_submissions_created",
            "Submissions accepted and stored, by delivery method.",
            ["method"],
            registry=registry,
        )
        self.finished = Counter(
            "ptdaemon_submissions_finished",
            "Submissions that reached a final state, by method and state.",
            ["method", "status"],
            registry=registry,
        )
        self.attempts = Counter(
            "ptdaemon_attempts",
            "Delivery attempts, by method, outcome and error category.",
            ["method", "outcome", "error_category"],
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "ptdaemon_attempt_duration_seconds",
            "How long delivery attempts took, by method.",
            ["method"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ptdaemon_attempts_in_flight",
            "Delivery attempts running now.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ptdaemon_queue_depth",
            "Unfinished submissions of every user, by state.",
            ["status"],
            registry=registry,
        )
        self.oldest_due = Gauge(
            "ptdaemon_oldest_due_age_seconds",
            "How long the longest-waiting due submission has waited; 0 if none.",
            registry=registry,
        )
        self.requests = Counter(
            "ptdaemon_api_requests",
            "Control API requests, by route pattern, method and status code.",
            ["route", "method", "code"],
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "ptdaemon_store_commit_duration_seconds",
            "How long one group commit of the store took, fsync included.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_size = Histogram(
            "ptdaemon_store_commit_batch_size",
            "How many writes one group commit of the store carried.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

        # Known series start at zero, so a rate over them is defined at once.
        for method in Method:
            self.created.labels(method.value)
            for status in FINAL_STATES:
                self.finished.labels(method.value, status)
        for status in QUEUED_STATES:
            self.queue_depth.labels(status)

    def submission_created(self, method: str, count: int = 1) -> None:
        self.created.labels(method).inc(count)

    def submission_finished(self, method: str, status: str) -> None:
        self.finished.labels(method, status).inc()

    def attempt_finished(
        self, method: str, outcome: str, category: str | None, seconds: float
    ) -> None:
        self.attempts.labels(method, outcome, category or NO_CATEGORY).inc()
        self.attempt_seconds.labels(method).observe(seconds)

    def request_served(self, route: str, method: str, code: int) -> None:
        self.requests.labels(route, method, str(code)).inc()

    def committed(self, seconds: float, size: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_size.observe(size)

    def set_queue(self, depths: dict[str, int], oldest_due_age_seconds: float) -> None:
        for status in QUEUED_STATES:
            self.queue_depth.labels(status).set(depths.get(status, 0))
        self.oldest_due.set(oldest_due_age_seconds)

    def render(self) -> bytes:
        """The registry in Prometheus text format 0.0.4."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry less the `_created` timestamp series the client adds.

    They double the output and no dashboard here reads them; the client's own
    switch for this is process-wide, which would reach an embedding program.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [
                s for s in family.samples if not s.name.endswith("_created")
            ]
            yield family
