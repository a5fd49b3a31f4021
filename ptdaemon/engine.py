"""Claims due submissions, delivers them under concurrency limits, records the result.

Each due entry: read its destination; when that destination is at its
limit, queue behind it without holding a global place; otherwise claim the
row durably as `processing`, map the payload, dispatch under the template's
timeout, then record the attempt and the new state in one write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from ptdaemon import crashpoints, queries, retry
from ptdaemon.cache import TemplateCache, remember
from ptdaemon.dispatch.base import Delivery, Dispatcher, Result
from ptdaemon.errors import DeliveryError, StorageUnavailableError, StoreError
from ptdaemon.mapping import map_payload, missing_required
from ptdaemon.metrics import UNKNOWN_METHOD, Metrics
from ptdaemon.models import (
    Attempt,
    ErrorCategory,
    Method,
    Outcome,
    Status,
    Submission,
    Template,
)
from ptdaemon.scheduler import Entry, Scheduler
from ptdaemon.store import Store
from ptdaemon.timeutil import now as wall_now

log = logging.getLogger(__name__)

TIMEOUT_GRACE_SECONDS: Final = 1.0
# How long to wait before using the store again after a full disk or a busy
# database.
STORAGE_RETRY_SECONDS: Final = 1.0
INTERRUPTED_MESSAGE: Final = "the attempt was interrupted before it finished"
# Due submissions are claimed this long before their due time, and their
# attempts wait for it: the claim's commit (an fsync) is then off the path
# of a scheduled form or a retry. Nothing is sent before its due time.
CLAIM_AHEAD_SECONDS: Final = 0.02
TIMER_SLACK_SECONDS: Final = 0.001


class _Claim(NamedTuple):
    """A submission claimed for one attempt, and what the attempt needs."""

    sub: Submission
    template: Template | None
    number: int
    started_at: float


class _Slots:
    """The global limit on attempts, with a take that never waits."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._freed = asyncio.Event()

    def try_acquire(self) -> bool:
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        while self._free <= 0:
            self._freed.clear()
            await self._freed.wait()
        self._free -= 1

    def release(self) -> None:
        self._free += 1
        self._freed.set()


@dataclass
class _Destination:
    """Attempts running for one destination, and the due entries queued for it.

    Once `waiting` is full the destination is saturated: further entries
    stay in the store only, and its templates are left out of the
    scheduler's loads until the queue drains.
    """

    active: int = 0
    waiting: collections.deque[Entry] = field(default_factory=collections.deque)
    templates: set[str] = field(default_factory=set)
    saturated: bool = False


class Engine:
    """Runs attempts: at most `concurrency` at once, `per_destination` each."""

    def __init__(
        self,
        store: Store,
        dispatchers: dict[Method, Dispatcher],
        *,
        concurrency: int,
        per_destination: int,
        window: int = 10000,
        clock: Callable[[], float] = wall_now,
        metrics: Metrics | None = None,
        templates: TemplateCache | None = None,
        claim_ahead_seconds: float = CLAIM_AHEAD_SECONDS,
    ) -> None:
        self._store = store
        self._templates = templates or TemplateCache(store)
        self._metrics = metrics or Metrics()
        self._claim_ahead = claim_ahead_seconds
        self.scheduler = Scheduler(
            self.load_window, window=window, clock=clock, lead=claim_ahead_seconds
        )
        self._dispatchers = dispatchers
        self._slots = _Slots(concurrency)
        self._per_destination = per_destination
        self._waiting_cap = max(100, per_destination * 10)
        self._destinations: dict[str, _Destination] = {}
        self._keys: dict[str, tuple[Template, str]] = {}
        self._parked: set[str] = set()
        self._stopping = False
        self._clock = clock
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def load_window(self, limit: int) -> list[Entry]:
        """The scheduler's loader: the soonest due rows not already held here."""
        parked = set(self._parked)
        saturated = {
            template_id
            for destination in self._destinations.values()
            if destination.saturated
            for template_id in destination.templates
        }
        rows = await self._store.read(
            lambda conn: queries.due_window(conn, limit + len(parked), saturated)
        )
        return [row for row in rows if row[2] not in parked][:limit]

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="engine-runner")

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                entry = await self.scheduler.next_due()
            except BaseException:
                self._slots.release()
                raise
            # Whatever else is due now and has a place is claimed with it, in
            # one write.
            entries = [entry]
            while self._slots.try_acquire():
                more = self.scheduler.pop_due()
                if more is None:
                    self._slots.release()
                    break
                entries.append(more)
            self._spawn(self._begin(entries))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, *, grace_seconds: float) -> None:
        """Claim nothing more; give running attempts `grace_seconds`, then cut."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if not self._tasks:
            return
        log.info(
            "draining attempts",
            extra={"in_flight": len(self._tasks), "grace_seconds": grace_seconds},
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        # A claim that commits meanwhile starts attempts of its own: those are
        # waited for too, within the same grace.
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        cut = 0
        while self._tasks:
            running = set(self._tasks)
            cut += len(running)
            for task in running:
                task.cancel()
            await asyncio.wait(running)
        if cut:
            log.warning("attempts cut at shutdown", extra={"count": cut})

    # -- one attempt -------------------------------------------------------

    async def _begin(self, entries: list[Entry]) -> None:
        """Claim the entries whose destination has room; queue the others.

        Each entry holds one of the global places. It passes, with a place
        of its destination, to the attempt started for it; entries that start
        nothing give theirs back here.
        """
        ready: list[tuple[_Destination, str, Template | None, Entry]] = []
        try:
            for entry in entries:
                taken = await self._take_place(entry)
                if taken is None:
                    self._slots.release()
                else:
                    ready.append((*taken, entry))
            if not ready:
                return
            if self._stopping:
                # Not claimed: these keep their state and due time.
                for destination, key, _, _ in ready:
                    self._release(destination, key)
                return
            claims = await self._claim(
                [entry for *_, entry in ready], [placed for _, _, placed, _ in ready]
            )
        except BaseException:
            for destination, key, _, _ in ready:
                self._release(destination, key)
            raise
        for (destination, key, _, _), claim in zip(ready, claims, strict=True):
            self._spawn(self._run_for(destination, key, claim))

    async def _take_place(
        self, entry: Entry
    ) -> tuple[_Destination, str, Template | None] | None:
        """A place at the entry's destination, or None: queued behind it, or stale.

        Also the template the destination was found from: the attempt uses it.
        """
        if entry[2] in self._parked:
            return None  # a reload brought back an entry already queued here
        found = await self._destination_or_later(entry)
        if found is None:
            return None
        key, template_id, template = found
        destination = self._destinations.setdefault(key, _Destination())
        destination.templates.add(template_id)
        if destination.active >= self._per_destination:
            self._park(destination, entry)
            return None
        destination.active += 1
        return destination, key, template

    async def _run_for(
        self, destination: _Destination, key: str, claim: _Claim | None
    ) -> None:
        # The place this attempt holds passes to the next entry queued for the
        # same destination, so a queue never waits for a place that nobody frees.
        try:
            while True:
                if claim is not None:
                    try:
                        await self._deliver_and_record(claim)
                    except Exception:
                        log.exception("attempt crashed", extra={"id": claim.sub.id})
                if not destination.waiting or self._stopping:
                    return
                claim = None
                waiting = await self._next_waiting(destination, key)
                if waiting is not None:
                    [claim] = await self._claim([waiting[0]], [waiting[1]])
        finally:
            self._release(destination, key)

    async def _next_waiting(
        self, destination: _Destination, key: str
    ) -> tuple[Entry, Template | None] | None:
        """The next queued entry and its template, unless it now points elsewhere."""
        entry = destination.waiting.popleft()
        self._parked.discard(entry[2])
        found = await self._destination_or_later(entry)
        if found is None:
            return None
        if found[0] != key:
            self.scheduler.push(*entry)
            return None
        return entry, found[2]

    def _try_later(self, entry: Entry) -> None:
        """Put an entry back for a while: the store cannot be used just now."""
        log.warning("storage unavailable, attempt postponed", extra={"id": entry[2]})
        self.scheduler.push(self._clock() + STORAGE_RETRY_SECONDS, *entry[1:])

    def _park(self, destination: _Destination, entry: Entry) -> None:
        if len(destination.waiting) < self._waiting_cap:
            destination.waiting.append(entry)
            self._parked.add(entry[2])
        elif not destination.saturated:
            destination.saturated = True
            log.warning(
                "destination saturated",
                extra={"waiting": len(destination.waiting)},
            )

    def _release(self, destination: _Destination, key: str) -> None:
        """Give back a place at `destination` and the global place with it."""
        self._slots.release()
        destination.active -= 1
        if destination.saturated and not destination.waiting:
            # What was left out of loads while saturated is due again.
            destination.saturated = False
            self.scheduler.request_reload()
        if destination.active == 0 and not destination.waiting:
            del self._destinations[key]

    async def _destination_or_later(
        self, entry: Entry
    ) -> tuple[str, str, Template | None] | None:
        """As `_destination_of`; a store that cannot be read puts the entry back."""
        try:
            return await self._destination_of(entry)
        except StoreError:
            self._try_later(entry)
            return None

    async def _destination_of(
        self, entry: Entry
    ) -> tuple[str, str, Template | None] | None:
        """The destination key, template id and template of an entry.

        None if the entry is stale; the template is None if it was deleted.
        """
        template_id = entry[3]
        if not template_id:
            # Ordered: due entries reach their claims in the order they were popped.
            found = await self._store.read(
                lambda conn: _queued_template_id(conn, entry[2]), ordered=True
            )
            if found is None:
                return None
            template_id = found
        template = self._templates.peek(template_id) or await self._templates.get(
            template_id
        )
        if template is None:
            # The attempt fails and records why; any key will do.
            return "missing-template", template_id, None
        known = self._keys.get(template_id)
        if known is not None and known[0] is template:
            return known[1], template_id, template
        dispatcher = self._dispatchers.get(template.method)
        key = f"method:{template.method}"
        if dispatcher is not None:
            with contextlib.suppress(Exception):
                key = dispatcher.destination_key(template)
        # Keyed by the template object: a changed template is a new object.
        remember(self._keys, template_id, (template, key))
        return key, template_id, template

    async def _claim(
        self, entries: list[Entry], placed: list[Template | None]
    ) -> list[_Claim | None]:
        """Mark the entries `processing` in one write; None for each not claimed.

        Each attempt uses the template its destination place was taken for
        (`placed`), so that it counts against the limit of the host it goes to;
        a template changed since then applies from the next attempt, as for
        an attempt already in flight. One deleted since then fails the attempt.
        """
        ids = [entry[2] for entry in entries]
        claimed_at = self._clock()
        due_by = claimed_at + self._claim_ahead
        try:
            rows = await self._store.write(
                lambda conn: queries.claim(conn, ids, claimed_at, due_by)
            )
        except StorageUnavailableError:
            for entry in entries:
                self._try_later(entry)
            return [None] * len(entries)
        crashpoints.reach("claim-committed")
        claims: list[_Claim | None] = []
        for sub, template in zip(rows, placed, strict=True):
            if sub is None:
                claims.append(None)
                continue
            claims.append(
                _Claim(
                    sub,
                    await self._still_there(template),
                    sub.attempt_count + 1,
                    claimed_at,
                )
            )
        return claims

    async def _still_there(self, template: Template | None) -> Template | None:
        """`template`, or None if it was deleted since it was read."""
        if template is None or self._templates.peek(template.id) is template:
            return template
        try:
            current = await self._templates.get(template.id)
        except StoreError:
            return template  # the attempt itself will tell
        return None if current is None else template

    async def _deliver_and_record(self, claim: _Claim) -> None:
        template = claim.template
        method = template.method.value if template else UNKNOWN_METHOD
        try:
            due = claim.sub.next_retry_at
            # Claimed ahead of its due time. The loop's timers count whole
            # milliseconds from the start of the loop's turn, so one may fire
            # early: hence the slack, and the check again after each sleep.
            # Limit: shutdown cuts an attempt waiting here like one in flight,
            # and records it interrupted.
            while due is not None and due > self._clock():  # noqa: ASYNC110
                await asyncio.sleep(due - self._clock() + TIMER_SLACK_SECONDS)
            claim = claim._replace(started_at=self._clock())
            self._metrics.in_flight.inc()
            try:
                result: Result | DeliveryError = await self._deliver(claim)
            finally:
                self._metrics.in_flight.dec()
        except asyncio.CancelledError:
            await self._finish(claim, None, method)
            raise
        crashpoints.reach("reply-received")
        await self._finish(claim, result, method)

    async def _deliver(self, claim: _Claim) -> Result | DeliveryError:
        """Run the attempt; every failure comes back as a DeliveryError."""
        sub, template = claim.sub, claim.template
        try:
            return await self._dispatch(claim)
        except DeliveryError as exc:
            return exc
        except TimeoutError:
            limit = template.timeout_seconds if template else 0.0
            return DeliveryError(
                f"no answer within {limit:g} s",
                category=ErrorCategory.TIMEOUT,
                details={"exception": "TimeoutError"},
            )
        except Exception as exc:
            log.exception("dispatcher fault", extra={"submission_id": sub.id})
            return DeliveryError(
                f"internal error: {type(exc).__name__}",
                category=ErrorCategory.SYSTEM,
                details={
                    "exception": type(exc).__name__,
                    "traceback": "".join(traceback.format_exception(exc))[-4096:],
                },
            )

    async def _dispatch(self, claim: _Claim) -> Result:
        sub, template = claim.sub, claim.template
        if template is None:
            raise DeliveryError(
                "the submission's template no longer exists",
                category=ErrorCategory.VALIDATION,
            )
        dispatcher = self._dispatchers.get(template.method)
        if dispatcher is None:
            raise DeliveryError(
                f"no dispatcher for method {template.method}",
                category=ErrorCategory.VALIDATION,
            )
        delivery = self._prepare(sub, template, claim.number, claim.started_at)
        # Dispatchers that talk to a network apply the template's timeout
        # themselves, so that a reply that came in time keeps its verdict; this
        # limit stops any dispatcher that overruns it.
        async with asyncio.timeout(template.timeout_seconds + TIMEOUT_GRACE_SECONDS):
            return await dispatcher.deliver(delivery)

    @staticmethod
    def _prepare(
        sub: Submission, template: Template, attempt: int, started_at: float
    ) -> Delivery:
        missing = missing_required(sub.data, template.required_fields)
        if missing:
            raise DeliveryError(
                f"required fields missing: {', '.join(missing)}",
                category=ErrorCategory.VALIDATION,
                details={"fields": missing},
            )
        return Delivery(
            submission_id=sub.id,
            attempt=attempt,
            template=template,
            payload=map_payload(sub.data, template.field_map),
            started_at=started_at,
        )

    # -- recording ---------------------------------------------------------

    async def _record(self, finish: queries.Finish) -> Status | None:
        """Write an attempt's end; wait out a full disk unless shutting down."""
        sub_id = finish.attempt.submission_id
        while True:
            try:
                return await self._store.write(
                    lambda conn: queries.finish_attempt(conn, finish)
                )
            except StorageUnavailableError:
                if self._stopping:
                    # The row stays `processing`; the next start records the
                    # attempt as interrupted.
                    log.warning("attempt not recorded", extra={"id": sub_id})
                    return None
                log.warning("storage unavailable, record waits", extra={"id": sub_id})
                await asyncio.sleep(STORAGE_RETRY_SECONDS)

    async def _finish(
        self, claim: _Claim, result: Result | DeliveryError | None, method: str
    ) -> None:
        sub, started_at = claim.sub, claim.started_at
        ended_at = self._clock()
        finish = build_finish(sub, claim.number, started_at, ended_at, result)
        status = await self._record(finish)
        if status is None:
            return
        self._count(finish.attempt, status, method, ended_at - started_at)
        if status is Status.RETRYING and finish.next_retry_at is not None:
            self.scheduler.push(
                finish.next_retry_at, sub.seq, sub.id, sub.form_template_id
            )
        _log_attempt(sub, finish.attempt, status)

    def _count(
        self, attempt: Attempt, status: Status, method: str, seconds: float
    ) -> None:
        outcome = attempt.outcome.value
        category = attempt.error_category
        self._metrics.attempt_finished(method, outcome, category, max(0.0, seconds))
        if status in queries.FINAL_STATES:
            self._metrics.submission_finished(method, status.value)


def _queued_template_id(conn: sqlite3.Connection, submission_id: str) -> str | None:
    """The template id of a queued submission; None if it is not queued."""
    row = conn.execute(
        "SELECT form_template_id FROM submissions WHERE id = ?"
        " AND status IN ('pending', 'retrying')",
        (submission_id,),
    ).fetchone()
    return None if row is None else str(row[0])


def build_finish(
    sub: Submission,
    number: int,
    started_at: float,
    ended_at: float,
    result: Result | DeliveryError | None,
) -> queries.Finish:
    """Turn an attempt's result (None: interrupted) into its record and state."""
    duration_ms = max(0, round((ended_at - started_at) * 1000))
    if isinstance(result, Result):
        attempt = Attempt(
            submission_id=sub.id,
            number=number,
            started_at=started_at,
            duration_ms=duration_ms,
            outcome=Outcome.SUCCESS,
            status=result.status,
            reply=result.reply,
        )
        return queries.Finish(
            attempt=attempt,
            user_id=sub.user_id,
            form_template_id=sub.form_template_id,
            status=Status.COMPLETED,
            retry_count=sub.retry_count,
            next_retry_at=None,
            completed_at=ended_at,
            response_data=result.response_data,
        )
    if result is None:
        return interrupted_finish(sub, number, started_at, ended_at)
    attempt = Attempt(
        submission_id=sub.id,
        number=number,
        started_at=started_at,
        duration_ms=duration_ms,
        outcome=Outcome.ERROR,
        status=result.status,
        error_category=result.category,
        error_message=result.message,
        error_details=error_details(result),
        reply=_reply_of(result),
    )
    decision = retry.decide(
        retry_count=sub.retry_count,
        max_retries=sub.max_retries,
        base=sub.retry_backoff_seconds,
        cap=sub.retry_backoff_max_seconds,
        jitter=sub.retry_jitter,
        error=result,
        now=ended_at,
    )
    return queries.Finish(
        attempt=attempt,
        user_id=sub.user_id,
        form_template_id=sub.form_template_id,
        status=decision.status,
        retry_count=decision.retry_count,
        next_retry_at=decision.next_retry_at,
        completed_at=ended_at,
    )


def interrupted_finish(
    sub: Submission, number: int, started_at: float, ended_at: float | None
) -> queries.Finish:
    """An attempt cut by a crash or a shutdown: it counts, and is due at once."""
    now = wall_now() if ended_at is None else ended_at
    error = DeliveryError(
        INTERRUPTED_MESSAGE,
        category=ErrorCategory.SYSTEM,
        details={"exception": "Interrupted"},
    )
    attempt = Attempt(
        submission_id=sub.id,
        number=number,
        started_at=started_at,
        duration_ms=None if ended_at is None else round((now - started_at) * 1000),
        outcome=Outcome.INTERRUPTED,
        error_category=ErrorCategory.SYSTEM,
        error_message=INTERRUPTED_MESSAGE,
        error_details=error_details(error),
    )
    has_budget = sub.retry_count < sub.max_retries
    return queries.Finish(
        attempt=attempt,
        user_id=sub.user_id,
        form_template_id=sub.form_template_id,
        status=Status.RETRYING if has_budget else Status.FAILED,
        retry_count=sub.retry_count + 1 if has_budget else sub.retry_count,
        next_retry_at=now if has_budget else None,
        completed_at=now,
    )


def error_details(error: DeliveryError) -> dict[str, Any]:
    details: dict[str, Any] = {
        "retryable": error.retryable,
        "exception": error.details.get("exception", type(error).__name__),
    }
    if error.status is not None:
        details["status"] = error.status
    details.update({k: v for k, v in error.details.items() if k not in ("retryable",)})
    return details


def _reply_of(error: DeliveryError) -> str | None:
    body = error.details.get("body")
    return body if isinstance(body, str) else None


def _log_attempt(sub: Submission, attempt: Attempt, status: Status) -> None:
    extra = {
        "submission_id": sub.id,
        "template_id": sub.form_template_id,
        "attempt": attempt.number,
        "outcome": attempt.outcome.value,
        "state": status.value,
        "status": attempt.status,
        "category": attempt.error_category,
        "duration_ms": attempt.duration_ms,
    }
    if status is Status.FAILED:
        log.warning("submission failed", extra=extra)
    else:
        log.info("attempt finished", extra=extra)
