"""A seeded database of many submissions and attempts, for statistics tests.

The rows are random but reproducible (fixed seed), spread over two days
before `NOW`, for two users with several templates each. Rows go in with
plain executemany; the schema comes from the real store's migrations.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from ptdaemon.models import Method, Template
from ptdaemon.store import Store

NOW: Final = 1_800_000_000.0
SPAN_SECONDS: Final = 2 * 86400.0
STATUSES: Final = (
    "pending",
    "processing",
    "retrying",
    "completed",
    "failed",
    "cancelled",
)
STATUS_WEIGHTS: Final = (5, 1, 4, 70, 15, 5)
CATEGORIES: Final = ("network", "timeout", "remote", "validation", "system")


@dataclass
class Seeded:
    """What was written, kept so tests can compute figures on their own."""

    users: list[str]
    templates: dict[str, list[tuple[str, str]]]  # user -> [(id, name)]
    submissions: list[tuple[Any, ...]] = field(default_factory=list)
    attempts: list[tuple[Any, ...]] = field(default_factory=list)


def _template_body(template_id: str, user_id: str, name: str) -> bytes:
    template = Template(
        id=template_id,
        user_id=user_id,
        name=name,
        method=Method.API,
        target={"url": "http://127.0.0.1:9/x"},
        field_map={},
        required_fields=[],
        max_retries=3,
        retry_backoff_seconds=60.0,
        retry_backoff_max_seconds=86400.0,
        retry_jitter=0.0,
        timeout_seconds=30.0,
        signing_secret=None,
        created_at=NOW - SPAN_SECONDS,
        updated_at=NOW - SPAN_SECONDS,
    )
    return msgspec.json.encode(template)


def _attempts_of(
    rng: random.Random, sub_id: str, template_id: str, created: float, status: str
) -> list[tuple[Any, ...]]:
    count = {"pending": 0, "processing": 0}.get(status, rng.randint(1, 3))
    rows = []
    started = created
    for number in range(1, count + 1):
        started += rng.uniform(0.0, 600.0)
        last = number == count
        if last and status == "completed":
            outcome, category = "success", None
        elif rng.random() < 0.05:
            outcome, category = "interrupted", "system"
        else:
            outcome, category = "error", rng.choice(CATEGORIES)
        duration = None if outcome == "interrupted" else int(rng.expovariate(1 / 80))
        rows.append((sub_id, number, started, duration, outcome, category, template_id))
    return rows


def make_rows(count: int, *, seed: int = 7) -> Seeded:
    rng = random.Random(seed)
    users = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2)]
    templates = {
        user: [
            (str(uuid.UUID(int=rng.getrandbits(128))), f"form-{index}")
            for index in range(4)
        ]
        for user in users
    }
    seeded = Seeded(users, templates)
    for seq in range(1, count + 1):
        user = users[0] if rng.random() < 0.8 else users[1]
        template_id = rng.choice(templates[user])[0]
        created = NOW - rng.uniform(0.0, SPAN_SECONDS)
        status = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
        due = None
        if status in ("pending", "retrying"):
            due = created + rng.uniform(-3600.0, 7200.0)
        sub_id = str(uuid.UUID(int=rng.getrandbits(128)))
        seeded.submissions.append(
            (seq, sub_id, user, template_id, status, due, created)
        )
        seeded.attempts.extend(_attempts_of(rng, sub_id, template_id, created, status))
    return seeded


def write_rows(path: Path, seeded: Seeded) -> None:
    """Create the database with the real schema, then insert the rows."""

    async def migrate() -> None:
        store = await Store.open(path)
        await store.close()

    asyncio.run(migrate())
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO users (id, name, admin, token_hash, created_at)"
            " VALUES (?, ?, 0, NULL, ?)",
            [(user, f"user-{i}", NOW) for i, user in enumerate(seeded.users)],
        )
        conn.executemany(
            "INSERT INTO templates (id, user_id, name, body, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (tid, user, name, _template_body(tid, user, name), NOW + i, NOW + i)
                for user, items in seeded.templates.items()
                for i, (tid, name) in enumerate(items)
            ],
        )
        conn.executemany(
            "INSERT INTO submissions (seq, id, user_id, form_template_id, data,"
            " status, max_retries, retry_backoff_seconds,"
            " retry_backoff_max_seconds, retry_jitter, next_retry_at,"
            " created_at, updated_at)"
            " VALUES (?, ?, ?, ?, '{}', ?, 3, 60, 86400, 0, ?, ?, ?)",
            [(*row, row[-1]) for row in seeded.submissions],
        )
        conn.executemany(
            "INSERT INTO attempts (submission_id, number, started_at, duration_ms,"
            " outcome, error_category, form_template_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            seeded.attempts,
        )
    conn.execute("ANALYZE")
    conn.close()
