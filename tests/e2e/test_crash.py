"""The daemon process: SIGKILL and restart, SIGTERM and its grace, idleness."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.conftest import Reply


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def restart(process: Any, api: Any) -> None:
    await process.start()
    api.base = process.base


async def test_an_accepted_submission_survives_sigkill(sink, start_daemon):
    url = sink.script("/form", then=Reply(200))
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    due = time.time() + 2
    when = datetime.fromtimestamp(due, UTC).isoformat()
    sub = await api.submit(template["id"], {"name": "Ada"}, scheduled_at=when)

    process.kill()
    assert sink.requests == []
    await restart(process, api)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert final["data"] == {"name": "Ada"}
    assert [a["outcome"] for a in attempts] == ["success"]
    [seen] = sink.seen("/form")
    assert seen.headers["Idempotency-Key"] == sub["id"]
    assert seen.at >= due - 0.01


async def test_a_submission_due_now_survives_sigkill(sink, start_daemon):
    url = sink.script("/form", then=Reply(200))
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})

    sub = await api.submit(template["id"], {"name": "Ada"})
    process.kill()
    await restart(process, api)
    final = await api.wait_final(sub["id"])

    assert final["status"] == "completed"
    # At least once: one delivery, or two with the same key if the first
    # left before the kill.
    keys = {seen.headers["Idempotency-Key"] for seen in sink.seen("/form")}
    assert keys == {sub["id"]}


async def test_an_attempt_cut_by_sigkill_is_recorded_as_interrupted(sink, start_daemon):
    url = sink.script("/slow", Reply(200, delay=5), then=Reply(200))
    process, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=30, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    process.kill()
    await restart(process, api)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed"
    assert [a["outcome"] for a in attempts] == ["interrupted", "success"]
    assert attempts[0]["error_category"] == "system"
    assert attempts[0]["error_details"]["retryable"] is True
    assert final["retry_count"] == 1
    arrivals = sink.seen("/slow")
    assert len(arrivals) == 2
    assert {seen.headers["Idempotency-Key"] for seen in arrivals} == {sub["id"]}


async def test_sigterm_on_an_idle_daemon_exits_0_and_keeps_the_queue(
    sink, start_daemon
):
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    sub = await api.submit(template["id"], {"name": "Ada"}, scheduled_at=later(3600))

    assert await process.terminate() == 0
    await restart(process, api)
    again = await api.ok("GET", f"/v1/submissions/{sub['id']}")

    assert again["status"] == "pending"
    assert again["next_retry_at"] == sub["next_retry_at"]
    assert again["retry_count"] == 0
    assert await api.attempts(sub["id"]) == []
    assert "daemon stopped" in process.log()


async def test_sigterm_lets_a_short_attempt_finish(sink, start_daemon):
    url = sink.script("/slow", then=Reply(200, delay=1))
    process, api = await start_daemon(grace=10)
    template = await api.template(method="API", target={"url": url})
    sub = await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    assert await process.terminate() == 0
    await restart(process, api)
    final = await api.ok("GET", f"/v1/submissions/{sub['id']}")

    assert final["status"] == "completed"
    assert [a["outcome"] for a in await api.attempts(sub["id"])] == ["success"]
    assert len(sink.seen("/slow")) == 1


async def test_sigterm_cuts_an_attempt_longer_than_the_grace(sink, start_daemon):
    url = sink.script("/slow", Reply(200, delay=8), then=Reply(200))
    process, api = await start_daemon(grace=0.5)
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=30, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    assert await process.terminate() == 0
    await restart(process, api)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert [a["outcome"] for a in attempts] == ["interrupted", "success"]
    assert attempts[0]["error_category"] == "system"
    assert final["status"] == "completed"
    assert final["retry_count"] == 1
    assert len(sink.seen("/slow")) == 2


async def test_an_idle_daemon_does_not_wake_up(sink, start_daemon):
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": sink.url("/x")})
    await api.submit(template["id"], {"name": "Ada"}, scheduled_at=later(3600))
    await api.close()  # no keep-alive connection either

    await asyncio.sleep(1)
    before = process.context_switches()
    await asyncio.sleep(3)
    after = process.context_switches()

    assert before > 0
    assert after - before <= 6, f"{after - before} context switches while idle"
    assert sink.requests == []


async def test_an_interrupted_last_attempt_fails_instead_of_looping(sink, start_daemon):
    url = sink.script("/slow", then=Reply(200, delay=5))
    process, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=30, max_retries=0
    )
    sub = await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    process.kill()
    await restart(process, api)
    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "system"
    assert final["next_retry_at"] is None
    assert [a["outcome"] for a in attempts] == ["interrupted"]
    await asyncio.sleep(0.5)
    assert len(sink.seen("/slow")) == 1
