"""/metrics and /v1/stats of a real daemon that has delivered, retried and failed."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import aiohttp

from tests.e2e.conftest import Api, DaemonProcess, Reply, Sink

CONTENT_TYPE_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, found by name and labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if match.group(1) == name and found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name} {labels}")


async def scrape(base: str, token: str | None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/metrics", headers=headers) as answer,
    ):
        return answer.status, answer.headers["Content-Type"], await answer.text()


async def deliver_three(api: Api, sink: Sink) -> dict[str, Any]:
    """One submission completes at once, one after a retry, one fails for good."""
    sink.script("/ok", Reply(200))
    sink.script("/flaky", Reply(503), then=Reply(200))
    sink.script("/gone", Reply(404))
    subs = {}
    for path in ("ok", "flaky", "gone"):
        template = await api.template(
            name=f"observe-{path}",
            method="API",
            target={"url": sink.url(f"/{path}")},
            max_retries=2,
            retry_backoff_seconds=0.05,
        )
        sub = await api.submit(template["id"], {"n": 1})
        subs[path] = await api.wait_final(sub["id"])
    assert [subs[p]["status"] for p in ("ok", "flaky", "gone")] == [
        "completed",
        "completed",
        "failed",
    ]
    return subs


async def test_metrics_pass_promtool_and_count_what_happened(start_daemon, sink):
    _, api = await start_daemon()
    await deliver_three(api, sink)

    status, content_type, text = await scrape(api.base, api.token)

    assert status == 200
    assert content_type == CONTENT_TYPE_0_0_4
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup installs Debian's prometheus"
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert sample(text, "ptdaemon_submissions_created_total", method="API") == 3
    finished = "ptdaemon_submissions_finished_total"
    assert sample(text, finished, method="API", status="completed") == 2
    assert sample(text, finished, method="API", status="failed") == 1
    attempts = "ptdaemon_attempts_total"
    ok = {"method": "API", "outcome": "success", "error_category": "none"}
    failed = {"method": "API", "outcome": "error", "error_category": "remote"}
    assert sample(text, attempts, **ok) == 2
    assert sample(text, attempts, **failed) == 2
    histogram = "ptdaemon_attempt_duration_seconds_count"
    assert sample(text, histogram, method="API") == 4
    assert sample(text, "ptdaemon_queue_depth", status="pending") == 0
    assert sample(text, "ptdaemon_attempts_in_flight") == 0
    assert sample(text, "ptdaemon_store_commit_batch_size_count") > 0
    requests = "ptdaemon_api_requests_total"
    created = {"route": "/v1/submissions", "method": "POST", "code": "202"}
    assert sample(text, requests, **created) == 3
    # Labels carry route patterns, never ids, names or URLs.
    assert 'route="/v1/submissions/{id}"' in text
    assert "observe-ok" not in text
    assert str(sink.port) not in text


async def test_metrics_need_an_admin_token(start_daemon):
    _, api = await start_daemon()
    status, user = await api.request("POST", "/v1/users", {"name": "viewer"})
    assert status == 201

    assert (await scrape(api.base, None))[0] == 401
    assert (await scrape(api.base, "wrong"))[0] == 401
    status, _, body = await scrape(api.base, user["token"])
    assert status == 403
    assert '"code":"forbidden"' in body.replace(" ", "")


async def test_public_metrics_need_no_token(tmp_path):
    process = DaemonProcess(tmp_path)
    config = process.config_path.read_text()
    process.config_path.write_text(
        config.replace("[api]\n", "[api]\nmetrics_public = true\n")
    )
    await process.start()
    try:
        status, _, text = await scrape(process.base, None)
    finally:
        assert await process.terminate() == 0

    assert status == 200
    assert "ptdaemon_queue_depth" in text


async def test_stats_route_counts_own_templates_only(start_daemon, sink):
    _, api = await start_daemon()
    subs = await deliver_three(api, sink)
    status, user = await api.request("POST", "/v1/users", {"name": "other"})
    assert status == 201

    stats = await api.ok("GET", "/v1/stats")
    other = await api.request("GET", "/v1/stats", token=user["token"])

    by_name = {t["name"]: t for t in stats["templates"]}
    flaky = by_name["observe-flaky"]
    assert flaky["counts"]["completed"] == 1
    assert flaky["success_rate"] == 1.0
    assert flaky["error_categories"] == {"remote": 1}
    assert flaky["duration_ms"]["p50"] is not None
    assert sum(h["succeeded"] + h["failed"] for h in flaky["hourly"]) == 2
    assert by_name["observe-gone"]["success_rate"] == 0.0
    assert stats["queue"] == {"depth": 0, "oldest_due_age_seconds": None}
    assert other == (200, {**other[1], "templates": []})
    assert subs["flaky"]["form_template_id"] == flaky["id"]


async def test_stats_since_is_checked(start_daemon):
    _, api = await start_daemon()

    for bad in ("yesterday", "2026-01-01T00:00:00", "0001-01-01T00:00:00Z"):
        status, body = await api.request("GET", f"/v1/stats?since={bad}")
        assert status == 400, bad
        assert body["error"]["code"] == "bad_query"
    status, body = await api.request(
        "GET", "/v1/stats?since=2026-01-01T01:00:00%2B01:00"
    )
    assert status == 200
    assert body["since"] == "2026-01-01T00:00:00.000000Z"
