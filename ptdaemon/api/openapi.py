"""The OpenAPI 3.1 document of the control API.

Every request and response body is a msgspec type of `ptdaemon.models`, the
same types the routes decode and encode, and its schema comes from
`msgspec.json.schema_components`; this module only says which route takes
and answers which type, and with which errors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from ptdaemon import __version__
from ptdaemon.models import (
    TARGET_TYPES,
    AttemptList,
    BatchIn,
    BatchOut,
    ErrorOut,
    HealthOut,
    PreviewIn,
    PreviewOut,
    RotateIn,
    SecretOut,
    Stats,
    Status,
    SubmissionIn,
    SubmissionOut,
    SubmissionPage,
    TemplateIn,
    TemplateList,
    TemplateOut,
    TemplatePatch,
    UserIn,
    UserList,
    UserOut,
)

REF: Final = "#/components/schemas/{name}"
JSON: Final = "application/json"

# Who may call a route.
OPEN: Final = "open"
USER: Final = "user"
ADMIN: Final = "admin"

# Errors any signed-in call can meet: no or bad token, a rate limit, the
# daemon shutting down or its storage unavailable.
SIGNED_IN_ERRORS: Final = (401, 429, 503)
# Errors of a route that reads a JSON body.
BODY_ERRORS: Final = (400, 413, 415, 422)

ERROR_TEXT: Final = {
    400: "Malformed JSON or a bad query parameter",
    401: "No token or a bad one",
    403: "Allowed to an admin only",
    404: "No such object for this user (a path id that is not a UUID included)",
    409: "The object's state does not allow this",
    413: "The body is larger than api.max_body_bytes",
    415: "The body is not application/json",
    422: "Well-formed but invalid",
    429: "Too many requests for this token",
    503: "Shutting down, or storage unavailable",
}
RETRY_AFTER: Final = {
    "description": "Seconds to wait before trying again",
    "schema": {"type": "integer"},
}


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Route:
    """One operation: what it takes, what it answers, and how it can fail."""

    method: str
    path: str
    summary: str
    answers: dict[int, type | None]
    access: str = USER
    body: type | None = None
    body_optional: bool = False
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    # Answers that are not a models type: status -> {media type: schema}.
    media: dict[int, dict[str, Any]] = field(default_factory=dict)


ID_ERRORS: Final = (404,)
OPTIONAL_BODY_ERRORS: Final = (400, 413, 415)
LIST_QUERY: Final = (
    Query(
        "status",
        {"type": "string", "enum": [s.value for s in Status]},
        "Only submissions in this state",
    ),
    Query(
        "form_template_id",
        {"type": "string", "format": "uuid"},
        "Only submissions of this template",
    ),
    Query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
        "Largest page size",
    ),
    Query("cursor", {"type": "string"}, "`next_cursor` of the previous page"),
)
SINCE_QUERY: Final = (
    Query(
        "since",
        {"type": "string", "format": "date-time"},
        "RFC 3339 time with an offset; default 24 hours ago",
    ),
)
TEXT: Final = {"type": "string"}

ROUTES: Final[tuple[Route, ...]] = (
    Route("get", "/healthz", "Liveness", {200: HealthOut}, OPEN),
    Route(
        "get",
        "/readyz",
        "Readiness: the database takes writes and the daemon is not draining",
        {200: HealthOut},
        OPEN,
        errors=(503,),
    ),
    Route(
        "get",
        "/v1/openapi.json",
        "This document",
        {200: None},
        OPEN,
        media={200: {JSON: {"type": "object"}}},
    ),
    Route(
        "get",
        "/metrics",
        "Prometheus text format 0.0.4; an admin token unless"
        " [api] metrics_public is set",
        {200: None},
        ADMIN,
        media={200: {"text/plain; version=0.0.4": TEXT}},
    ),
    Route(
        "get",
        "/ui",
        "The dashboard: redirects to /ui/",
        {308: None},
        OPEN,
    ),
    Route(
        "get",
        "/ui/",
        "The dashboard's page; it asks for a token",
        {200: None},
        OPEN,
        media={200: {"text/html": TEXT}},
    ),
    Route(
        "get",
        "/ui/{name}",
        "A file of the dashboard (its script and style sheet)",
        {200: None},
        OPEN,
        errors=(404,),
        media={200: {"text/javascript": TEXT, "text/css": TEXT}},
    ),
    Route(
        "post",
        "/v1/users",
        "Create a user; the answer shows its token this once",
        {201: UserOut},
        ADMIN,
        body=UserIn,
        errors=(409,),
    ),
    Route("get", "/v1/users", "List users", {200: UserList}, ADMIN),
    Route(
        "delete",
        "/v1/users/{id}",
        "Revoke a user at once; its queued submissions are cancelled",
        {204: None},
        ADMIN,
        errors=(*ID_ERRORS, 409),
    ),
    Route(
        "post",
        "/v1/users/{id}/token",
        "A new token for a user; the old one stops working",
        {200: UserOut},
        ADMIN,
        errors=ID_ERRORS,
    ),
    Route(
        "post",
        "/v1/templates",
        "Create a template",
        {201: TemplateOut},
        body=TemplateIn,
        errors=(403, 409),
    ),
    Route("get", "/v1/templates", "List own templates", {200: TemplateList}),
    Route(
        "get",
        "/v1/templates/{id}",
        "One template",
        {200: TemplateOut},
        errors=ID_ERRORS,
    ),
    Route(
        "patch",
        "/v1/templates/{id}",
        "Change a template with a JSON merge patch (RFC 7396)",
        {200: TemplateOut},
        body=TemplatePatch,
        errors=(*ID_ERRORS, 403, 409),
    ),
    Route(
        "delete",
        "/v1/templates/{id}",
        "Delete a template that has no unfinished submissions",
        {204: None},
        errors=(*ID_ERRORS, 409),
    ),
    Route(
        "post",
        "/v1/templates/{id}/preview",
        "Map sample data with the template's rules, without sending it",
        {200: PreviewOut},
        body=PreviewIn,
        errors=ID_ERRORS,
    ),
    Route(
        "post",
        "/v1/templates/{id}/rotate-secret",
        "A new signing secret, shown this once; the old one is also sent"
        " for grace_seconds",
        {200: SecretOut},
        body=RotateIn,
        body_optional=True,
        errors=ID_ERRORS,
    ),
    Route(
        "post",
        "/v1/submissions",
        "Create a submission; 202 once it is on disk, 200 with the original"
        " for a repeated idempotency key and body",
        {202: SubmissionOut, 200: SubmissionOut},
        body=SubmissionIn,
        errors=(409,),
    ),
    Route(
        "post",
        "/v1/submissions/batch",
        "Create up to 1000 submissions; the valid ones commit together."
        " 422 with the same items when none is valid",
        {202: BatchOut},
        body=BatchIn,
        media={
            422: {
                JSON: {
                    "anyOf": [
                        {"$ref": REF.format(name=name)}
                        for name in ("BatchOut", "ErrorOut")
                    ]
                }
            }
        },
    ),
    Route(
        "get",
        "/v1/submissions",
        "List own submissions, newest first",
        {200: SubmissionPage},
        errors=(400,),
        query=LIST_QUERY,
    ),
    Route(
        "get",
        "/v1/submissions/{id}",
        "One submission",
        {200: SubmissionOut},
        errors=ID_ERRORS,
    ),
    Route(
        "get",
        "/v1/submissions/{id}/attempts",
        "Every attempt of a submission, oldest first",
        {200: AttemptList},
        errors=ID_ERRORS,
    ),
    Route(
        "post",
        "/v1/submissions/{id}/retry",
        "Make a failed or retrying submission due now, with a fresh budget",
        {202: SubmissionOut},
        errors=(*ID_ERRORS, *OPTIONAL_BODY_ERRORS, 409),
    ),
    Route(
        "post",
        "/v1/submissions/{id}/cancel",
        "Cancel a pending or retrying submission",
        {200: SubmissionOut},
        errors=(*ID_ERRORS, *OPTIONAL_BODY_ERRORS, 409),
    ),
    Route(
        "get",
        "/v1/stats",
        "Delivery statistics of own templates since a time",
        {200: Stats},
        errors=(400,),
        query=SINCE_QUERY,
    ),
)

BODY_TYPES: Final = [
    TemplateIn,
    TemplatePatch,
    SubmissionIn,
    BatchIn,
    UserIn,
    RotateIn,
    PreviewIn,
    HealthOut,
    UserOut,
    UserList,
    TemplateOut,
    TemplateList,
    PreviewOut,
    SecretOut,
    SubmissionOut,
    SubmissionPage,
    BatchOut,
    AttemptList,
    Stats,
    ErrorOut,
    *TARGET_TYPES.values(),
]


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(BODY_TYPES, ref_template=REF)
    _describe_open_fields(schemas)
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ptdaemon control API",
            "version": __version__,
            "description": "Accepts filled-in forms, stores them durably,"
            " delivers them and retries transient failures.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _ref(model: type) -> dict[str, str]:
    return {"$ref": REF.format(name=model.__name__)}


def _describe_open_fields(schemas: dict[str, Any]) -> None:
    """Spell out fields that the types keep open because they are checked later.

    A template's `target` is checked against the type of its method, and a
    batch's items one by one, so their types hold plain objects.
    """
    targets = {
        "anyOf": [_ref(model) for model in TARGET_TYPES.values()],
        "description": "Depends on `method`: "
        + ", ".join(f"{m.value} takes {t.__name__}" for m, t in TARGET_TYPES.items()),
    }
    for name in ("TemplateIn", "TemplateOut"):
        schemas[name]["properties"]["target"] = targets
    schemas["TemplatePatch"]["properties"]["target"] = {
        "anyOf": [targets, {"type": "null"}]
    }
    schemas["BatchIn"]["properties"]["items"]["items"] = _ref(SubmissionIn)
    schemas["BatchOut"]["properties"]["items"]["items"] = {
        "anyOf": [_ref(SubmissionOut), _ref(ErrorOut)]
    }


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "responses": _responses(route),
    }
    parameters = [
        {
            "name": query.name,
            "in": "query",
            "required": False,
            "description": query.description,
            "schema": query.schema,
        }
        for query in route.query
    ]
    if "{id}" in route.path:
        parameters.append(_path_parameter("id", {"type": "string", "format": "uuid"}))
    if "{name}" in route.path:
        parameters.append(_path_parameter("name", {"type": "string"}))
    if route.path == "/v1/submissions" and route.method == "post":
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Same as the body's idempotency_key; both"
                " given and different is a 400",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        )
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": not route.body_optional,
            "content": {JSON: {"schema": _ref(route.body)}},
        }
    if route.access == OPEN:
        operation["security"] = []

    return operation


def _operation_id(route: Route) -> str:
    words = [
        part.strip("{}").replace("-", "_").replace(".", "_")
        for part in route.path.split("/")
        if part and part != "v1"
    ]
    if route.path.endswith("/"):
        words.append("page")
    return "_".join([route.method, *words])


def _path_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _responses(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code, model in route.answers.items():
        answer: dict[str, Any] = {"description": _success_text(code)}
        if model is not None:
            answer["content"] = {JSON: {"schema": _ref(model)}}
        elif code in route.media:
            answer["content"] = {
                media: {"schema": schema} for media, schema in route.media[code].items()
            }
        if code == 308:
            answer["headers"] = {
                "Location": {"description": "/ui/", "schema": {"type": "string"}}
            }
        responses[str(code)] = answer
    for code in _error_codes(route):
        responses[str(code)] = _error_answer(route, code)

    return responses


def _success_text(code: int) -> str:
    return {
        200: "OK",
        201: "Created",
        202: "Accepted and stored",
        204: "Done",
        308: "Moved",
    }[code]


def _error_codes(route: Route) -> list[int]:
    codes = set(route.errors)
    if route.access != OPEN:
        codes.update(SIGNED_IN_ERRORS)
    if route.access == ADMIN:
        codes.add(403)
    if route.body is not None:
        codes.update(OPTIONAL_BODY_ERRORS if route.body_optional else BODY_ERRORS)
        if route.body_optional:
            codes.add(422)
    codes.update(code for code in route.media if code >= 400)

    return sorted(codes)


def _error_answer(route: Route, code: int) -> dict[str, Any]:
    schema = route.media.get(code, {}).get(JSON, _ref(ErrorOut))
    answer: dict[str, Any] = {
        "description": ERROR_TEXT[code],
        "content": {JSON: {"schema": schema}},
    }
    if code == 401:
        answer["headers"] = {
            "WWW-Authenticate": {
                "description": "Bearer",
                "schema": {"type": "string"},
            }
        }
    if code in (429, 503):
        answer["headers"] = {"Retry-After": RETRY_AFTER}

    return answer
