"""Every SQL statement of ptdaemon, as plain functions of a sqlite3 connection.

They run on the store's threads: writes through `Store.write` (inside one
group-commit transaction), reads through `Store.read`. All are
parameterised, and all that serve a user are filtered by that user's id.
"""

from __future__ import annotations

import hmac
import sqlite3
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from ptdaemon.errors import (
    ConflictError,
    InvalidError,
    NotFoundError,
    ServiceError,
    TooManyError,
    UnauthorizedError,
)
from ptdaemon.models import (
    Attempt,
    ErrorCategory,
    HourFigures,
    Outcome,
    Percentiles,
    QueueStats,
    Stats,
    Status,
    StatusCounts,
    Submission,
    Template,
    TemplateStats,
    User,
)
from ptdaemon.store import decode_json, encode_json
from ptdaemon.timeutil import format_time

SUBMISSION_COLUMNS: Final = (
    "id, seq, user_id, form_template_id, data, status, retry_count, "
    "attempt_count, max_retries, retry_backoff_seconds, "
    "retry_backoff_max_seconds, retry_jitter, next_retry_at, "
    "processing_started_at, processing_completed_at, processing_duration_ms, "
    "response_data, error_message, error_category, error_details, "
    "idempotency_key, created_at, updated_at"
)

_template_decoder = msgspec.json.Decoder(Template)

# A page of submissions stops growing past this much stored JSON.
PAGE_BYTES: Final = 8 * 1024 * 1024
RETRYABLE_STATES: Final = frozenset({Status.FAILED, Status.RETRYING})
CANCELLABLE_STATES: Final = frozenset({Status.PENDING, Status.RETRYING})
FINAL_STATES: Final = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


def write_probe(conn: sqlite3.Connection, now: float) -> None:
    """A real write: it fails when the disk is full or the database locked."""
    conn.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (now,))


# -- users -------------------------------------------------------------------


LIVE_USERS: Final = (
    "SELECT id, name, admin, created_at FROM users WHERE deleted_at IS NULL"
)


def _user(row: Any) -> User:
    return User(id=row[0], name=row[1], admin=bool(row[2]), created_at=row[3])


def insert_user(conn: sqlite3.Connection, user: User, token_hash: str) -> User:
    try:
        conn.execute(
            "INSERT INTO users (id, name, admin, token_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user.id, user.name, int(user.admin), token_hash, user.created_at),
        )
    except sqlite3.IntegrityError as exc:
        raise ConflictError(
            f"a user named {user.name!r} exists", code="duplicate_name"
        ) from exc
    return user


def user_by_token(conn: sqlite3.Connection, token_hash: str) -> User | None:
    row = conn.execute(
        "SELECT id, name, admin, created_at, token_hash FROM users"
        " WHERE deleted_at IS NULL AND token_hash = ?",
        (token_hash,),
    ).fetchone()
    # The index finds the row; the hash itself is compared in constant time.
    if row is None or not hmac.compare_digest(row[4], token_hash):
        return None
    return _user(row[:4])


def user_by_name(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute(
        f"{LIVE_USERS} AND name = ?",
        (name,),
    ).fetchone()
    return None if row is None else _user(row)


def list_users(conn: sqlite3.Connection) -> list[User]:
    rows = conn.execute(f"{LIVE_USERS} ORDER BY created_at, id").fetchall()
    return [_user(row) for row in rows]


def count_users(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])


def set_token(conn: sqlite3.Connection, user_id: str, token_hash: str) -> User:
    updated = conn.execute(
        "UPDATE users SET token_hash = ? WHERE id = ? AND deleted_at IS NULL",
        (token_hash, user_id),
    )
    if updated.rowcount == 0:
        raise NotFoundError("no such user")
    row = conn.execute(f"{LIVE_USERS} AND id = ?", (user_id,)).fetchone()
    return _user(row)


def delete_user(conn: sqlite3.Connection, user_id: str, now: float) -> int:
    """Revoke a user and cancel its queued submissions; return how many."""
    updated = conn.execute(
        "UPDATE users SET deleted_at = ?, token_hash = NULL"
        " WHERE id = ? AND deleted_at IS NULL",
        (now, user_id),
    )
    if updated.rowcount == 0:
        raise NotFoundError("no such user")
    cancelled = conn.execute(
        "UPDATE submissions SET status = 'cancelled', next_retry_at = NULL,"
        " updated_at = ? WHERE user_id = ? AND status IN ('pending', 'retrying')",
        (now, user_id),
    )
    count_unfinished_change(conn, user_id, -cancelled.rowcount)
    return cancelled.rowcount


def is_user_live(conn: sqlite3.Connection, user_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM users WHERE id = ? AND deleted_at IS NULL", (user_id,)
    ).fetchone()
    return row is not None


# -- templates ---------------------------------------------------------------


def insert_template(
    conn: sqlite3.Connection, template: Template, limit: int | None = None
) -> Template:
    """Add a template; refuse it past `limit` templates for its user."""
    if limit is not None and count_templates(conn, template.user_id) >= limit:
        raise ConflictError(f"at most {limit} templates per user", code="limit_reached")
    try:
        conn.execute(
            "INSERT INTO templates (id, user_id, name, body, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                template.id,
                template.user_id,
                template.name,
                msgspec.json.encode(template),
                template.created_at,
                template.updated_at,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise _duplicate_template(template.name) from exc
    return template


def update_template(conn: sqlite3.Connection, template: Template) -> Template:
    try:
        updated = conn.execute(
            "UPDATE templates SET name = ?, body = ?, updated_at = ?"
            " WHERE id = ? AND user_id = ?",
            (
                template.name,
                msgspec.json.encode(template),
                template.updated_at,
                template.id,
                template.user_id,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise _duplicate_template(template.name) from exc
    if updated.rowcount == 0:
        raise NotFoundError("no such template")
    return template


def _duplicate_template(name: str) -> ConflictError:
    return ConflictError(f"a template named {name!r} exists", code="duplicate_name")


def get_template(
    conn: sqlite3.Connection, template_id: str, user_id: str | None
) -> Template | None:
    """One template; `user_id=None` only for the engine, which owns no user."""
    if user_id is None:
        row = conn.execute(
            "SELECT body FROM templates WHERE id = ?", (template_id,)
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT body FROM templates WHERE id = ? AND user_id = ?",
            (template_id, user_id),
        ).fetchone()
    return None if row is None else _template_decoder.decode(row[0])


def _template_exists(conn: sqlite3.Connection, template_id: str, user_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM templates WHERE id = ? AND user_id = ?", (template_id, user_id)
    ).fetchone()
    return row is not None


def template_by_name(
    conn: sqlite3.Connection, user_id: str, name: str
) -> Template | None:
    row = conn.execute(
        "SELECT body FROM templates WHERE user_id = ? AND name = ?",
        (user_id, name),
    ).fetchone()
    return None if row is None else _template_decoder.decode(row[0])


def list_templates(conn: sqlite3.Connection, user_id: str) -> list[Template]:
    rows = conn.execute(
        "SELECT body FROM templates WHERE user_id = ? ORDER BY created_at, id",
        (user_id,),
    ).fetchall()
    return [_template_decoder.decode(row[0]) for row in rows]


def count_templates(conn: sqlite3.Connection, user_id: str) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM templates WHERE user_id = ?", (user_id,)
    ).fetchone()
    return int(row[0])


def delete_template(conn: sqlite3.Connection, template_id: str, user_id: str) -> None:
    if get_template(conn, template_id, user_id) is None:
        raise NotFoundError("no such template")
    busy = conn.execute(
        "SELECT COUNT(*) FROM submissions WHERE form_template_id = ?"
        " AND status IN ('pending', 'processing', 'retrying')",
        (template_id,),
    ).fetchone()[0]
    if busy:
        raise ConflictError(
            f"the template has {busy} unfinished submissions",
            code="template_in_use",
        )
    conn.execute(
        "DELETE FROM templates WHERE id = ? AND user_id = ?", (template_id, user_id)
    )


# -- submissions -------------------------------------------------------------


def _submission(row: Any) -> Submission:
    return Submission(
        id=row[0],
        seq=row[1],
        user_id=row[2],
        form_template_id=row[3],
        data=decode_json(row[4]),
        status=Status(row[5]),
        retry_count=row[6],
        attempt_count=row[7],
        max_retries=row[8],
        retry_backoff_seconds=row[9],
        retry_backoff_max_seconds=row[10],
        retry_jitter=row[11],
        next_retry_at=row[12],
        processing_started_at=row[13],
        processing_completed_at=row[14],
        processing_duration_ms=row[15],
        response_data=decode_json(row[16]),
        error_message=row[17],
        error_category=None if row[18] is None else ErrorCategory(row[18]),
        error_details=decode_json(row[19]),
        idempotency_key=row[20],
        created_at=row[21],
        updated_at=row[22],
    )


def _select_submission(
    conn: sqlite3.Connection, submission_id: str, user_id: str | None = None
) -> Submission | None:
    sql = f"SELECT {SUBMISSION_COLUMNS} FROM submissions WHERE id = ?"  # noqa: S608
    params: tuple[Any, ...] = (submission_id,)
    if user_id is not None:
        sql += " AND user_id = ?"
        params += (user_id,)
    row = conn.execute(sql, params).fetchone()
    return None if row is None else _submission(row)


def get_submission(
    conn: sqlite3.Connection, submission_id: str, user_id: str
) -> Submission | None:
    return _select_submission(conn, submission_id, user_id)


class NewSubmission(msgspec.Struct):
    submission: Submission
    request_hash: str | None


def count_unfinished_change(conn: sqlite3.Connection, user_id: str, delta: int) -> None:
    """Keep the `unfinished` table: every statement that moves submissions into
    or out of pending, processing or retrying calls this in its transaction."""
    if delta:
        conn.execute(
            "INSERT INTO unfinished (user_id, n) VALUES (?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET n = n + excluded.n",
            (user_id, delta),
        )


# What a create checks before its insert, in one statement: the user is not
# revoked, the template is the user's, and how many it has unfinished.
CREATE_CHECKS_SQL: Final = """
    SELECT EXISTS (SELECT 1 FROM users WHERE id = :user AND deleted_at IS NULL),
        EXISTS (SELECT 1 FROM templates WHERE id = :template AND user_id = :user),
        COALESCE((SELECT n FROM unfinished WHERE user_id = :user), 0)
"""


def insert_submissions(
    conn: sqlite3.Connection, items: list[NewSubmission], limit: int | None = None
) -> list[tuple[Submission, bool] | ServiceError]:
    """Insert new rows; an idempotency key seen before returns its original.

    Each result is (submission, created), or the error of that item: a key
    reused with another body, a template deleted since the request was
    checked, or the user's `limit` of unfinished submissions reached. A user
    revoked meanwhile fails the whole call.
    """
    results: list[tuple[Submission, bool] | ServiceError] = []
    checked: dict[tuple[str, str], bool] = {}
    unfinished: dict[str, int] = {}
    added: dict[str, int] = {}
    for item in items:
        sub = item.submission
        pair = (sub.user_id, sub.form_template_id)
        if pair not in checked:
            user_live, template_live, count = conn.execute(
                CREATE_CHECKS_SQL, {"user": pair[0], "template": pair[1]}
            ).fetchone()
            if not user_live:
                raise UnauthorizedError("the token was revoked")
            checked[pair] = bool(template_live)
            unfinished[sub.user_id] = int(count)
        if not checked[pair]:
            results.append(
                InvalidError(
                    "form_template_id names no template of yours",
                    code="unknown_template",
                )
            )
            continue
        if sub.idempotency_key is not None:
            found = _by_idempotency_key(conn, sub.user_id, sub.idempotency_key)
            if found is not None:
                results.append(_repeat(found, item.request_hash))
                continue
        before = added.get(sub.user_id, 0)
        if limit is not None and unfinished[sub.user_id] + before >= limit:
            results.append(
                TooManyError(
                    f"at most {limit} unfinished submissions per user",
                    code="too_many_unfinished",
                )
            )
            continue
        cursor = conn.execute(
            "INSERT INTO submissions (id, user_id, form_template_id, data, status,"
            " max_retries, retry_backoff_seconds, retry_backoff_max_seconds,"
            " retry_jitter, next_retry_at, idempotency_key, request_hash,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                sub.id,
                sub.user_id,
                sub.form_template_id,
                encode_json(sub.data),
                sub.status.value,
                sub.max_retries,
                sub.retry_backoff_seconds,
                sub.retry_backoff_max_seconds,
                sub.retry_jitter,
                sub.next_retry_at,
                sub.idempotency_key,
                item.request_hash,
                sub.created_at,
                sub.updated_at,
            ),
        )
        assert cursor.lastrowid is not None
        added[sub.user_id] = before + 1
        results.append((msgspec.structs.replace(sub, seq=cursor.lastrowid), True))
    for user_id, count in added.items():
        count_unfinished_change(conn, user_id, count)
    return results


def _by_idempotency_key(
    conn: sqlite3.Connection, user_id: str, key: str
) -> tuple[Submission, str | None] | None:
    row = conn.execute(
        f"SELECT {SUBMISSION_COLUMNS}, request_hash FROM submissions"  # noqa: S608
        " WHERE user_id = ? AND idempotency_key = ?",
        (user_id, key),
    ).fetchone()
    return None if row is None else (_submission(row), row[-1])


def _repeat(
    found: tuple[Submission, str | None], request_hash: str | None
) -> tuple[Submission, bool] | ConflictError:
    original, original_hash = found
    if original_hash != request_hash:
        return ConflictError(
            "the idempotency key was used with another body",
            code="idempotency_conflict",
        )
    return (original, False)


def list_submissions(
    conn: sqlite3.Connection,
    user_id: str,
    *,
    status: Status | None,
    template_id: str | None,
    before_seq: int | None,
    limit: int,
    max_bytes: int = PAGE_BYTES,
) -> tuple[list[Submission], bool]:
    """A page of the user's submissions, newest first, from `before_seq` down.

    The page ends at `limit` rows or once it holds `max_bytes` of stored
    JSON, whichever comes first; the flag says whether more rows follow.
    """
    sql = f"SELECT {SUBMISSION_COLUMNS} FROM submissions WHERE user_id = ?"  # noqa: S608
    params: list[Any] = [user_id]
    if status is not None:
        sql += " AND status = ?"
        params.append(status.value)
    if template_id is not None:
        sql += " AND form_template_id = ?"
        params.append(template_id)
    if before_seq is not None:
        sql += " AND seq < ?"
        params.append(before_seq)
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(limit + 1)
    page: list[Submission] = []
    size = 0
    for row in conn.execute(sql, params):
        if len(page) == limit or (page and size > max_bytes):
            return page, True
        size += sum(len(blob or b"") for blob in (row[4], row[16], row[19]))
        page.append(_submission(row))
    return page, False


def _attempt(row: Any) -> Attempt:
    return Attempt(
        submission_id=row[0],
        number=row[1],
        started_at=row[2],
        duration_ms=row[3],
        outcome=Outcome(row[4]),
        status=row[5],
        error_category=None if row[6] is None else ErrorCategory(row[6]),
        error_message=row[7],
        error_details=decode_json(row[8]),
        reply=row[9],
    )


def list_attempts(
    conn: sqlite3.Connection, submission_id: str, user_id: str
) -> list[Attempt] | None:
    if _select_submission(conn, submission_id, user_id) is None:
        return None
    rows = conn.execute(
        "SELECT submission_id, number, started_at, duration_ms, outcome, status,"
        " error_category, error_message, error_details, reply FROM attempts"
        " WHERE submission_id = ? ORDER BY number, id",
        (submission_id,),
    ).fetchall()
    return [_attempt(row) for row in rows]


def retry_submission(
    conn: sqlite3.Connection, submission_id: str, user_id: str, now: float
) -> Submission:
    """Make a failed or retrying submission due now, with a fresh budget."""
    sub = _require_state(conn, submission_id, user_id, RETRYABLE_STATES, "retried")
    if not _template_exists(conn, sub.form_template_id, user_id):
        raise ConflictError(
            "the submission's template was deleted", code="template_deleted"
        )
    conn.execute(
        "UPDATE submissions SET status = 'pending', retry_count = 0,"
        " next_retry_at = ?, updated_at = ? WHERE id = ?",
        (now, now, submission_id),
    )
    if sub.status is Status.FAILED:
        count_unfinished_change(conn, user_id, 1)
    return _require(conn, submission_id, user_id)


def cancel_submission(
    conn: sqlite3.Connection, submission_id: str, user_id: str, now: float
) -> Submission:
    _require_state(conn, submission_id, user_id, CANCELLABLE_STATES, "cancelled")
    conn.execute(
        "UPDATE submissions SET status = 'cancelled', next_retry_at = NULL,"
        " updated_at = ? WHERE id = ?",
        (now, submission_id),
    )
    count_unfinished_change(conn, user_id, -1)
    return _require(conn, submission_id, user_id)


def _require_state(
    conn: sqlite3.Connection,
    submission_id: str,
    user_id: str,
    allowed: frozenset[Status],
    verb: str,
) -> Submission:
    sub = _require(conn, submission_id, user_id)
    if sub.status not in allowed:
        raise ConflictError(
            f"a {sub.status.value} submission cannot be {verb}",
            code="invalid_state",
        )
    return sub


def _require(conn: sqlite3.Connection, submission_id: str, user_id: str) -> Submission:
    sub = _select_submission(conn, submission_id, user_id)
    if sub is None:
        raise NotFoundError("no such submission")
    return sub


# -- the engine's side -------------------------------------------------------


def due_window(
    conn: sqlite3.Connection, limit: int, skip_templates: Iterable[str] = ()
) -> list[tuple[float, int, str, str]]:
    """The soonest-due queued submissions, as (due, seq, id, template id)."""
    skipped = tuple(skip_templates)
    marks = ", ".join("?" * len(skipped))
    rows = conn.execute(
        "SELECT next_retry_at, seq, id, form_template_id FROM submissions"  # noqa: S608
        " WHERE status IN ('pending', 'retrying')"
        f" AND form_template_id NOT IN ({marks})"
        " ORDER BY next_retry_at, seq LIMIT ?",
        (*skipped, limit),
    ).fetchall()
    return [(float(row[0]), int(row[1]), str(row[2]), str(row[3])) for row in rows]


CLAIM_SQL: Final = (
    "UPDATE submissions SET status = 'processing', processing_started_at = ?,"  # noqa: S608
    " updated_at = ? WHERE id = ? AND status IN ('pending', 'retrying')"
    f" AND next_retry_at <= ? RETURNING {SUBMISSION_COLUMNS}"
)


def claim(
    conn: sqlite3.Connection,
    submission_ids: list[str],
    now: float,
    due_by: float | None = None,
) -> list[Submission | None]:
    """Mark submissions due by `due_by` (default: now) `processing`.

    None for each that is not queued, or not due by then.
    """
    limit = now if due_by is None else due_by
    claimed: list[Submission | None] = []
    for submission_id in submission_ids:
        rows = conn.execute(CLAIM_SQL, (now, now, submission_id, limit)).fetchall()
        claimed.append(_submission(rows[0]) if rows else None)
    return claimed


class Finish(msgspec.Struct, kw_only=True):
    """The end of one attempt: its record and the submission's new state."""

    attempt: Attempt
    user_id: str
    form_template_id: str
    status: Status
    retry_count: int
    next_retry_at: float | None
    completed_at: float
    response_data: Any = None


FINISH_SQL: Final = (
    "UPDATE submissions SET status = ?, retry_count = ?,"
    " attempt_count = attempt_count + 1, next_retry_at = ?,"
    " processing_started_at = ?, processing_completed_at = ?,"
    " processing_duration_ms = ?, response_data = ?, error_message = ?,"
    " error_category = ?, error_details = ?, updated_at = ?"
    " WHERE id = ? AND status = 'processing'"
)


def finish_attempt(conn: sqlite3.Connection, finish: Finish) -> Status:
    """Record an attempt and move its submission on; return the new status.

    A submission whose user was revoked meanwhile is not retried.
    """
    attempt = finish.attempt
    status = finish.status
    next_retry_at = finish.next_retry_at
    if status is Status.RETRYING and not is_user_live(conn, finish.user_id):
        status, next_retry_at = Status.CANCELLED, None
    error_details = encode_json(attempt.error_details)
    _insert_attempt(conn, attempt, finish.form_template_id, error_details)
    failed = attempt.outcome is not Outcome.SUCCESS
    updated = conn.execute(
        FINISH_SQL,
        (
            status.value,
            finish.retry_count,
            next_retry_at,
            attempt.started_at,
            finish.completed_at,
            attempt.duration_ms,
            encode_json(finish.response_data),
            attempt.error_message if failed else None,
            attempt.error_category if failed else None,
            error_details if failed else None,
            finish.completed_at,
            attempt.submission_id,
        ),
    )
    if updated.rowcount and status in FINAL_STATES:
        count_unfinished_change(conn, finish.user_id, -1)
    return status


def _insert_attempt(
    conn: sqlite3.Connection,
    attempt: Attempt,
    template_id: str,
    error_details: bytes | None,
) -> None:
    conn.execute(
        "INSERT INTO attempts (submission_id, number, started_at, duration_ms,"
        " outcome, status, error_category, error_message, error_details, reply,"
        " form_template_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            attempt.submission_id,
            attempt.number,
            attempt.started_at,
            attempt.duration_ms,
            attempt.outcome.value,
            attempt.status,
            attempt.error_category,
            attempt.error_message,
            error_details,
            attempt.reply,
            template_id,
        ),
    )


def processing_rows(conn: sqlite3.Connection) -> list[Submission]:
    rows = conn.execute(
        f"SELECT {SUBMISSION_COLUMNS} FROM submissions"  # noqa: S608
        " WHERE status = 'processing'"
    ).fetchall()
    return [_submission(row) for row in rows]


# -- statistics --------------------------------------------------------------

HOUR_SECONDS: Final = 3600.0
HOURS_SHOWN: Final = 24
PERCENTILES: Final = (50, 95, 99)
# For each template and hour, two counts over a range of the (template,
# started_at) index: no attempt is sorted or grouped, whatever the volume.
HOURLY_SQL: Final = """
    WITH RECURSIVE
        hours(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM hours WHERE i < :last),
        mine(id) AS (SELECT id FROM templates WHERE user_id = :user)
    SELECT mine.id, hours.i,
        (SELECT COUNT(*) FROM attempts WHERE form_template_id = mine.id
            AND started_at >= :first + hours.i * :hour
            AND started_at < :first + (hours.i + 1) * :hour),
        (SELECT COUNT(*) FROM attempts WHERE form_template_id = mine.id
            AND outcome = 'success'
            AND started_at >= :first + hours.i * :hour
            AND started_at < :first + (hours.i + 1) * :hour)
    FROM mine, hours
"""
STATUS_COUNTS_SQL: Final = (
    "SELECT form_template_id, status, COUNT(*) FROM submissions"
    " WHERE user_id = ? AND created_at >= ? GROUP BY form_template_id, status"
)
# The duration at one rank. `+started_at` keeps the planner on the index
# ordered by duration, so the walk stops at the rank without sorting.
PERCENTILE_SQL: Final = (
    "SELECT duration_ms FROM attempts WHERE form_template_id = ?"
    " AND duration_ms IS NOT NULL AND +started_at >= ?"
    " ORDER BY duration_ms LIMIT 1 OFFSET ?"
)


def stats(conn: sqlite3.Connection, user_id: str, since: float, now: float) -> Stats:
    """The delivery statistics of one user's templates (GET /v1/stats)."""
    templates = conn.execute(
        "SELECT id, name FROM templates WHERE user_id = ? ORDER BY created_at, id",
        (user_id,),
    ).fetchall()
    counts = _status_counts(conn, user_id, since)
    categories, timed = _attempt_figures(conn, user_id, since)
    starts = _hour_starts(now)
    hourly = _hourly(conn, user_id, now, starts)
    items = [
        TemplateStats(
            id=template_id,
            name=name,
            counts=counts.get(template_id, StatusCounts()),
            success_rate=_success_rate(counts.get(template_id)),
            duration_ms=_percentiles(conn, template_id, since, timed.get(template_id)),
            error_categories=categories.get(template_id, {}),
            hourly=hourly.get(template_id) or _empty_hours(starts),
        )
        for template_id, name in templates
    ]

    return Stats(
        since=format_time(since) or "",
        queue=user_queue(conn, user_id, now),
        templates=items,
    )


def _status_counts(
    conn: sqlite3.Connection, user_id: str, since: float
) -> dict[str, StatusCounts]:
    counts: dict[str, StatusCounts] = {}
    rows = conn.execute(STATUS_COUNTS_SQL, (user_id, since))
    for template_id, status, count in rows:
        setattr(counts.setdefault(template_id, StatusCounts()), status, count)
    return counts


def _success_rate(counts: StatusCounts | None) -> float | None:
    if counts is None or counts.completed + counts.failed == 0:
        return None
    return counts.completed / (counts.completed + counts.failed)


# One pass over a template's attempts in the index order of (template,
# started_at): no sort. The categories are the five of ErrorCategory.
ATTEMPT_FIGURES_SQL: Final = """
    SELECT form_template_id, COUNT(duration_ms),
        SUM(outcome != 'success' AND error_category = 'network'),
        SUM(outcome != 'success' AND error_category = 'timeout'),
        SUM(outcome != 'success' AND error_category = 'remote'),
        SUM(outcome != 'success' AND error_category = 'validation'),
        SUM(outcome != 'success' AND error_category = 'system')
    FROM attempts
    WHERE started_at >= ?
        AND form_template_id IN (SELECT id FROM templates WHERE user_id = ?)
    GROUP BY form_template_id
"""
CATEGORY_ORDER: Final = ("network", "timeout", "remote", "validation", "system")


def _attempt_figures(
    conn: sqlite3.Connection, user_id: str, since: float
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Failed attempts by template and category, and how many had a duration."""
    categories: dict[str, dict[str, int]] = {}
    timed: dict[str, int] = {}
    for template_id, with_duration, *counts in conn.execute(
        ATTEMPT_FIGURES_SQL, (since, user_id)
    ):
        timed[template_id] = with_duration
        categories[template_id] = {
            name: count
            for name, count in zip(CATEGORY_ORDER, counts, strict=True)
            if count
        }
    return categories, timed


def _percentiles(
    conn: sqlite3.Connection, template_id: str, since: float, count: int | None
) -> Percentiles:
    """Nearest-rank percentiles of the durations of attempts since `since`.

    Each one walks the template's attempts in order of duration and stops at
    rank ceil(p * count / 100), so nothing is sorted or read into Python.
    Limit: the walk also passes attempts older than `since`, so its cost
    grows with the template's whole kept history.
    """
    if not count:
        return Percentiles()
    found = []
    for percent in PERCENTILES:
        rank = -(-percent * count // 100)
        row = conn.execute(PERCENTILE_SQL, (template_id, since, rank - 1)).fetchone()
        found.append(None if row is None else row[0])

    return Percentiles(p50=found[0], p95=found[1], p99=found[2])


def _hour_starts(now: float) -> list[str]:
    first = now - HOURS_SHOWN * HOUR_SECONDS
    return [
        format_time(first + hour * HOUR_SECONDS) or "" for hour in range(HOURS_SHOWN)
    ]


def _empty_hours(starts: list[str]) -> list[HourFigures]:
    return [HourFigures(start=start) for start in starts]


def _hourly(
    conn: sqlite3.Connection, user_id: str, now: float, starts: list[str]
) -> dict[str, list[HourFigures]]:
    """Attempts per hour over the 24 hours before `now`, per template."""
    found: dict[str, list[HourFigures]] = {}
    params = {
        "user": user_id,
        "first": now - HOURS_SHOWN * HOUR_SECONDS,
        "hour": HOUR_SECONDS,
        "last": HOURS_SHOWN - 1,
    }
    for template_id, index, total, succeeded in conn.execute(HOURLY_SQL, params):
        hours = found.get(template_id)
        if hours is None:
            hours = found[template_id] = _empty_hours(starts)
        hours[index].succeeded = succeeded
        hours[index].failed = total - succeeded
    return found


DUE_NOW: Final = (
    "SELECT COUNT(*), MIN(next_retry_at) FROM submissions"
    " WHERE status IN ('pending', 'retrying') AND next_retry_at <= ?"
)


def due_now(
    conn: sqlite3.Connection, now: float, user_id: str | None = None
) -> tuple[int, float | None]:
    """Queued submissions due by `now` (one user's, or everyone's), and how long
    the oldest of them has waited (None when there is none)."""
    if user_id is None:
        depth, oldest = conn.execute(DUE_NOW, (now,)).fetchone()
    else:
        depth, oldest = conn.execute(
            DUE_NOW + " AND user_id = ?", (now, user_id)
        ).fetchone()
    return int(depth), None if oldest is None else max(0.0, now - oldest)


def user_queue(conn: sqlite3.Connection, user_id: str, now: float) -> QueueStats:
    """A user's queued submissions that are due now, and the oldest one's wait."""
    depth, age = due_now(conn, now, user_id)
    return QueueStats(depth=depth, oldest_due_age_seconds=age)


def queue_depths(conn: sqlite3.Connection, now: float) -> tuple[dict[str, int], float]:
    """Unfinished submissions of every user by state, and the oldest due one's wait.

    Limit: the counts walk an index of every unfinished row, so a scrape costs
    time in proportion to the backlog.
    """
    rows = conn.execute(
        "SELECT status, COUNT(*) FROM submissions"
        " WHERE status IN ('pending', 'retrying', 'processing') GROUP BY status"
    )
    depths = dict.fromkeys(("pending", "processing", "retrying"), 0)
    depths.update(rows.fetchall())
    _, age = due_now(conn, now)

    return depths, age or 0.0


# -- health ------------------------------------------------------------------


class QueueSummary(msgspec.Struct, kw_only=True):
    """Queued work over all users: due now, in flight, and the oldest wait."""

    depth: int
    processing: int
    oldest_due_age_seconds: float | None


def queue_summary(conn: sqlite3.Connection, now: float) -> QueueSummary:
    depth, age = due_now(conn, now)
    processing = conn.execute(
        "SELECT count(*) FROM submissions WHERE status = 'processing'"
    ).fetchone()

    return QueueSummary(
        depth=depth,
        processing=int(processing[0]),
        oldest_due_age_seconds=None if age is None else round(age, 3),
    )


# -- retention ---------------------------------------------------------------


def delete_finished(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete up to `limit` finished submissions last changed before `before`,
    with their attempts; return how many."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM submissions INDEXED BY submissions_finished"
            " WHERE status IN ('completed', 'failed', 'cancelled')"
            " AND updated_at < ? ORDER BY updated_at LIMIT ?",
            (before, limit),
        )
    ]
    rows = [(submission_id,) for submission_id in ids]
    conn.executemany("DELETE FROM attempts WHERE submission_id = ?", rows)
    conn.executemany("DELETE FROM submissions WHERE id = ?", rows)

    return len(ids)


def oldest_finished(conn: sqlite3.Connection) -> float | None:
    """When the longest-finished submission was last changed, if any."""
    row = conn.execute(
        "SELECT min(updated_at) FROM submissions INDEXED BY submissions_finished"
        " WHERE status IN ('completed', 'failed', 'cancelled')"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def free_pages(conn: sqlite3.Connection, limit: int) -> int:
    """Give up to `limit` free pages back to the file system; return how many
    were free before (incremental vacuum; outside any transaction)."""
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free:
        # execute() would step the pragma once, freeing one page; a script
        # runs it to the end.
        conn.executescript(f"PRAGMA incremental_vacuum({int(limit)});")
    return free


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file without waiting for readers."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
