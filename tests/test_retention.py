"""Retention: old finished submissions go, the rest stays, the file shrinks."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import msgspec
import pytest

from ptdaemon import queries
from ptdaemon.retention import BATCH_ROWS, Retention, max_age_seconds
from ptdaemon.store import Store
from tests.test_store import insert, make_submission, seed

NOW = 1_000_000.0
DAY = 86400.0


@pytest.fixture
async def store(tmp_path: Path):
    opened = await Store.open(tmp_path / "db.sqlite")
    yield opened
    await opened.close()


async def add(store, user, template, status: str, changed: float, pad: int = 10) -> str:
    sub = make_submission(user, template)
    sub = msgspec.structs.replace(sub, data={"pad": "x" * pad})
    row = await insert(store, sub)

    def finish(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE submissions SET status = ?, updated_at = ? WHERE id = ?",
            (status, changed, row.id),
        )
        conn.execute(
            "INSERT INTO attempts (submission_id, number, started_at, outcome)"
            " VALUES (?, 1, ?, 'success')",
            (row.id, changed),
        )

    await store.write(finish)
    return row.id


async def ids_left(store) -> set[str]:
    rows = await store.read(
        lambda c: c.execute("SELECT id FROM submissions").fetchall()
    )
    return {row[0] for row in rows}


async def attempts_left(store) -> set[str]:
    rows = await store.read(
        lambda c: c.execute("SELECT submission_id FROM attempts").fetchall()
    )
    return {row[0] for row in rows}


async def test_only_finished_submissions_past_the_age_are_removed(store):
    user, template = await seed(store)
    old = NOW - 31 * DAY
    gone = [
        await add(store, user, template, state, old)
        for state in ("completed", "failed", "cancelled")
    ]
    kept = [
        await add(store, user, template, "completed", NOW - 29 * DAY),
        await add(store, user, template, "failed", NOW - 1),
    ] + [
        await add(store, user, template, state, old)
        for state in ("pending", "retrying", "processing")
    ]
    retention = Retention(store, max_age_seconds=30 * DAY, clock=lambda: NOW)

    assert await retention.sweep() == 3

    assert await ids_left(store) == set(kept)
    assert await attempts_left(store) == set(kept)
    assert not set(gone) & await attempts_left(store)


async def test_many_rows_go_in_batches_and_the_file_shrinks(store, tmp_path):
    user, template = await seed(store)
    count = BATCH_ROWS * 2 + 7
    for _ in range(count):
        await add(store, user, template, "completed", NOW - 2 * DAY, pad=3000)
    keeper = await add(store, user, template, "completed", NOW)
    await store.maintain(queries.checkpoint)
    pages_before = await store.read(
        lambda c: c.execute("PRAGMA page_count").fetchone()[0]
    )
    size_before = os.path.getsize(tmp_path / "db.sqlite")
    commits_before = store.commits
    retention = Retention(store, max_age_seconds=DAY, clock=lambda: NOW)

    assert await retention.sweep() == count

    assert await ids_left(store) == {keeper}
    # One write per batch, so other writes get in between.
    assert store.commits - commits_before == 3
    pages_after = await store.read(
        lambda c: c.execute("PRAGMA page_count").fetchone()[0]
    )
    assert pages_after < pages_before / 10
    assert os.path.getsize(tmp_path / "db.sqlite") < size_before / 10
    free = await store.read(lambda c: c.execute("PRAGMA freelist_count").fetchone())
    assert free[0] == 0


async def test_a_sweep_with_nothing_to_remove_writes_nothing(store):
    user, template = await seed(store)
    await add(store, user, template, "completed", NOW)
    commits_before = store.commits
    retention = Retention(store, max_age_seconds=DAY, clock=lambda: NOW)

    assert await retention.sweep() == 0
    assert store.commits - commits_before == 1  # the one empty batch


async def test_the_timer_is_set_for_when_the_oldest_row_comes_of_age(store):
    user, template = await seed(store)
    retention = Retention(store, max_age_seconds=DAY, clock=lambda: NOW)
    assert await retention._next_delay() == 6 * 3600  # nothing finished yet

    await add(store, user, template, "completed", NOW - DAY + 600)
    assert await retention._next_delay() == pytest.approx(600)
    await add(store, user, template, "failed", NOW - DAY + 5)
    assert await retention._next_delay() == 60  # not more often than a minute


def test_zero_days_keeps_everything():
    assert max_age_seconds(0) is None
    assert max_age_seconds(2) == 2 * DAY


async def test_zero_days_starts_no_timer(store):
    retention = Retention(store, max_age_seconds=None)
    retention.start()

    assert retention._task is None
    assert await retention.sweep() == 0
