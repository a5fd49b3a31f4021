"""The OpenAPI 3.1 document of the control API, built from the request types."""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec

from ptdaemon import __version__
from ptdaemon.models import BatchIn, SubmissionIn, TemplateIn, UserIn

REF: Final = "#/components/schemas/{name}"

ERROR_SCHEMA: Final = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}

OBJECT: Final = {"type": "object"}
ITEMS: Final = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": OBJECT}},
}

# (method, path, summary, request schema name or None, success code, body)
ROUTES: Final[list[tuple[str, str, str, str | None, int, dict[str, Any] | None]]] = [
    ("get", "/healthz", "Liveness", None, 200, OBJECT),
    ("get", "/readyz", "Readiness: database writable", None, 200, OBJECT),
    ("get", "/v1/openapi.json", "This document", None, 200, OBJECT),
    ("get", "/metrics", "Prometheus metrics (admin)", None, 200, None),
    ("post", "/v1/users", "Create a user (admin)", "UserIn", 201, OBJECT),
    ("get", "/v1/users", "List users (admin)", None, 200, ITEMS),
    ("delete", "/v1/users/{id}", "Revoke a user (admin)", None, 204, None),
    ("post", "/v1/users/{id}/token", "New token for a user (admin)", None, 200, OBJECT),
    ("post", "/v1/templates", "Create a template", "TemplateIn", 201, OBJECT),
    ("get", "/v1/templates", "List own templates", None, 200, ITEMS),
    ("get", "/v1/templates/{id}", "One template", None, 200, OBJECT),
    (
        "patch",
        "/v1/templates/{id}",
        "Change a template (merge patch)",
        None,
        200,
        OBJECT,
    ),
    ("delete", "/v1/templates/{id}", "Delete a template", None, 204, None),
    ("post", "/v1/templates/{id}/preview", "Map sample data", None, 200, OBJECT),
    (
        "post",
        "/v1/templates/{id}/rotate-secret",
        "New signing secret",
        None,
        200,
        OBJECT,
    ),
    ("post", "/v1/submissions", "Create a submission", "SubmissionIn", 202, OBJECT),
    ("post", "/v1/submissions/batch", "Create up to 1000", "BatchIn", 202, ITEMS),
    ("get", "/v1/submissions", "List own submissions", None, 200, ITEMS),
    ("get", "/v1/submissions/{id}", "One submission", None, 200, OBJECT),
    ("get", "/v1/submissions/{id}/attempts", "Its attempts", None, 200, ITEMS),
    ("post", "/v1/submissions/{id}/retry", "Retry now", None, 202, OBJECT),
    ("post", "/v1/submissions/{id}/cancel", "Cancel", None, 200, OBJECT),
    ("get", "/v1/stats", "Delivery statistics of own templates", None, 200, OBJECT),
]

ERROR_CODES: Final = ("400", "401", "403", "404", "409", "413", "415", "422", "503")
OPEN: Final = frozenset({"/healthz", "/readyz", "/v1/openapi.json"})


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [TemplateIn, SubmissionIn, BatchIn, UserIn], ref_template=REF
    )
    components["Error"] = ERROR_SCHEMA
    paths: dict[str, Any] = {}
    for method, path, summary, request, code, body in ROUTES:
        paths.setdefault(path, {})[method] = _operation(
            path, summary, request, code, body
        )
    return {
        "openapi": "3.1.0",
        "info": {"title": "ptdaemon control API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _operation(
    path: str,
    summary: str,
    request: str | None,
    code: int,
    body: dict[str, Any] | None,
) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "success"}
    if body is not None:
        success["content"] = {"application/json": {"schema": body}}
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": REF.format(name="Error")}}},
    }
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {str(code): success, **dict.fromkeys(ERROR_CODES, error)},
    }
    if "{id}" in path:
        operation["parameters"] = [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
        ]
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": REF.format(name=request)}}
            },
        }
    if path in OPEN:
        operation["security"] = []
    return operation
