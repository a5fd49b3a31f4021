"""The engine: claims, limits, outcomes, and cutting attempts at shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ptdaemon import queries
from ptdaemon.cache import TemplateCache
from ptdaemon.dispatch.base import Delivery, Result
from ptdaemon.engine import Engine
from ptdaemon.errors import DeliveryError
from ptdaemon.models import ErrorCategory, Method, Outcome, Status, Template
from ptdaemon.store import Store
from tests.test_store import make_submission, make_template, make_user


@dataclass
class FakeDispatcher:
    """Delivers by destination name: `gates` block, `errors` fail."""

    method: Method = Method.API
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    errors: dict[str, list[BaseException]] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    delivered: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)

    def check_target(self, target: Any) -> None:
        return None

    def destination_key(self, template: Template) -> str:
        return str(template.target["url"])

    async def deliver(self, delivery: Delivery) -> Result:
        key = self.destination_key(delivery.template)
        self.sent_at[delivery.submission_id] = time.time()
        self.routes[delivery.submission_id] = key
        self.running[key] = self.running.get(key, 0) + 1
        self.peak[key] = max(self.peak.get(key, 0), self.running[key])
        try:
            gate = self.gates.get(key)
            if gate is not None:
                await gate.wait()
            failures = self.errors.get(key)
            if failures:
                raise failures.pop(0)
            self.delivered.append(delivery.submission_id)
            return Result(status=200, response_data={"ok": True})
        finally:
            self.running[key] -= 1

    async def close(self) -> None:
        return None


class Rig:
    """A store, a fake dispatcher and an engine that starts on demand."""

    def __init__(self, store: Store, dispatcher: FakeDispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.engine: Engine | None = None
        self.user = make_user()
        self.templates: dict[str, Template] = {}
        self.cache = TemplateCache(store)

    async def start(
        self,
        *,
        concurrency: int = 10,
        per_destination: int = 10,
        window: int = 100,
        claim_ahead: float = 0.02,
    ) -> Engine:
        self.engine = Engine(
            self.store,
            {Method.API: self.dispatcher},
            concurrency=concurrency,
            per_destination=per_destination,
            window=window,
            templates=self.cache,
            claim_ahead_seconds=claim_ahead,
        )
        await self.engine.scheduler.load()
        self.engine.start()
        return self.engine

    async def submit(
        self, destination: str, due: float = 0.0, **template_fields: Any
    ) -> str:
        template = self.templates.get(destination)
        if template is None:
            template = make_template(self.user, name=destination)
            template.target = {"url": destination}
            template.retry_backoff_seconds = 0.05
            for key, value in template_fields.items():
                setattr(template, key, value)
            self.templates[destination] = template
            await self.store.write(lambda c: queries.insert_template(c, template))
        sub = make_submission(self.user, template, due=due)
        sub.max_retries = template.max_retries
        sub.retry_backoff_seconds = template.retry_backoff_seconds
        [(row, _)] = await self.store.write(
            lambda c: queries.insert_submissions(c, [queries.NewSubmission(sub, None)])
        )
        if self.engine is not None:
            # As the API does: the entry names its template.
            self.engine.scheduler.push(due, row.seq, row.id, template.id)
        return row.id

    async def status(self, sub_id: str) -> Status:
        sub = await self.store.read(
            lambda c: queries.get_submission(c, sub_id, self.user.id)
        )
        assert sub is not None
        return sub.status

    async def wait_status(self, sub_id: str, *wanted: Status) -> None:
        async with asyncio.timeout(10):
            while await self.status(sub_id) not in wanted:
                await asyncio.sleep(0.01)

    async def attempts(self, sub_id: str) -> list[Any]:
        found = await self.store.read(
            lambda c: queries.list_attempts(c, sub_id, self.user.id)
        )
        assert found is not None
        return found


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(tmp_path / "db.sqlite")
    made = Rig(store, FakeDispatcher())
    await store.write(lambda c: queries.insert_user(c, made.user, "h"))
    yield made
    if made.engine is not None:
        for gate in made.dispatcher.gates.values():
            gate.set()
        await made.engine.stop(grace_seconds=1)
    await store.close()


async def test_a_success_completes_and_records_one_attempt(rig: Rig):
    await rig.start()
    sub_id = await rig.submit("a")

    await rig.wait_status(sub_id, Status.COMPLETED)

    [attempt] = await rig.attempts(sub_id)
    assert attempt.outcome is Outcome.SUCCESS
    assert attempt.number == 1


async def test_transient_errors_retry_until_success(rig: Rig):
    error = DeliveryError("busy", category=ErrorCategory.REMOTE, retryable=True)
    rig.dispatcher.errors["a"] = [error, error]
    await rig.start()
    sub_id = await rig.submit("a")

    await rig.wait_status(sub_id, Status.COMPLETED)

    attempts = await rig.attempts(sub_id)
    assert [a.outcome for a in attempts] == [
        Outcome.ERROR,
        Outcome.ERROR,
        Outcome.SUCCESS,
    ]
    assert [a.number for a in attempts] == [1, 2, 3]


async def test_a_dispatcher_crash_is_a_retried_system_error(rig: Rig):
    rig.dispatcher.errors["a"] = [RuntimeError("plugin bug")]
    await rig.start()
    sub_id = await rig.submit("a")

    await rig.wait_status(sub_id, Status.COMPLETED)

    first = (await rig.attempts(sub_id))[0]
    assert first.error_category is ErrorCategory.SYSTEM
    assert first.error_details["exception"] == "RuntimeError"
    assert first.error_details["retryable"] is True
    assert "plugin bug" in first.error_details["traceback"]


async def test_a_slow_destination_cannot_starve_the_others(rig: Rig):
    rig.dispatcher.gates["slow"] = asyncio.Event()
    await rig.start(concurrency=4, per_destination=2)
    slow = [await rig.submit("slow") for _ in range(10)]
    fast = [await rig.submit("fast") for _ in range(5)]

    for sub_id in fast:
        await rig.wait_status(sub_id, Status.COMPLETED)

    assert rig.dispatcher.peak["slow"] == 2
    assert rig.dispatcher.peak["fast"] <= 2
    assert await rig.status(slow[-1]) is Status.PENDING

    rig.dispatcher.gates["slow"].set()
    for sub_id in slow:
        await rig.wait_status(sub_id, Status.COMPLETED)
    assert rig.engine is not None
    assert rig.engine.in_flight == 0


async def test_attempts_cut_at_shutdown_are_interrupted_and_due_at_once(rig: Rig):
    rig.dispatcher.gates["hung"] = asyncio.Event()
    await rig.start()
    sub_id = await rig.submit("hung")
    await rig.wait_status(sub_id, Status.PROCESSING)
    assert rig.engine is not None

    await rig.engine.stop(grace_seconds=0.1)

    [attempt] = await rig.attempts(sub_id)
    sub = await rig.store.read(lambda c: queries.get_submission(c, sub_id, rig.user.id))
    assert attempt.outcome is Outcome.INTERRUPTED
    assert attempt.error_category is ErrorCategory.SYSTEM
    assert sub is not None
    assert sub.status is Status.RETRYING
    assert sub.retry_count == 1
    assert sub.next_retry_at is not None
    assert sub.next_retry_at <= attempt.started_at + 5


async def test_validation_errors_are_not_retried(rig: Rig):
    error = DeliveryError("bad address", category=ErrorCategory.VALIDATION)
    rig.dispatcher.errors["a"] = [error]
    await rig.start()
    sub_id = await rig.submit("a")

    await rig.wait_status(sub_id, Status.FAILED)

    assert len(await rig.attempts(sub_id)) == 1


async def test_cancelled_before_its_turn_is_never_delivered(rig: Rig):
    sub_id = await rig.submit("a")
    await rig.store.write(
        lambda c: queries.cancel_submission(c, sub_id, rig.user.id, 1.0)
    )
    await rig.start()
    other = await rig.submit("a")

    await rig.wait_status(other, Status.COMPLETED)

    assert sub_id not in rig.dispatcher.delivered
    assert await rig.status(sub_id) is Status.CANCELLED


async def test_a_dead_destination_with_a_backlog_past_the_window(rig: Rig):
    rig.dispatcher.gates["dead"] = asyncio.Event()
    dead = [await rig.submit("dead") for _ in range(400)]
    engine = await rig.start(concurrency=8, per_destination=2, window=100)
    fast = [await rig.submit("fast") for _ in range(20)]

    for sub_id in fast:
        await rig.wait_status(sub_id, Status.COMPLETED)
    loads_before = engine.scheduler.loads
    await asyncio.sleep(0.3)

    assert engine.scheduler.loads == loads_before
    assert len(engine._parked) <= 100
    assert rig.dispatcher.peak["dead"] == 2

    rig.dispatcher.gates["dead"].set()
    for sub_id in dead:
        await rig.wait_status(sub_id, Status.COMPLETED)
    assert sorted(rig.dispatcher.delivered) == sorted(dead + fast)
    assert engine._parked == set()


async def test_a_submission_whose_template_is_gone_fails_as_validation(rig: Rig):
    sub_id = await rig.submit("a")
    template = rig.templates["a"]
    await rig.store.write(
        lambda c: c.execute("DELETE FROM templates WHERE id = ?", (template.id,))
    )
    await rig.start()

    await rig.wait_status(sub_id, Status.FAILED)

    [attempt] = await rig.attempts(sub_id)
    assert attempt.error_category is ErrorCategory.VALIDATION
    assert "template" in attempt.error_message


async def test_a_full_disk_postpones_claims_and_records_without_losing_any(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    from ptdaemon import engine as engine_module
    from ptdaemon.errors import StorageUnavailableError

    monkeypatch.setattr(engine_module, "STORAGE_RETRY_SECONDS", 0.05)
    real_write = rig.store.write
    failures = {"left": 0}

    async def flaky_write(fn: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise StorageUnavailableError("storage unavailable: disk is full")
        return await real_write(fn)

    monkeypatch.setattr(rig.store, "write", flaky_write)
    rig.dispatcher.gates["a"] = asyncio.Event()
    first = await rig.submit("a")
    failures["left"] = 3
    await rig.start()
    await rig.wait_status(first, Status.PROCESSING)

    failures["left"] = 3
    rig.dispatcher.gates["a"].set()
    await rig.wait_status(first, Status.COMPLETED)

    assert failures["left"] == 0
    assert rig.dispatcher.delivered == [first]
    assert len(await rig.attempts(first)) == 1


async def test_queued_entries_follow_a_template_that_moved(rig: Rig):
    rig.dispatcher.gates["a"] = asyncio.Event()
    rig.dispatcher.gates["b"] = asyncio.Event()
    await rig.start(concurrency=10, per_destination=2)
    subs = [await rig.submit("a") for _ in range(6)]
    async with asyncio.timeout(5):
        while rig.dispatcher.running.get("a", 0) < 2:
            await asyncio.sleep(0.01)

    moved = rig.templates["a"]
    moved.target = {"url": "b"}
    await rig.store.write(lambda c: queries.update_template(c, moved))
    subs += [await rig.submit("b") for _ in range(2)]
    async with asyncio.timeout(5):
        while rig.dispatcher.running.get("b", 0) < 2:
            await asyncio.sleep(0.01)
    rig.dispatcher.gates["a"].set()
    async with asyncio.timeout(5):
        while rig.dispatcher.running.get("b", 0) < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    rig.dispatcher.gates["b"].set()
    for sub_id in subs:
        await rig.wait_status(sub_id, Status.COMPLETED)

    assert rig.dispatcher.peak["b"] == 2


async def test_overdue_entries_start_in_due_order(rig: Rig):
    started: list[str] = []
    original = rig.dispatcher.deliver

    async def record(delivery: Delivery) -> Result:
        started.append(delivery.submission_id)
        return await original(delivery)

    rig.dispatcher.deliver = record  # type: ignore[method-assign]
    ids = []
    for n in range(150):
        sub_id = await rig.submit("a")
        await rig.store.write(
            lambda c, s=sub_id, d=float(n): c.execute(
                "UPDATE submissions SET next_retry_at = ? WHERE id = ?", (d, s)
            )
        )
        ids.append(sub_id)
    await rig.start(concurrency=50, per_destination=20)

    for sub_id in ids:
        await rig.wait_status(sub_id, Status.COMPLETED)

    assert started == ids


async def test_a_template_moved_elsewhere_takes_its_new_submissions_along(rig: Rig):
    rig.dispatcher.gates["old"] = asyncio.Event()
    await rig.start(per_destination=1)
    first = await rig.submit("old")
    await rig.wait_status(first, Status.PROCESSING)
    template = rig.templates["old"]
    moved = msgspec.structs.replace(template, target={"url": "new"})
    await rig.store.write(lambda c: queries.update_template(c, moved))
    rig.cache.changed()

    # Due after the change: it goes to the new destination, which is free,
    # rather than queueing behind the attempt that holds the old one.
    later = await rig.submit("old")
    await rig.wait_status(later, Status.COMPLETED)

    assert await rig.status(first) is Status.PROCESSING
    assert rig.dispatcher.peak == {"old": 1, "new": 1}


async def test_entries_without_their_template_id_are_looked_up(rig: Rig):
    await rig.start()
    template = make_template(rig.user, name="plain")
    template.target = {"url": "plain"}
    await rig.store.write(lambda c: queries.insert_template(c, template))
    sub = make_submission(rig.user, template, due=0.0)
    [(row, _)] = await rig.store.write(
        lambda c: queries.insert_submissions(c, [queries.NewSubmission(sub, None)])
    )
    assert rig.engine is not None
    rig.engine.scheduler.push(0.0, row.seq, row.id)

    await rig.wait_status(row.id, Status.COMPLETED)

    assert rig.dispatcher.delivered == [row.id]


async def test_a_scheduled_submission_is_claimed_ahead_and_sent_on_time(rig: Rig):
    await rig.start(claim_ahead=0.5)
    due = time.time() + 1.0
    sub_id = await rig.submit("a", due=due)

    await rig.wait_status(sub_id, Status.PROCESSING)
    claimed_before_due = time.time() < due
    await rig.wait_status(sub_id, Status.COMPLETED)

    [attempt] = await rig.attempts(sub_id)
    assert claimed_before_due
    assert rig.dispatcher.sent_at[sub_id] >= due
    assert attempt.started_at >= due


async def test_a_claim_committing_during_shutdown_gets_the_grace_too(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    entered, release = threading.Event(), threading.Event()
    real_claim = queries.claim

    def slow_claim(*args: Any) -> Any:
        entered.set()
        release.wait(5)
        return real_claim(*args)

    monkeypatch.setattr(queries, "claim", slow_claim)
    rig.dispatcher.gates["a"] = asyncio.Event()
    engine = await rig.start()
    sub_id = await rig.submit("a")
    assert await asyncio.to_thread(entered.wait, 5)

    # The stop begins while the claim is still being written.
    stopping = asyncio.create_task(engine.stop(grace_seconds=5))
    await asyncio.sleep(0.05)
    release.set()
    await rig.wait_status(sub_id, Status.PROCESSING)
    rig.dispatcher.gates["a"].set()
    await stopping

    assert await rig.status(sub_id) is Status.COMPLETED
    assert [a.outcome for a in await rig.attempts(sub_id)] == [Outcome.SUCCESS]
    assert engine.in_flight == 0


async def test_an_attempt_keeps_the_template_its_place_was_taken_for(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    rig.dispatcher.gates["c"] = asyncio.Event()
    engine = await rig.start(per_destination=1)
    busy = await rig.submit("c")
    await rig.wait_status(busy, Status.PROCESSING)
    real_claim = queries.claim
    loop = asyncio.get_running_loop()

    def claim_as_the_template_moves(conn: Any, *args: Any) -> Any:
        # The template moves to the busy host in the same moment as the claim
        # of its submission, whose place was taken at the old host.
        if "d" in rig.templates:
            template = msgspec.structs.replace(rig.templates["d"], target={"url": "c"})
            queries.update_template(conn, template)
            loop.call_soon_threadsafe(rig.cache.changed)
            monkeypatch.setattr(queries, "claim", real_claim)
        return real_claim(conn, *args)

    monkeypatch.setattr(queries, "claim", claim_as_the_template_moves)
    moving = await rig.submit("d")
    await rig.wait_status(moving, Status.COMPLETED)
    rig.dispatcher.gates["c"].set()
    await rig.wait_status(busy, Status.COMPLETED)
    after = await rig.submit("d")
    await rig.wait_status(after, Status.COMPLETED)

    # The moving attempt went where its place was; the next one follows the move.
    assert rig.dispatcher.peak == {"c": 1, "d": 1}
    assert rig.dispatcher.routes == {busy: "c", moving: "d", after: "c"}
    assert engine.in_flight == 0
