"""The objects ptdaemon keeps: templates, submissions, attempts, users."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from ptdaemon.timeutil import format_time


class Status(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ErrorCategory(enum.StrEnum):
    NETWORK = "network"
    TIMEOUT = "timeout"
    REMOTE = "remote"
    VALIDATION = "validation"
    SYSTEM = "system"


class Method(enum.StrEnum):
    HTTP_POST = "HTTP_POST"
    API = "API"
    EMAIL = "EMAIL"
    FILE = "FILE"
    CUSTOM = "CUSTOM"


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    INTERRUPTED = "interrupted"


# Targets, one per method. Unknown keys are refused so a typo never passes.
class HttpPostTarget(Struct, forbid_unknown_fields=True):
    url: str
    encoding: Literal["form", "multipart", "json"] = "form"


class BearerAuth(Struct, tag_field="type", tag="bearer", forbid_unknown_fields=True):
    token: str


class BasicAuth(Struct, tag_field="type", tag="basic", forbid_unknown_fields=True):
    username: str
    password: str


class HeaderAuth(Struct, tag_field="type", tag="header", forbid_unknown_fields=True):
    name: str
    value: str


class ApiTarget(Struct, forbid_unknown_fields=True):
    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: BearerAuth | BasicAuth | HeaderAuth | None = None


class EmailTarget(Struct, forbid_unknown_fields=True):
    to: list[str]
    subject: str
    body: str = ""
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: str | None = None
    attach: Literal["json", "csv"] | None = None
    csv_neutralise: bool = True


class FileTarget(Struct, forbid_unknown_fields=True):
    directory: str
    filename: str = "{id}.json"
    format: Literal["json", "ndjson", "csv"] = "json"
    append: bool = False
    csv_neutralise: bool = True


class CustomTarget(Struct, forbid_unknown_fields=True):
    handler: Annotated[str, Meta(min_length=1)]


TARGET_TYPES: dict[Method, type[Struct]] = {
    Method.HTTP_POST: HttpPostTarget,
    Method.API: ApiTarget,
    Method.EMAIL: EmailTarget,
    Method.FILE: FileTarget,
    Method.CUSTOM: CustomTarget,
}

Path = str | list[str]
Name = Annotated[
    str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
]
MaxRetries = Annotated[int, Meta(ge=0, le=100)]
Backoff = Annotated[float, Meta(ge=0.01, le=86400)]
BackoffMax = Annotated[float, Meta(ge=0.01, le=2592000)]
Jitter = Annotated[float, Meta(ge=0, le=1)]
Timeout = Annotated[float, Meta(ge=0.1, le=3600)]


class TemplateIn(Struct, forbid_unknown_fields=True, kw_only=True):
    """A template as a client writes it (create, or the result of a patch)."""

    name: Name
    method: Method
    target: dict[str, Any]
    field_map: dict[str, Path] = field(default_factory=dict)
    required_fields: list[Path] = field(default_factory=list)
    max_retries: MaxRetries = 3
    retry_backoff_seconds: Backoff = 60.0
    retry_backoff_max_seconds: BackoffMax = 86400.0
    retry_jitter: Jitter = 0.0
    timeout_seconds: Timeout | None = None
    signing_secret: str | None = None


class Template(Struct, kw_only=True):
    id: str
    user_id: str
    name: str
    method: Method
    target: dict[str, Any]
    field_map: dict[str, Path]
    required_fields: list[Path]
    max_retries: int
    retry_backoff_seconds: float
    retry_backoff_max_seconds: float
    retry_jitter: float
    timeout_seconds: float
    signing_secret: str | None
    previous_secret: str | None = None
    previous_secret_until: float | None = None
    created_at: float
    updated_at: float


class Submission(Struct, kw_only=True):
    id: str
    seq: int = 0
    user_id: str
    form_template_id: str
    data: dict[str, Any]
    status: Status
    retry_count: int = 0
    attempt_count: int = 0
    max_retries: int
    retry_backoff_seconds: float
    retry_backoff_max_seconds: float
    retry_jitter: float
    next_retry_at: float | None
    processing_started_at: float | None = None
    processing_completed_at: float | None = None
    processing_duration_ms: int | None = None
    response_data: Any = None
    error_message: str | None = None
    error_category: ErrorCategory | None = None
    error_details: dict[str, Any] | None = None
    idempotency_key: str | None = None
    created_at: float
    updated_at: float


class Attempt(Struct, kw_only=True):
    submission_id: str
    number: int
    started_at: float
    duration_ms: int | None
    outcome: Outcome
    status: int | None = None
    error_category: ErrorCategory | None = None
    error_message: str | None = None
    error_details: dict[str, Any] | None = None
    reply: str | None = None


class User(Struct, kw_only=True):
    id: str
    name: str
    admin: bool
    created_at: float


class SubmissionIn(Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of a create call."""

    form_template_id: str
    data: dict[str, Any]
    scheduled_at: str | None = None
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=255)] | None = None


class BatchIn(Struct, forbid_unknown_fields=True):
    items: Annotated[list[Any], Meta(min_length=1, max_length=1000)]


class RotateIn(Struct, forbid_unknown_fields=True):
    """The optional body of a secret rotation."""

    grace_seconds: Annotated[float, Meta(ge=0, le=2592000)] = 86400.0


class UserIn(Struct, forbid_unknown_fields=True):
    name: Name
    admin: bool = False


def submission_view(sub: Submission) -> dict[str, Any]:
    """The contract's JSON shape of a submission."""
    return {
        "id": sub.id,
        "form_template_id": sub.form_template_id,
        "user_id": sub.user_id,
        "data": sub.data,
        "status": sub.status.value,
        "retry_count": sub.retry_count,
        "max_retries": sub.max_retries,
        "retry_backoff_seconds": sub.retry_backoff_seconds,
        "retry_backoff_max_seconds": sub.retry_backoff_max_seconds,
        "retry_jitter": sub.retry_jitter,
        "next_retry_at": format_time(sub.next_retry_at),
        "processing_started_at": format_time(sub.processing_started_at),
        "processing_completed_at": format_time(sub.processing_completed_at),
        "processing_duration_ms": sub.processing_duration_ms,
        "response_data": sub.response_data,
        "error_message": sub.error_message,
        "error_category": sub.error_category,
        "error_details": sub.error_details,
        "idempotency_key": sub.idempotency_key,
        "created_at": format_time(sub.created_at),
        "updated_at": format_time(sub.updated_at),
    }


def attempt_view(attempt: Attempt) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "started_at": format_time(attempt.started_at),
        "duration_ms": attempt.duration_ms,
        "outcome": attempt.outcome.value,
        "status": attempt.status,
        "error_category": attempt.error_category,
        "error_message": attempt.error_message,
        "error_details": attempt.error_details,
    }


def user_view(user: User, token: str | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": user.id,
        "name": user.name,
        "admin": user.admin,
        "created_at": format_time(user.created_at),
    }
    if token is not None:
        view["token"] = token
    return view


# -- statistics (GET /v1/stats) ---------------------------------------------


class StatusCounts(Struct, kw_only=True):
    """How many submissions are in each state now."""

    pending: int = 0
    processing: int = 0
    retrying: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


class Percentiles(Struct, kw_only=True):
    """Nearest-rank percentiles; null when no attempt had a duration."""

    p50: int | None = None
    p95: int | None = None
    p99: int | None = None


class HourFigures(Struct, kw_only=True):
    """Attempts started in one hour: those that succeeded and those that did not."""

    start: str
    succeeded: int = 0
    failed: int = 0


class TemplateStats(Struct, kw_only=True):
    id: str
    name: str
    counts: StatusCounts
    success_rate: float | None
    duration_ms: Percentiles
    error_categories: dict[str, int]
    # The last 24 whole hours up to now, oldest first, whatever `since` is.
    hourly: list[HourFigures]


class QueueStats(Struct, kw_only=True):
    depth: int
    oldest_due_age_seconds: float | None


class Stats(Struct, kw_only=True):
    since: str
    queue: QueueStats
    templates: list[TemplateStats]
