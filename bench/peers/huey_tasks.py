"""huey with its SQLite storage, its task doing the same POST (the bench's
producer and the consumer module `huey_app` build the same pair)."""

from __future__ import annotations

import os
from typing import Any

from huey import SqliteHuey

from bench.peers.httppost import post_json

TARGET = os.environ.get("BENCH_TARGET_URL", "http://127.0.0.1:9/")


def make_huey(filename: str) -> tuple[SqliteHuey, Any]:
    """The queue and its task; the bench enqueues through the same pair."""
    queue = SqliteHuey("bench", filename=filename, results=False)

    @queue.task(name="post")
    def post(body: dict[str, Any]) -> int:
        return post_json(TARGET, body)

    return queue, post
