"""Delivery over HTTP through the real daemon: outcomes, retries and backoff."""

from __future__ import annotations

from tests.e2e.conftest import Reply


async def test_503_twice_then_200_completes_after_three_attempts(sink, start_daemon):
    url = sink.script("/form", Reply(503), Reply(503), then=Reply(200))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, retry_backoff_seconds=0.3, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])
    arrivals = sink.seen("/form")

    assert final["status"] == "completed"
    assert final["retry_count"] == 2
    assert final["error_category"] is None
    assert [a["outcome"] for a in attempts] == ["error", "error", "success"]
    assert [a["status"] for a in attempts] == [503, 503, 200]
    assert len(arrivals) == 3
    first_gap = arrivals[1].at - arrivals[0].at
    second_gap = arrivals[2].at - arrivals[1].at
    assert first_gap >= 0.3
    assert second_gap >= 0.6
    assert {r.headers["Idempotency-Key"] for r in arrivals} == {sub["id"]}
