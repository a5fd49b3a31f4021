"""Templates and deliveries as dispatchers receive them, for unit tests."""

from __future__ import annotations

from typing import Any

from ptdaemon.models import Method, Template


def make_template(method: Method, target: dict[str, Any], **fields: Any) -> Template:
    """A stored template with plain defaults; `fields` override any of them."""
    values: dict[str, Any] = {
        "id": "tpl-1",
        "user_id": "user-1",
        "name": "city-permit",
        "method": method,
        "target": target,
        "field_map": {},
        "required_fields": [],
        "max_retries": 3,
        "retry_backoff_seconds": 60.0,
        "retry_backoff_max_seconds": 86400.0,
        "retry_jitter": 0.0,
        "timeout_seconds": 30.0,
        "signing_secret": None,
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    values.update(fields)
    return Template(**values)
