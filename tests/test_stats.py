"""GET /v1/stats's figures, checked against a seeded database of 100,000 rows."""

from __future__ import annotations

import math
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ptdaemon import queries
from ptdaemon.models import ErrorCategory, Stats
from tests.stats_data import NOW, Seeded, make_rows, write_rows

SINCE = NOW - 86400.0


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Seeded, Path]:
    rows = make_rows(100_000)
    path = tmp_path_factory.mktemp("stats") / "stats.db"
    write_rows(path, rows)
    return rows, path


def nearest_rank(values: list[int], percent: int) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(percent * len(ordered) / 100) - 1]


def expected_submission_figures(
    seeded: Seeded, user: str, since: float
) -> tuple[dict[str, Counter[str]], list[float]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    due: list[float] = []
    for _, _, owner, template_id, status, next_due, created in seeded.submissions:
        if owner != user:
            continue
        if created >= since:
            counts[template_id][status] += 1
        if status in ("pending", "retrying") and next_due <= NOW:
            due.append(next_due)
    return counts, due


def expected_stats(seeded: Seeded, user: str, since: float) -> dict[str, Any]:
    """The same figures, worked out in Python straight from the seeded rows."""
    counts, due = expected_submission_figures(seeded, user, since)
    template_of = {row[1]: row[3] for row in seeded.submissions}
    durations: dict[str, list[int]] = defaultdict(list)
    categories: dict[str, Counter[str]] = defaultdict(Counter)
    hours: dict[str, list[list[int]]] = defaultdict(lambda: [[0, 0] for _ in range(24)])
    for sub_id, _, started, duration, outcome, category, _ in seeded.attempts:
        template_id = template_of[sub_id]
        if started >= since:
            if duration is not None:
                durations[template_id].append(duration)
            if outcome != "success":
                categories[template_id][category] += 1
        if NOW - 86400.0 <= started < NOW:
            hour = math.floor((started - (NOW - 86400.0)) / 3600.0)
            hours[template_id][hour][0 if outcome == "success" else 1] += 1
    templates = []
    for template_id, name in seeded.templates[user]:
        mine = counts[template_id]
        finished = mine["completed"] + mine["failed"]
        templates.append(
            {
                "id": template_id,
                "name": name,
                "counts": {
                    s: mine[s]
                    for s in (
                        "pending",
                        "processing",
                        "retrying",
                        "completed",
                        "failed",
                        "cancelled",
                    )
                },
                "success_rate": mine["completed"] / finished if finished else None,
                "duration_ms": {
                    f"p{p}": nearest_rank(durations[template_id], p)
                    for p in (50, 95, 99)
                },
                "error_categories": dict(categories[template_id]),
                "hourly": [[s, f] for s, f in hours[template_id]],
            }
        )
    return {
        "queue": {
            "depth": len(due),
            "oldest_due_age_seconds": NOW - min(due) if due else None,
        },
        "templates": templates,
    }


def computed(path: Path, user: str, since: float) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        stats: Stats = queries.stats(conn, user, since, NOW)
    finally:
        conn.close()
    found: dict[str, Any] = msgspec.to_builtins(stats)
    for template in found["templates"]:
        template["hourly"] = [[h["succeeded"], h["failed"]] for h in template["hourly"]]
    return found


@pytest.mark.parametrize("hours_back", [24, 3, 48 + 1])
def test_stats_match_figures_computed_from_the_rows(
    seeded: tuple[Seeded, Path], hours_back: int
) -> None:
    rows, path = seeded
    since = NOW - hours_back * 3600.0
    for user in rows.users:
        found = computed(path, user, since)
        wanted = expected_stats(rows, user, since)
        assert found["queue"]["depth"] == wanted["queue"]["depth"]
        assert found["queue"]["oldest_due_age_seconds"] == pytest.approx(
            wanted["queue"]["oldest_due_age_seconds"]
        )
        assert found["templates"] == wanted["templates"]


def test_seeded_figures_are_not_trivial(seeded: tuple[Seeded, Path]) -> None:
    """Guard the comparison above: the data has every kind of figure in it."""
    rows, path = seeded
    found = computed(path, rows.users[0], SINCE)
    assert found["since"] == "2027-01-14T08:00:00.000000Z"
    assert found["queue"]["depth"] > 100
    for template in found["templates"]:
        assert sum(template["counts"].values()) > 1000
        assert 0.5 < template["success_rate"] < 1
        assert 0 < template["duration_ms"]["p50"] < template["duration_ms"]["p99"]
        assert set(template["error_categories"]) == {
            "network",
            "timeout",
            "remote",
            "validation",
            "system",
        }
        assert all(sum(hour) > 0 for hour in template["hourly"])


def test_stats_only_cover_the_callers_templates(
    seeded: tuple[Seeded, Path],
) -> None:
    rows, path = seeded
    for user in rows.users:
        ids = [t["id"] for t in computed(path, user, SINCE)["templates"]]
        assert ids == [tid for tid, _ in rows.templates[user]]


def test_a_user_without_templates_gets_an_empty_list(
    seeded: tuple[Seeded, Path],
) -> None:
    _, path = seeded
    found = computed(path, "no-such-user", SINCE)
    assert found["templates"] == []
    assert found["queue"] == {"depth": 0, "oldest_due_age_seconds": None}


def test_every_error_category_has_its_column():
    assert set(queries.CATEGORY_ORDER) == set(ErrorCategory)


def test_stats_queries_use_their_indexes(seeded: tuple[Seeded, Path]) -> None:
    _, path = seeded
    conn = sqlite3.connect(path)
    plan = conn.execute(
        "EXPLAIN QUERY PLAN " + queries.STATUS_COUNTS_SQL, ("u", SINCE)
    ).fetchall()
    percentile = conn.execute(
        "EXPLAIN QUERY PLAN " + queries.PERCENTILE_SQL, ("t", SINCE, 10)
    ).fetchall()
    conn.close()
    assert "COVERING INDEX submissions_user_template" in str(plan)
    assert "COVERING INDEX attempts_template_duration" in str(percentile)
    assert "TEMP B-TREE" not in str(percentile)


async def test_upgrade_gives_old_attempts_their_template(tmp_path: Path):
    from ptdaemon.store import MIGRATIONS, Store

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO submissions (id, user_id, form_template_id, data, status,"
        " max_retries, retry_backoff_seconds, retry_backoff_max_seconds,"
        " retry_jitter, created_at, updated_at)"
        " VALUES ('s1', 'u1', 't1', '{}', 'completed', 3, 60, 86400, 0, 1, 1)"
    )
    conn.execute(
        "INSERT INTO attempts (submission_id, number, started_at, outcome)"
        " VALUES ('s1', 1, 1, 'success')"
    )
    conn.commit()
    conn.close()

    store = await Store.open(path)
    found = await store.read(
        lambda c: c.execute("SELECT form_template_id FROM attempts").fetchall()
    )
    await store.close()

    assert found == [("t1",)]
