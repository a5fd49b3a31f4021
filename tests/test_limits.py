"""Rate limits per token and per failing address, and the per-user caps."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ptdaemon.api.ratelimit import AUTH_FAILURE_BURST, Buckets, retry_after
from tests.inprocess import Client, running


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_its_rate():
    clock = Clock()
    buckets = Buckets(2.0, 3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.now += 100
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") > 0


def test_waiting_does_not_take():
    clock = Clock()
    buckets = Buckets(1.0, 1, clock=clock)
    assert buckets.wait("a") == 0.0
    assert buckets.wait("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.wait("a") == pytest.approx(1.0)


def test_full_buckets_are_forgotten_past_the_key_limit():
    clock = Clock()
    buckets = Buckets(1.0, 2, clock=clock, max_keys=100)
    for number in range(100):
        buckets.take(f"k{number}")
    clock.now += 10
    buckets.take("one more")
    assert len(buckets) == 1


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (59.5, "60")]
)
def test_retry_after_is_whole_seconds(seconds: float, header: str):
    assert retry_after(seconds) == header


def write_config(tmp_path: Path, api: str, limits: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[daemon]\nstate_dir = "state"\n'
        f'[api]\nlisten = "127.0.0.1:0"\n{api}'
        f"[limits]\n{limits}"
        '[security]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    return path


async def raw(
    client: Client, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token or client.token}"}
    async with client.session.request(
        method, client.base + path, headers=headers
    ) as reply:
        return reply.status, dict(reply.headers), await reply.json()


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Client]:
    config = write_config(tmp_path, "rate_per_second = 0.5\nrate_burst = 3\n")
    async with running(config) as client:
        yield client


async def test_a_token_past_its_burst_gets_429_with_retry_after(limited: Client):
    for _ in range(3):
        status, _, _ = await raw(limited, "GET", "/v1/templates")
        assert status == 200
    status, headers, body = await raw(limited, "GET", "/v1/templates")
    assert status == 429
    assert body["error"]["code"] == "rate_limited"
    assert headers["Retry-After"] in ("1", "2")
    assert body["error"]["details"] == {
        "retry_after_seconds": int(headers["Retry-After"])
    }
    # Health stays open whatever the limits.
    status, _, _ = await raw(limited, "GET", "/healthz")
    assert status == 200


async def test_each_token_has_its_own_bucket(limited: Client):
    status, other = await limited.call("POST", "/v1/users", {"name": "clerk"})
    assert status == 201
    for _ in range(3):
        await raw(limited, "GET", "/v1/templates")
    assert (await raw(limited, "GET", "/v1/templates"))[0] == 429
    assert (await raw(limited, "GET", "/v1/templates", other["token"]))[0] == 200


async def test_an_address_that_keeps_failing_is_turned_away(limited: Client):
    for _ in range(AUTH_FAILURE_BURST):
        status, headers, _ = await raw(limited, "GET", "/v1/templates", "pt_bad")
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
    status, headers, body = await raw(limited, "GET", "/v1/templates", "pt_bad")
    assert status == 429
    assert body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    # Turned away before the token is even looked at: a good one waits too.
    assert (await raw(limited, "GET", "/v1/templates"))[0] == 429


async def test_a_rate_of_zero_turns_the_limits_off(tmp_path: Path):
    config = write_config(tmp_path, "rate_per_second = 0\nrate_burst = 1\n")
    async with running(config) as client:
        for _ in range(AUTH_FAILURE_BURST + 5):
            assert (await raw(client, "GET", "/v1/templates", "pt_bad"))[0] == 401
        for _ in range(10):
            assert (await raw(client, "GET", "/v1/templates"))[0] == 200


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Client]:
    config = write_config(
        tmp_path, "rate_per_second = 0\n", "unfinished_per_user = 3\n"
    )
    async with running(config) as client:
        yield client


def later(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "form_template_id": template["id"],
        "data": {"a": 1},
        "scheduled_at": "2999-01-01T00:00:00Z",
    }


async def another_user(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """A second user, "clerk", and a template of its own."""
    status, clerk = await client.call("POST", "/v1/users", {"name": "clerk"})
    assert status == 201
    status, template = await client.call(
        "POST",
        "/v1/templates",
        {"name": "t", "method": "API", "target": {"url": "http://127.0.0.1:9/"}},
        token=clerk["token"],
    )
    assert status == 201
    return clerk, template


async def test_unfinished_submissions_are_capped_per_user(capped: Client):
    template = await capped.template()
    ids = []
    for _ in range(3):
        status, sub = await capped.call("POST", "/v1/submissions", later(template))
        assert status == 202
        ids.append(sub["id"])
    async with capped.session.post(
        capped.base + "/v1/submissions",
        json=later(template),
        headers={"Authorization": f"Bearer {capped.token}"},
    ) as reply:
        body = await reply.json()
        assert reply.status == 429
        assert reply.headers["Retry-After"].isdigit()
    assert body["error"]["code"] == "too_many_unfinished"
    # A batch keeps what fits and says which items did not.
    status, _ = await capped.call("POST", f"/v1/submissions/{ids[0]}/cancel")
    assert status == 200
    status, batch = await capped.call(
        "POST", "/v1/submissions/batch", {"items": [later(template)] * 2}
    )
    assert status == 202
    assert batch["items"][0]["status"] == "pending"
    assert batch["items"][1]["error"]["code"] == "too_many_unfinished"
    # Another user has a cap of its own.
    clerk, mine = await another_user(capped)
    status, _ = await capped.call(
        "POST", "/v1/submissions", later(mine), token=clerk["token"]
    )
    assert status == 202


async def test_the_unfinished_count_follows_every_change_of_state(capped: Client):
    capped.daemon.service.unfinished_per_user = None
    template = await capped.template(max_retries=0)
    rng = random.Random(7)
    ids = []
    for _ in range(40):
        body = (
            later(template)
            if rng.random() < 0.7
            else {
                "form_template_id": template["id"],
                "data": {"a": 1},
            }
        )
        status, sub = await capped.call("POST", "/v1/submissions", body)
        assert status == 202
        ids.append(sub["id"])
    for sub_id in rng.sample(ids, 15):
        await capped.call("POST", f"/v1/submissions/{sub_id}/cancel")
    for sub_id in rng.sample(ids, 10):
        await capped.call("POST", f"/v1/submissions/{sub_id}/retry")
    # One that fails (nothing listens at its target), then is retried by hand.
    status, failing = await capped.call(
        "POST",
        "/v1/submissions",
        {"form_template_id": template["id"], "data": {"a": 2}},
    )
    assert status == 202
    sub = failing
    for _ in range(500):
        if sub["status"] == "failed":
            break
        await asyncio.sleep(0.01)
        _, sub = await capped.call("GET", f"/v1/submissions/{failing['id']}")
    assert sub["status"] == "failed"
    status, _ = await capped.call("POST", f"/v1/submissions/{failing['id']}/retry")
    assert status == 202
    # A batch of another user, one item of it cancelled, then the user revoked
    # with the rest still queued; and a batch of the first user.
    clerk, mine = await another_user(capped)
    for owner, owned in ((clerk["token"], mine), (None, template)):
        status, batch = await capped.call(
            "POST",
            "/v1/submissions/batch",
            {"items": [later(owned)] * 5},
            token=owner,
        )
        assert status == 202
    first = batch["items"][0]["id"]
    assert (await capped.call("POST", f"/v1/submissions/{first}/cancel"))[0] == 200
    assert (await capped.call("DELETE", f"/v1/users/{clerk['id']}"))[0] == 204
    db = capped.daemon.config.state_path / "ptdaemon.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        counted = dict(
            conn.execute(
                "SELECT user_id, count(*) FROM submissions WHERE status IN"
                " ('pending', 'processing', 'retrying') GROUP BY user_id"
            ).fetchall()
        )
        kept = dict(conn.execute("SELECT user_id, n FROM unfinished").fetchall())
    assert len(counted) == 1
    assert {k: v for k, v in kept.items() if v} == counted
