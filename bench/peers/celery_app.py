"""Celery as the replaced system configured it, or tuned (BENCH_CELERY=tuned).

Both: Redis broker and result backend, JSON, `task_track_started`. The
replaced setup recycles each prefork child after 50 tasks; the tuned one
keeps its workers (the bench runs it with a thread pool).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench.peers.httppost import post_json

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET = os.environ.get("BENCH_TARGET_URL", "http://127.0.0.1:9/")

app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("BENCH_CELERY") != "tuned":
    app.conf.worker_max_tasks_per_child = 50


@app.task(name="post")
def post(body: dict[str, Any]) -> int:
    return post_json(TARGET, body)
