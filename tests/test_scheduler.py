"""The due-time heap: order, waking, staleness and the bounded window."""

from __future__ import annotations

import asyncio

import pytest

from ptdaemon.scheduler import Entry, Scheduler


class FakeStore:
    """Queued rows as the store's due index would return them."""

    def __init__(self, rows: list[Entry] | None = None) -> None:
        self.rows = sorted(rows or [])
        self.loads = 0

    async def load(self, limit: int) -> list[Entry]:
        self.loads += 1
        return sorted(self.rows)[:limit]


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def test_pops_in_due_order_then_seq():
    clock = Clock()
    scheduler = Scheduler(FakeStore().load, clock=clock)
    await scheduler.load()
    scheduler.push(990.0, 3, "c")
    scheduler.push(980.0, 2, "b")
    scheduler.push(990.0, 1, "a")

    popped = [(await scheduler.next_due())[2] for _ in range(3)]

    assert popped == ["b", "a", "c"]


async def test_waits_for_a_future_entry_and_wakes_on_push():
    scheduler = Scheduler(FakeStore().load)
    await scheduler.load()
    scheduler.push(10.0**12, 1, "far")
    waiter = asyncio.create_task(scheduler.next_due())
    await asyncio.sleep(0.05)
    assert not waiter.done()

    scheduler.push(0.0, 2, "due")

    entry = await asyncio.wait_for(waiter, 2)
    assert entry[2] == "due"


async def test_an_idle_scheduler_sleeps_without_waking():
    scheduler = Scheduler(FakeStore().load)
    await scheduler.load()
    waiter = asyncio.create_task(scheduler.next_due())
    await asyncio.sleep(0.3)

    assert scheduler.wakeups == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_sleeps_until_due_time_with_one_timer():
    import time

    scheduler = Scheduler(FakeStore().load)
    await scheduler.load()
    scheduler.push(time.time() + 0.2, 1, "soon")
    started = time.monotonic()

    entry = await asyncio.wait_for(scheduler.next_due(), 5)

    assert entry[2] == "soon"
    assert time.monotonic() - started >= 0.15
    assert scheduler.wakeups <= 2


async def test_window_holds_only_the_soonest_entries():
    rows = [(float(i), i, f"s{i}") for i in range(1000)]
    store = FakeStore(rows)
    scheduler = Scheduler(store.load, window=100, clock=Clock(10**9))

    await scheduler.load()

    assert len(scheduler) == 100
    assert scheduler.horizon == 99.0


async def test_push_beyond_the_horizon_stays_in_the_store_only():
    rows = [(float(i), i, f"s{i}") for i in range(300)]
    scheduler = Scheduler(FakeStore(rows).load, window=100, clock=Clock(10**9))
    await scheduler.load()

    scheduler.push(5000.0, 999, "late")
    scheduler.push(50.5, 998, "early")

    assert len(scheduler) == 101


async def test_window_refills_from_the_store_when_it_runs_out():
    rows = [(float(i), i, f"s{i}") for i in range(250)]
    store = FakeStore(rows)
    scheduler = Scheduler(store.load, window=100, clock=Clock(10**9))
    await scheduler.load()
    popped: list[str] = []

    for _ in range(250):
        entry = await scheduler.next_due()
        popped.append(entry[2])
        store.rows.remove(entry)

    assert popped == [f"s{i}" for i in range(250)]
    assert store.loads >= 3
    assert len(scheduler) == 0


async def test_overfull_heap_is_trimmed_back_to_the_window():
    scheduler = Scheduler(FakeStore().load, window=100, clock=Clock(0))
    await scheduler.load()

    for i in range(201):
        scheduler.push(float(1000 - i), i, f"s{i}")

    assert len(scheduler) <= 200
    assert scheduler.horizon < 1000.0


async def test_entries_are_handed_out_the_lead_before_they_are_due():
    clock = Clock(100.0)
    scheduler = Scheduler(FakeStore().load, clock=clock, lead=0.5)
    await scheduler.load()
    scheduler.push(101.0, 1, "later")
    scheduler.push(100.4, 2, "within")

    assert scheduler.pop_due() == (100.4, 2, "within", "")
    assert scheduler.pop_due() is None
    clock.now = 100.5
    assert scheduler.pop_due() == (101.0, 1, "later", "")
