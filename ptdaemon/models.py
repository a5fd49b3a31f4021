"""The objects ptdaemon keeps: templates, submissions, attempts, users."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

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
FieldMap = dict[str, Path]
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


# -- answers of the control API ----------------------------------------------
# The routes build their bodies from these types, and the OpenAPI document is
# generated from the same types, so the two cannot drift apart.


class SubmissionOut(Struct, kw_only=True):
    """A submission as the API shows it."""

    id: str
    form_template_id: str
    user_id: str
    data: dict[str, Any]
    status: Status
    retry_count: int
    max_retries: int
    retry_backoff_seconds: float
    retry_backoff_max_seconds: float
    retry_jitter: float
    next_retry_at: str | None
    processing_started_at: str | None
    processing_completed_at: str | None
    processing_duration_ms: int | None
    response_data: Any
    error_message: str | None
    error_category: ErrorCategory | None
    error_details: dict[str, Any] | None
    idempotency_key: str | None
    created_at: str
    updated_at: str


class AttemptOut(Struct, kw_only=True):
    """One delivery attempt of a submission."""

    number: int
    started_at: str
    duration_ms: int | None
    outcome: Outcome
    status: int | None
    error_category: ErrorCategory | None
    error_message: str | None
    error_details: dict[str, Any] | None


class UserOut(Struct, kw_only=True):
    """A user; `token` only in the answers that create or rotate it."""

    id: str
    name: str
    admin: bool
    created_at: str
    token: str | UnsetType = UNSET


class TemplateOut(Struct, kw_only=True):
    """A template as the API shows it, with every secret shown as `***`.

    `signing_secret` is null when there is none, `***` when one is stored,
    and the secret itself only in the answer that generated it.
    """

    id: str
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
    created_at: str
    updated_at: str


class TemplatePatch(Struct, forbid_unknown_fields=True, kw_only=True):
    """A JSON merge patch of a template (RFC 7396): fields left out are kept.

    A field sent as null is removed, so that it takes its default again.
    """

    name: Name | UnsetType = UNSET
    method: Method | UnsetType = UNSET
    target: dict[str, Any] | UnsetType = UNSET
    field_map: dict[str, Path | None] | UnsetType | None = UNSET
    required_fields: list[Path] | UnsetType | None = UNSET
    max_retries: MaxRetries | UnsetType | None = UNSET
    retry_backoff_seconds: Backoff | UnsetType | None = UNSET
    retry_backoff_max_seconds: BackoffMax | UnsetType | None = UNSET
    retry_jitter: Jitter | UnsetType | None = UNSET
    timeout_seconds: Timeout | UnsetType | None = UNSET
    signing_secret: str | UnsetType | None = UNSET


class PreviewIn(Struct, forbid_unknown_fields=True):
    """Sample data to map with a template's rules, without sending it.

    `field_map`, when given, is tried in place of the template's own map
    (an editor's unsaved change); nothing is saved.
    """

    data: dict[str, Any]
    field_map: FieldMap | None = None


class PreviewOut(Struct):
    payload: dict[str, Any]


class SecretOut(Struct):
    """A new signing secret, shown this once."""

    signing_secret: str


class HealthOut(Struct):
    status: Literal["ok", "ready"]


class ErrorDetail(Struct, kw_only=True):
    code: str
    message: str
    details: Any = None


class ErrorOut(Struct):
    """Every error answer, and each refused item of a batch."""

    error: ErrorDetail


class TemplateList(Struct):
    items: list[TemplateOut]


class UserList(Struct):
    items: list[UserOut]


class AttemptList(Struct):
    items: list[AttemptOut]


class SubmissionPage(Struct):
    """A page of submissions, newest first; pass `next_cursor` for the next."""

    items: list[SubmissionOut]
    next_cursor: str | None


class BatchOut(Struct):
    """One entry per item of the request, in order: a submission or an error."""

    # Each entry is a SubmissionOut or an ErrorOut; the OpenAPI document says so.
    items: list[Any]


def submission_out(sub: Submission) -> SubmissionOut:
    return SubmissionOut(
        id=sub.id,
        form_template_id=sub.form_template_id,
        user_id=sub.user_id,
        data=sub.data,
        status=sub.status,
        retry_count=sub.retry_count,
        max_retries=sub.max_retries,
        retry_backoff_seconds=sub.retry_backoff_seconds,
        retry_backoff_max_seconds=sub.retry_backoff_max_seconds,
        retry_jitter=sub.retry_jitter,
        next_retry_at=format_time(sub.next_retry_at),
        processing_started_at=format_time(sub.processing_started_at),
        processing_completed_at=format_time(sub.processing_completed_at),
        processing_duration_ms=sub.processing_duration_ms,
        response_data=sub.response_data,
        error_message=sub.error_message,
        error_category=sub.error_category,
        error_details=sub.error_details,
        idempotency_key=sub.idempotency_key,
        created_at=format_time(sub.created_at) or "",
        updated_at=format_time(sub.updated_at) or "",
    )


def submission_view(sub: Submission) -> dict[str, Any]:
    """The contract's JSON shape of a submission, as plain Python values."""
    view: dict[str, Any] = msgspec.to_builtins(submission_out(sub))
    return view


def attempt_out(attempt: Attempt) -> AttemptOut:
    return AttemptOut(
        number=attempt.number,
        started_at=format_time(attempt.started_at) or "",
        duration_ms=attempt.duration_ms,
        outcome=attempt.outcome,
        status=attempt.status,
        error_category=attempt.error_category,
        error_message=attempt.error_message,
        error_details=attempt.error_details,
    )


def user_out(user: User, token: str | None = None) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        admin=user.admin,
        created_at=format_time(user.created_at) or "",
        token=UNSET if token is None else token,
    )


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
