"""The due-time heap: which submission starts next, and when.

It holds only (due, seq, id, template id) for a window of the soonest-due submissions;
the store's index on `next_retry_at` holds the rest, and the window is
refilled from it when it runs low. A waiter sleeps on a timer set for the
soonest due time or on an event set by `push`; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections.abc import Awaitable, Callable

from ptdaemon.timeutil import now as wall_now

log = logging.getLogger(__name__)

# (due, seq, submission id, template id); an empty template id is unknown.
Entry = tuple[float, int, str, str]
Loader = Callable[[int], Awaitable[list[Entry]]]


class Scheduler:
    """Orders queued submissions by due time.

    Entries may be stale (the row was cancelled, retried or claimed since):
    whoever pops one must check the row, and a conditional claim does.
    """

    def __init__(
        self,
        load_window: Loader,
        *,
        window: int = 10000,
        clock: Callable[[], float] = wall_now,
        lead: float = 0.0,
    ) -> None:
        self._load_window = load_window
        self._window = window
        # Entries are handed out this many seconds before they are due.
        self._lead = lead
        self._clock = clock
        self._heap: list[Entry] = []
        # Entries due after the horizon live only in the store. Infinite
        # when the last load saw every queued row.
        self._horizon = math.inf
        self._changed = asyncio.Event()
        self._refill_lock = asyncio.Lock()
        self._pushed_during_refill: list[Entry] | None = None
        self._reload_requested = False
        self.wakeups = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def horizon(self) -> float:
        return self._horizon

    async def load(self) -> None:
        """Replace the heap with the soonest-due window of the store."""
        async with self._refill_lock:
            self.loads += 1
            self._pushed_during_refill = []
            try:
                rows = await self._load_window(self._window)
            finally:
                pushed, self._pushed_during_refill = self._pushed_during_refill, None
            self._heap = list(rows)
            self._horizon = rows[-1][0] if len(rows) >= self._window else math.inf
            for entry in pushed:
                self._insert(entry)
            heapq.heapify(self._heap)
        self._changed.set()
        log.debug("scheduler loaded", extra={"entries": len(self._heap)})

    def push(
        self, due: float, seq: int, submission_id: str, template_id: str = ""
    ) -> None:
        """Note a committed row that is queued and due at `due`."""
        entry = (due, seq, submission_id, template_id)
        if self._pushed_during_refill is not None:
            self._pushed_during_refill.append(entry)
        self._insert(entry)
        self._changed.set()

    def _insert(self, entry: Entry) -> None:
        if entry[0] > self._horizon:
            return
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * self._window:
            self._trim()

    def _trim(self) -> None:
        self._heap.sort()
        del self._heap[self._window :]
        self._horizon = self._heap[-1][0]

    def request_reload(self) -> None:
        """Reload the window from the store before the next pop."""
        self._reload_requested = True
        self._changed.set()

    def pop_due(self) -> Entry | None:
        """The soonest entry if it is due now (or within the lead), without waiting."""
        if self._reload_requested or not self._heap:
            return None
        if self._heap[0][0] - self._lead > self._clock():
            return None
        return heapq.heappop(self._heap)

    async def next_due(self) -> Entry:
        """Wait until the soonest entry is due (less the lead), pop and return it."""
        while True:
            if self._reload_requested or (
                not self._heap and math.isfinite(self._horizon)
            ):
                self._reload_requested = False
                await self.load()
                continue
            delay = (
                self._heap[0][0] - self._lead - self._clock() if self._heap else None
            )
            if delay is not None and delay <= 0:
                return heapq.heappop(self._heap)
            self._changed.clear()
            await self._wait(delay)

    async def _wait(self, delay: float | None) -> None:
        self.wakeups += 1
        if delay is None:
            await self._changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=delay)
