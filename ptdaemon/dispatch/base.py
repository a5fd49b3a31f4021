"""What every dispatcher receives, returns and raises."""

from __future__ import annotations

from typing import Any, Protocol

from msgspec import Struct, field

from ptdaemon.models import Method, Template

REPLY_READ_BYTES = 64 * 1024
REPLY_KEEP_BYTES = 4 * 1024


class Delivery(Struct, kw_only=True):
    """One attempt to deliver one submission, as a dispatcher sees it."""

    submission_id: str
    attempt: int
    template: Template
    payload: dict[str, Any]
    started_at: float


class Result(Struct, kw_only=True):
    """A successful attempt: what the destination answered."""

    status: int | None = None
    response_data: Any = None
    reply: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Dispatcher(Protocol):
    """A delivery method.

    `deliver` returns a Result when the destination accepted the submission
    and raises DeliveryError otherwise; any other exception counts as a
    `system` fault. It may run more than once for one submission (delivery
    is at-least-once), so destinations get stable ids to deduplicate on.
    """

    method: Method

    def check_target(self, target: Struct) -> None:
        """Raise InvalidError when a saved target can never work."""

    def destination_key(self, template: Template) -> str:
        """Name the destination that per-destination limits count against."""

    async def deliver(self, delivery: Delivery) -> Result: ...

    async def close(self) -> None: ...
