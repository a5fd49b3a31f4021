"""The aiohttp application: middlewares for errors, auth and JSON, and the site."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from ptdaemon.api.ratelimit import RateLimits, retry_after
from ptdaemon.errors import (
    ServiceError,
    StorageUnavailableError,
    StoreError,
)
from ptdaemon.logs import quiet_bad_requests
from ptdaemon.metrics import Metrics
from ptdaemon.models import User
from ptdaemon.service import Service

log = logging.getLogger(__name__)
access_log = logging.getLogger("ptdaemon.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/v1/openapi.json"})
SERVICE_KEY: Final = web.AppKey("service", Service)
STATE_KEY: Final = web.AppKey("state", dict)
LIMIT_KEY: Final = web.AppKey("max_body_bytes", int)
LIMITS_KEY: Final = web.AppKey("rate_limits", RateLimits)
METRICS_KEY: Final = web.AppKey("metrics", Metrics)
METRICS_PUBLIC_KEY: Final = web.AppKey("metrics_public", bool)
USER_KEY: Final = web.RequestKey("user", User)
STORAGE_RETRY_AFTER: Final = "5"
# A merge patch (RFC 7396) has a media type of its own; both are JSON.
JSON_TYPES: Final = frozenset({"application/json", "application/merge-patch+json"})

_encoder = msgspec.json.Encoder()


def json_response(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json"
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    response = json_response(
        {"error": {"code": code, "message": message, "details": details}},
        status=status,
    )
    if headers:
        response.headers.update(headers)
    return response


def error_body(exc: ServiceError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}


def current_user(request: web.Request) -> User:
    user: User = request[USER_KEY]
    return user


def service_of(request: web.Request) -> Service:
    return request.app[SERVICE_KEY]


def parse_id(text: str, what: str) -> str:
    """A path id; anything but a UUID is simply not found."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise web.HTTPNotFound(reason=f"no such {what}") from None


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request's JSON body; 415 for another content type, 400 if malformed."""
    limit = request.app[LIMIT_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=request.content_length
        )
    raw = await request.read()
    if not raw and optional:
        return None
    if request.content_type not in JSON_TYPES:
        raise ServiceErrorResponse(
            415, "unsupported_media_type", "the body must be application/json"
        )
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ServiceErrorResponse(
            400, "malformed_json", f"the body is not valid JSON: {exc}"
        ) from exc
    except RecursionError as exc:
        raise ServiceErrorResponse(
            422, "too_deep", "the body is nested too deeply"
        ) from exc


class ServiceErrorResponse(Exception):  # noqa: N818 - an answer, not a failure
    """An error answer decided in the API layer itself."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = json_response(error_body(exc), status=exc.http_status)
        if exc.http_status in (429, 503):
            response.headers["Retry-After"] = STORAGE_RETRY_AFTER
    except ServiceErrorResponse as exc:
        response = error_response(exc.status, exc.code, exc.message)
    except StorageUnavailableError as exc:
        log.warning("storage unavailable", extra={"error": str(exc)})
        response = error_response(
            503,
            "storage_unavailable",
            "storage is unavailable; try again later",
            headers={"Retry-After": STORAGE_RETRY_AFTER},
        )
    except StoreError:
        log.exception("store fault", extra={"path": request.path})
        response = error_response(500, "internal_error", "the store failed")
    except web.HTTPException as exc:
        response = _http_exception(exc)
    except Exception:
        log.exception("request crashed", extra={"path": request.path})
        response = error_response(500, "internal_error", "internal error")
    _log_access(request, response, started)
    request.app[METRICS_KEY].request_served(
        _route_of(request), request.method, response.status
    )
    return response


def _route_of(request: web.Request) -> str:
    """The route's pattern (never the path itself, which holds ids)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _http_exception(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc
    code = HTTP_CODES.get(exc.status, "http_error")
    message = exc.reason or code.replace("_", " ")
    if exc.status == 413:
        message = "the body is larger than the limit"
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return error_response(exc.status, code, message, headers=headers)


def _log_access(
    request: web.Request, response: web.StreamResponse, started: float
) -> None:
    if not access_log.isEnabledFor(logging.DEBUG):
        return
    access_log.debug(
        "request",
        extra={
            "method": request.method,
            "route": _route_of(request),
            "code": response.status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )


def shutting_down() -> web.Response:
    return error_response(
        503,
        "shutting_down",
        "the daemon is shutting down",
        headers={"Retry-After": STORAGE_RETRY_AFTER},
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Health and the API document stay open while draining; readyz itself
    # answers 503 then.
    if request.path in OPEN_PATHS or request.path.startswith("/ui"):
        return await handler(request)
    if request.path == "/metrics" and request.app[METRICS_PUBLIC_KEY]:
        return await handler(request)
    if request.app[STATE_KEY]["stopping"]:
        return shutting_down()
    limits = request.app[LIMITS_KEY]
    address = request.remote or "local"
    if limits.enabled:
        # An address that keeps failing is turned away before any lookup.
        wait = limits.failures.wait(address)
        if wait:
            return rate_limited(wait, "too many failed authentications")
    token = _bearer(request.headers.get("Authorization", ""))
    user = await service_of(request).authenticate(token) if token else None
    if user is None:
        if limits.enabled:
            limits.failures.take(address)
        return error_response(
            401,
            "unauthorized",
            "a valid bearer token is needed",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if limits.enabled:
        wait = limits.per_token.take(user.id)
        if wait:
            return rate_limited(wait, "too many requests for this token")
    request[USER_KEY] = user
    return await handler(request)


def rate_limited(wait: float, message: str) -> web.Response:
    return error_response(
        429,
        "rate_limited",
        f"{message}; try again later",
        details={"retry_after_seconds": int(retry_after(wait))},
        headers={"Retry-After": retry_after(wait)},
    )


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def build_app(
    service: Service,
    *,
    max_body_bytes: int,
    rate_per_second: float = 0.0,
    rate_burst: int = 1,
    metrics: Metrics | None = None,
    metrics_public: bool = False,
) -> web.Application:
    from ptdaemon.api import routes

    quiet_bad_requests()
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[errors_middleware, auth_middleware],
    )
    app[SERVICE_KEY] = service
    app[STATE_KEY] = {"stopping": False}
    app[LIMIT_KEY] = max_body_bytes
    app[LIMITS_KEY] = RateLimits(rate_per_second, rate_burst)
    app[METRICS_KEY] = metrics or service.metrics
    app[METRICS_PUBLIC_KEY] = metrics_public
    routes.add_routes(app)
    return app
