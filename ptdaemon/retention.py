"""Deletes finished submissions past their age, then gives the space back.

A sweep deletes in small batches, each its own write, so other writes get
in between; then it frees pages with incremental vacuum. Sweeps run on a
timer set for when the oldest finished row comes of age, never on a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from ptdaemon import queries
from ptdaemon.errors import StoreError
from ptdaemon.store import Store
from ptdaemon.timeutil import now as wall_now

log = logging.getLogger(__name__)

BATCH_ROWS: Final = 500
VACUUM_PAGES: Final = 2000
# The timer is re-armed at least this often, so that rows which finish
# after a sweep are not left for longer than this past their age.
MAX_SLEEP_SECONDS: Final = 6 * 3600.0
MIN_SLEEP_SECONDS: Final = 60.0
DAY_SECONDS: Final = 86400.0


class Retention:
    """Keeps finished submissions for `max_age_seconds`; None keeps them forever."""

    def __init__(
        self,
        store: Store,
        *,
        max_age_seconds: float | None,
        clock: Callable[[], float] = wall_now,
    ) -> None:
        self._store = store
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.max_age_seconds is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
                delay = await self._next_delay()
            except StoreError as exc:
                log.warning("retention sweep failed", extra={"error": str(exc)})
                delay = MIN_SLEEP_SECONDS
            await asyncio.sleep(delay)

    async def _next_delay(self) -> float:
        """Seconds until the oldest finished row comes of age (bounded)."""
        assert self.max_age_seconds is not None
        oldest = await self._store.read(queries.oldest_finished)
        if oldest is None:
            return MAX_SLEEP_SECONDS
        due_in = oldest + self.max_age_seconds - self._clock()

        return min(MAX_SLEEP_SECONDS, max(MIN_SLEEP_SECONDS, due_in))

    async def sweep(self) -> int:
        """Delete what is past its age, batch by batch; return how many."""
        if self.max_age_seconds is None:
            return 0
        before = self._clock() - self.max_age_seconds
        deleted = 0
        while True:
            count = await self._store.write(
                lambda conn: queries.delete_finished(conn, before, BATCH_ROWS)
            )
            deleted += count
            if count < BATCH_ROWS:
                break
        if deleted:
            freed = await self.vacuum()
            log.info(
                "finished submissions removed",
                extra={"count": deleted, "pages_freed": freed},
            )
        return deleted

    async def vacuum(self) -> int:
        """Give free pages back to the file system, a chunk at a time."""
        freed = 0
        while True:
            free = await self._store.maintain(
                lambda conn: queries.free_pages(conn, VACUUM_PAGES)
            )
            freed += min(free, VACUUM_PAGES)
            if free <= VACUUM_PAGES:
                break
        await self._store.maintain(queries.checkpoint)
        return freed


def max_age_seconds(finished_days: float) -> float | None:
    """`[retention] finished_days` in seconds; 0 keeps everything."""
    return finished_days * DAY_SECONDS if finished_days > 0 else None
