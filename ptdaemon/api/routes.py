"""The control API's routes: thin handlers over the service layer."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from aiohttp import web

from ptdaemon import queries
from ptdaemon.api import ui
from ptdaemon.api.app import (
    METRICS_KEY,
    METRICS_PUBLIC_KEY,
    STATE_KEY,
    ServiceErrorResponse,
    current_user,
    json_response,
    parse_id,
    read_json,
    service_of,
    shutting_down,
)
from ptdaemon.api.openapi import openapi_document
from ptdaemon.errors import ForbiddenError, ServiceError
from ptdaemon.metrics import CONTENT_TYPE
from ptdaemon.models import (
    AttemptList,
    BatchIn,
    BatchOut,
    ErrorDetail,
    ErrorOut,
    HealthOut,
    PreviewOut,
    RotateIn,
    SecretOut,
    Status,
    SubmissionPage,
    Template,
    TemplateList,
    TemplateOut,
    UserList,
    attempt_out,
    submission_out,
    user_out,
)
from ptdaemon.redact import MASK, mask_target
from ptdaemon.service import LATEST_TIME
from ptdaemon.templates import convert
from ptdaemon.timeutil import format_time, parse_time
from ptdaemon.timeutil import now as wall_now

MAX_LIMIT: Final = 500
DEFAULT_LIMIT: Final = 100
DEFAULT_STATS_SECONDS: Final = 86400.0


def template_view(template: Template, shown_secret: str | None = None) -> TemplateOut:
    secret = shown_secret or (MASK if template.signing_secret else None)
    return TemplateOut(
        id=template.id,
        name=template.name,
        method=template.method,
        target=mask_target(template.target),
        field_map=template.field_map,
        required_fields=template.required_fields,
        max_retries=template.max_retries,
        retry_backoff_seconds=template.retry_backoff_seconds,
        retry_backoff_max_seconds=template.retry_backoff_max_seconds,
        retry_jitter=template.retry_jitter,
        timeout_seconds=template.timeout_seconds,
        signing_secret=secret,
        created_at=format_time(template.created_at) or "",
        updated_at=format_time(template.updated_at) or "",
    )


# -- health ------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response(HealthOut("ok"))


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE_KEY]["stopping"]:
        return shutting_down()
    store = service_of(request).store
    await store.write(lambda conn: queries.write_probe(conn, wall_now()))
    return json_response(HealthOut("ready"))


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; an admin's token unless the config makes it public."""
    if not request.app[METRICS_PUBLIC_KEY] and not current_user(request).admin:
        raise ForbiddenError("only an admin can read the metrics")
    registry = request.app[METRICS_KEY]
    now = wall_now()
    depths, oldest = await service_of(request).store.read(
        lambda conn: queries.queue_depths(conn, now)
    )
    registry.set_queue(depths, oldest)
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


# -- users -------------------------------------------------------------------


async def create_user(request: web.Request) -> web.Response:
    body = await read_json(request)
    user, token = await service_of(request).create_user(current_user(request), body)
    return json_response(user_out(user, token), status=201)


async def list_users(request: web.Request) -> web.Response:
    users = await service_of(request).list_users(current_user(request))
    return json_response(UserList([user_out(u) for u in users]))


async def delete_user(request: web.Request) -> web.Response:
    user_id = parse_id(request.match_info["id"], "user")
    await service_of(request).delete_user(current_user(request), user_id)
    return web.Response(status=204)


async def rotate_token(request: web.Request) -> web.Response:
    user_id = parse_id(request.match_info["id"], "user")
    user, token = await service_of(request).rotate_token(current_user(request), user_id)
    return json_response(user_out(user, token))


# -- templates ---------------------------------------------------------------


async def create_template(request: web.Request) -> web.Response:
    body = await read_json(request)
    template, shown = await service_of(request).create_template(
        current_user(request), body
    )
    return json_response(template_view(template, shown), status=201)


async def list_templates(request: web.Request) -> web.Response:
    templates = await service_of(request).list_templates(current_user(request))
    return json_response(TemplateList([template_view(t) for t in templates]))


async def get_template(request: web.Request) -> web.Response:
    template_id = parse_id(request.match_info["id"], "template")
    template = await service_of(request).get_template(
        current_user(request), template_id
    )
    return json_response(template_view(template))


async def patch_template(request: web.Request) -> web.Response:
    template_id = parse_id(request.match_info["id"], "template")
    patch = await read_json(request)
    template, shown = await service_of(request).update_template(
        current_user(request), template_id, patch
    )
    return json_response(template_view(template, shown))


async def delete_template(request: web.Request) -> web.Response:
    template_id = parse_id(request.match_info["id"], "template")
    await service_of(request).delete_template(current_user(request), template_id)
    return web.Response(status=204)


async def preview_template(request: web.Request) -> web.Response:
    template_id = parse_id(request.match_info["id"], "template")
    body = await read_json(request)
    payload = await service_of(request).preview(
        current_user(request), template_id, body
    )
    return json_response(PreviewOut(payload))


async def rotate_secret(request: web.Request) -> web.Response:
    template_id = parse_id(request.match_info["id"], "template")
    body = await read_json(request, optional=True)
    rotation: RotateIn = convert(body or {}, RotateIn, "rotation")
    secret = await service_of(request).rotate_secret(
        current_user(request), template_id, rotation.grace_seconds
    )
    return json_response(SecretOut(secret))


# -- submissions -------------------------------------------------------------


async def create_submission(request: web.Request) -> web.Response:
    body = await read_json(request)
    header_key = request.headers.get("Idempotency-Key")
    sub, created = await service_of(request).create_submission(
        current_user(request), body, header_key=header_key
    )
    return json_response(submission_out(sub), status=202 if created else 200)


async def create_batch(request: web.Request) -> web.Response:
    body = await read_json(request)
    batch: BatchIn = convert(body, BatchIn, "batch")
    results = await service_of(request).create_batch(current_user(request), batch.items)
    items: list[Any] = []
    for result in results:
        if isinstance(result, ServiceError):
            items.append(ErrorOut(ErrorDetail(**_error_fields(result))))
        else:
            items.append(submission_out(result[0]))
    any_valid = any(not isinstance(r, ServiceError) for r in results)
    return json_response(BatchOut(items), status=202 if any_valid else 422)


def _error_fields(exc: ServiceError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "details": exc.details}


async def list_submissions(request: web.Request) -> web.Response:
    query = request.query
    status = _status_filter(query.get("status"))
    template_id = query.get("form_template_id")
    limit = _limit(query.get("limit"))
    before = _decode_cursor(query.get("cursor"))
    subs, more = await service_of(request).list_submissions(
        current_user(request),
        status=status,
        template_id=template_id,
        before_seq=before,
        limit=limit,
    )
    next_cursor = _encode_cursor(subs[-1].seq) if more else None
    return json_response(SubmissionPage([submission_out(s) for s in subs], next_cursor))


def _status_filter(text: str | None) -> Status | None:
    if text is None:
        return None
    try:
        return Status(text)
    except ValueError:
        raise ServiceErrorResponse(
            400, "bad_query", f"status must be one of {', '.join(Status)}"
        ) from None


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise ServiceErrorResponse(
            400, "bad_query", f"limit must be an integer in 1..{MAX_LIMIT}"
        )
    return int(text)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def _decode_cursor(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raw = ""
    if not raw.startswith("s") or not raw[1:].isdigit() or len(raw) > 20:
        raise ServiceErrorResponse(400, "bad_cursor", "cursor is not valid")
    return int(raw[1:])


async def get_submission(request: web.Request) -> web.Response:
    sub_id = parse_id(request.match_info["id"], "submission")
    sub = await service_of(request).get_submission(current_user(request), sub_id)
    return json_response(submission_out(sub))


async def list_attempts(request: web.Request) -> web.Response:
    sub_id = parse_id(request.match_info["id"], "submission")
    attempts = await service_of(request).list_attempts(current_user(request), sub_id)
    return json_response(AttemptList([attempt_out(a) for a in attempts]))


async def retry_submission(request: web.Request) -> web.Response:
    sub_id = parse_id(request.match_info["id"], "submission")
    await read_json(request, optional=True)
    sub = await service_of(request).retry(current_user(request), sub_id)
    return json_response(submission_out(sub), status=202)


async def cancel_submission(request: web.Request) -> web.Response:
    sub_id = parse_id(request.match_info["id"], "submission")
    await read_json(request, optional=True)
    sub = await service_of(request).cancel(current_user(request), sub_id)
    return json_response(submission_out(sub))


# -- statistics --------------------------------------------------------------


async def get_stats(request: web.Request) -> web.Response:
    since = _since(request.query.get("since"))
    stats = await service_of(request).stats(current_user(request), since)
    return json_response(stats)


def _since(text: str | None) -> float:
    if text is None:
        return wall_now() - DEFAULT_STATS_SECONDS
    try:
        since = parse_time(text)
    except ValueError:
        raise ServiceErrorResponse(
            400, "bad_query", "since must be an RFC 3339 time with a UTC offset"
        ) from None
    if not 0 <= since <= LATEST_TIME:
        raise ServiceErrorResponse(
            400, "bad_query", "since must lie between 1970 and 9999"
        )
    return since


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/users", create_user)
    app.router.add_get("/v1/users", list_users)
    app.router.add_delete("/v1/users/{id}", delete_user)
    app.router.add_post("/v1/users/{id}/token", rotate_token)
    app.router.add_post("/v1/templates", create_template)
    app.router.add_get("/v1/templates", list_templates)
    app.router.add_get("/v1/templates/{id}", get_template)
    app.router.add_patch("/v1/templates/{id}", patch_template)
    app.router.add_delete("/v1/templates/{id}", delete_template)
    app.router.add_post("/v1/templates/{id}/preview", preview_template)
    app.router.add_post("/v1/templates/{id}/rotate-secret", rotate_secret)
    app.router.add_post("/v1/submissions", create_submission)
    app.router.add_post("/v1/submissions/batch", create_batch)
    app.router.add_get("/v1/submissions", list_submissions)
    app.router.add_get("/v1/submissions/{id}", get_submission)
    app.router.add_get("/v1/submissions/{id}/attempts", list_attempts)
    app.router.add_post("/v1/submissions/{id}/retry", retry_submission)
    app.router.add_post("/v1/submissions/{id}/cancel", cancel_submission)
    app.router.add_get("/v1/stats", get_stats)
    ui.add_routes(app)
