"""The store: pragmas, migrations, group commit and the queries' rules."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from ptdaemon import queries
from ptdaemon.errors import ConflictError, InvalidError, NotFoundError, StoreError
from ptdaemon.models import Method, Status, Submission, Template, User
from ptdaemon.store import MIGRATIONS, Store


@pytest.fixture
async def store(tmp_path: Path):
    opened = await Store.open(tmp_path / "db.sqlite")
    yield opened
    await opened.close()


def make_user(name: str = "ada") -> User:
    return User(id=str(uuid.uuid4()), name=name, admin=False, created_at=1.0)


def make_template(user: User, name: str = "t") -> Template:
    return Template(
        id=str(uuid.uuid4()),
        user_id=user.id,
        name=name,
        method=Method.API,
        target={"url": "http://127.0.0.1:9/"},
        field_map={},
        required_fields=[],
        max_retries=3,
        retry_backoff_seconds=1.0,
        retry_backoff_max_seconds=60.0,
        retry_jitter=0.0,
        timeout_seconds=5.0,
        signing_secret=None,
        created_at=1.0,
        updated_at=1.0,
    )


def make_submission(user: User, template: Template, due: float = 5.0) -> Submission:
    return Submission(
        id=str(uuid.uuid4()),
        user_id=user.id,
        form_template_id=template.id,
        data={"a": 1},
        status=Status.PENDING,
        max_retries=3,
        retry_backoff_seconds=1.0,
        retry_backoff_max_seconds=60.0,
        retry_jitter=0.0,
        next_retry_at=due,
        created_at=1.0,
        updated_at=1.0,
    )


async def seed(store: Store) -> tuple[User, Template]:
    user = make_user()
    template = make_template(user)
    await store.write(lambda c: queries.insert_user(c, user, "hash-" + user.id))
    await store.write(lambda c: queries.insert_template(c, template))
    return user, template


async def insert(store: Store, sub: Submission) -> Submission:
    [(row, created)] = await store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(sub, None)])
    )
    assert created
    return row


async def test_new_database_is_wal_full_sync_incremental_vacuum(store: Store):
    def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA auto_vacuum").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
            0,
        )

    mode, vacuum, version, _ = await store.read(pragmas)
    writer_sync = await store.write(
        lambda c: c.execute("PRAGMA synchronous").fetchone()[0]
    )

    assert mode == "wal"
    assert vacuum == 2
    assert version == len(MIGRATIONS)
    assert writer_sync == 2


async def test_database_file_is_private(store: Store):
    assert store.path.stat().st_mode & 0o077 == 0


async def test_concurrent_writes_share_commits(store: Store):
    user, template = await seed(store)
    before = store.commits

    subs = [make_submission(user, template) for _ in range(200)]
    await asyncio.gather(*(insert(store, sub) for sub in subs))

    commits = store.commits - before
    assert 1 <= commits < 200
    count = await store.read(
        lambda c: c.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
    )
    assert count == 200


async def test_a_failing_write_leaves_the_rest_of_its_group(store: Store):
    user, template = await seed(store)
    duplicate = make_template(user, name="t")

    results = await asyncio.gather(
        insert(store, make_submission(user, template)),
        store.write(lambda c: queries.insert_template(c, duplicate)),
        insert(store, make_submission(user, template)),
        return_exceptions=True,
    )

    assert isinstance(results[1], ConflictError)
    count = await store.read(
        lambda c: c.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
    )
    assert count == 2


async def test_rows_survive_reopening(tmp_path: Path):
    path = tmp_path / "db.sqlite"
    first = await Store.open(path)
    user, template = await seed(first)
    sub = await insert(first, make_submission(user, template))
    await first.close()

    second = await Store.open(path)
    found = await second.read(lambda c: queries.get_submission(c, sub.id, user.id))
    await second.close()

    assert found is not None
    assert found.data == {"a": 1}


async def test_a_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    with pytest.raises(StoreError, match="newer"):
        await Store.open(path)


async def test_claim_is_conditional_on_state_and_due_time(store: Store):
    user, template = await seed(store)
    sub = await insert(store, make_submission(user, template, due=100.0))

    [early] = await store.write(lambda c: queries.claim(c, [sub.id], 50.0))
    [claimed] = await store.write(lambda c: queries.claim(c, [sub.id], 150.0))
    [again] = await store.write(lambda c: queries.claim(c, [sub.id], 150.0))

    assert early is None
    assert claimed is not None
    assert claimed.id == sub.id
    assert claimed.status is Status.PROCESSING
    assert claimed.processing_started_at == 150.0
    assert claimed.attempt_count == 0
    assert claimed.data == sub.data
    assert again is None


async def test_claim_of_several_answers_each_in_order(store: Store):
    user, template = await seed(store)
    due = await insert(store, make_submission(user, template, due=100.0))
    later = await insert(store, make_submission(user, template, due=500.0))
    other = await insert(store, make_submission(user, template, due=100.0))

    claimed = await store.write(
        lambda c: queries.claim(c, [due.id, later.id, "missing", other.id], 150.0)
    )

    assert [sub.id if sub else None for sub in claimed] == [
        due.id,
        None,
        None,
        other.id,
    ]


async def test_queries_never_cross_users(store: Store):
    user, template = await seed(store)
    other = make_user("grace")
    await store.write(lambda c: queries.insert_user(c, other, "hash-other"))
    sub = await insert(store, make_submission(user, template))

    seen = await store.read(lambda c: queries.get_submission(c, sub.id, other.id))
    listed = await store.read(
        lambda c: queries.list_submissions(
            c, other.id, status=None, template_id=None, before_seq=None, limit=10
        )
    )
    found_template = await store.read(
        lambda c: queries.get_template(c, template.id, other.id)
    )

    assert seen is None
    assert listed == ([], False)
    assert found_template is None
    with pytest.raises(NotFoundError):
        await store.write(
            lambda c: queries.cancel_submission(c, sub.id, other.id, 10.0)
        )


async def test_idempotency_key_returns_original_or_conflicts(store: Store):
    user, template = await seed(store)
    first = make_submission(user, template)
    first.idempotency_key = "k1"
    again = make_submission(user, template)
    again.idempotency_key = "k1"

    [(original, created)] = await store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(first, "h")])
    )
    [(repeat, repeat_created)] = await store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(again, "h")])
    )
    [conflict] = await store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(again, "x")])
    )

    assert created
    assert not repeat_created
    assert repeat.id == original.id
    assert isinstance(conflict, ConflictError)


async def test_revoking_a_user_cancels_queued_and_stops_retries(store: Store):
    user, template = await seed(store)
    queued = await insert(store, make_submission(user, template))
    running = await insert(store, make_submission(user, template))
    [claimed] = await store.write(lambda c: queries.claim(c, [running.id], 10.0))
    assert claimed is not None

    cancelled = await store.write(lambda c: queries.delete_user(c, user.id, 20.0))
    from ptdaemon.engine import build_finish
    from ptdaemon.errors import DeliveryError
    from ptdaemon.models import ErrorCategory

    error = DeliveryError("boom", category=ErrorCategory.REMOTE, retryable=True)
    finish = build_finish(claimed, 1, 10.0, 11.0, error)
    status = await store.write(lambda c: queries.finish_attempt(c, finish))
    after = await store.read(lambda c: queries.get_submission(c, queued.id, user.id))

    assert cancelled == 1
    assert after is not None
    assert after.status is Status.CANCELLED
    assert finish.status is Status.RETRYING
    assert status is Status.CANCELLED


async def test_template_with_unfinished_submissions_cannot_be_deleted(store: Store):
    user, template = await seed(store)
    await insert(store, make_submission(user, template))

    with pytest.raises(ConflictError):
        await store.write(lambda c: queries.delete_template(c, template.id, user.id))


async def test_due_window_orders_by_due_time(store: Store):
    user, template = await seed(store)
    for due in (30.0, 10.0, 20.0):
        await insert(store, make_submission(user, template, due=due))

    window = await store.read(lambda c: queries.due_window(c, 2))

    assert [entry[0] for entry in window] == [10.0, 20.0]


async def test_a_page_stops_at_its_byte_budget(store: Store):
    user, template = await seed(store)
    for _ in range(5):
        sub = make_submission(user, template)
        sub.data = {"blob": "x" * 1000}
        await insert(store, sub)

    def page(before: int | None, max_bytes: int) -> Any:
        return lambda conn: queries.list_submissions(
            conn,
            user.id,
            status=None,
            template_id=None,
            before_seq=before,
            limit=10,
            max_bytes=max_bytes,
        )

    items, more = await store.read(page(None, 2500))
    rest, more_after = await store.read(page(items[-1].seq, 10**6))

    assert len(items) == 3
    assert more is True
    assert len(rest) == 2
    assert more_after is False


async def test_creates_committed_after_a_revocation_are_refused(store: Store):
    from ptdaemon.errors import UnauthorizedError

    user, template = await seed(store)
    sub = make_submission(user, template)
    await store.write(lambda c: queries.delete_user(c, user.id, 5.0))

    with pytest.raises(UnauthorizedError):
        await insert(store, sub)


async def test_creates_committed_after_their_template_is_deleted_fail(store: Store):
    user, template = await seed(store)
    await store.write(lambda c: queries.delete_template(c, template.id, user.id))
    sub = make_submission(user, template)

    [result] = await store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(sub, None)])
    )

    assert isinstance(result, InvalidError)
    assert result.code == "unknown_template"


async def test_the_template_limit_holds_inside_the_transaction(store: Store):
    user, _ = await seed(store)
    extra = [make_template(user, name=f"t{n}") for n in range(3)]

    results = await asyncio.gather(
        *(store.write(lambda c, t=t: queries.insert_template(c, t, 2)) for t in extra),
        return_exceptions=True,
    )

    assert sum(isinstance(r, ConflictError) for r in results) == 2


async def test_upgrade_replaces_the_unfinished_triggers_and_keeps_the_counts(
    tmp_path: Path,
):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:5]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 5")
    for number, status in enumerate(["pending", "retrying", "completed", "pending"]):
        conn.execute(
            "INSERT INTO submissions (id, user_id, form_template_id, data, status,"
            " max_retries, retry_backoff_seconds, retry_backoff_max_seconds,"
            " retry_jitter, created_at, updated_at)"
            " VALUES (?, ?, 't1', '{}', ?, 3, 60, 86400, 0, 1, 1)",
            (f"s{number}", "u1" if number < 3 else "u2", status),
        )
    # What a version that had lost count would have left behind.
    conn.execute("UPDATE unfinished SET n = 7 WHERE user_id = 'u1'")
    conn.commit()
    conn.close()

    store = await Store.open(path)
    triggers = await store.read(
        lambda c: c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        ).fetchall()
    )
    counts = await store.read(
        lambda c: dict(c.execute("SELECT user_id, n FROM unfinished").fetchall())
    )
    await store.close()

    assert triggers == []
    assert counts == {"u1": 2, "u2": 1}
