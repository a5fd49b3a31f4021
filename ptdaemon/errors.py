"""Exceptions of ptdaemon, and the two signals that plugins raise."""

from __future__ import annotations

from typing import Any

from ptdaemon.models import ErrorCategory


class PtdaemonError(Exception):
    """Base of every error ptdaemon raises on purpose."""


class ConfigError(PtdaemonError):
    """The configuration is unreadable or invalid; the message names the key."""


class StoreError(PtdaemonError):
    """The database cannot be opened, migrated or written."""


class StorageUnavailableError(StoreError):
    """A write failed for lack of space or a busy database; try again later."""


class StorageFailedError(StorageUnavailableError):
    """The disk failed a write or a sync: nothing more is written, the daemon stops.

    After a failed fsync the kernel may have dropped the pages it could not
    write, so a retry could report success for data that is not on disk.
    """


class LockedError(StoreError):
    """Another daemon holds the state directory."""


class ListenError(PtdaemonError):
    """The API cannot listen on its configured address."""


class DeliveryError(PtdaemonError):
    """An attempt failed; `category` and `retryable` decide what follows."""

    def __init__(
        self,
        message: str,
        *,
        category: ErrorCategory,
        retryable: bool | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
        if retryable is None:
            retryable = category is not ErrorCategory.VALIDATION
        self.retryable = retryable
        self.status = status
        self.details = dict(details or {})
        self.retry_after_seconds = retry_after_seconds


class ServiceError(PtdaemonError):
    """A request the service layer refuses; the API maps it to its JSON body."""

    http_status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, code: str | None = None, details: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class BadRequestError(ServiceError):
    http_status = 400
    code = "bad_request"


class UnauthorizedError(ServiceError):
    http_status = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    http_status = 403
    code = "forbidden"


class NotFoundError(ServiceError):
    http_status = 404
    code = "not_found"


class ConflictError(ServiceError):
    http_status = 409
    code = "conflict"


class InvalidError(ServiceError):
    http_status = 422
    code = "invalid"


class TooManyError(ServiceError):
    """A limit that frees up with time: try again later."""

    http_status = 429


class UnavailableError(ServiceError):
    http_status = 503
    code = "unavailable"


# Signals a plugin raises. They are not failures of ptdaemon, so they stay
# outside PtdaemonError.
class RetryLater(Exception):  # noqa: N818 - the contract names it
    """Raised by a plugin: the destination is busy, try again later."""

    def __init__(self, delay_seconds: float | None = None) -> None:
        super().__init__("plugin asked to retry later")
        self.delay_seconds = delay_seconds


class PermanentFailure(Exception):  # noqa: N818 - the contract names it
    """Raised by a plugin: this submission can never be delivered."""
