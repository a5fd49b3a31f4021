"""A blocking JSON POST over one kept-alive connection per thread, for the
synchronous peers (Celery, huey), as their tasks would send a form."""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlsplit

_local = threading.local()


def post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> int:
    parts = urlsplit(url)
    conn: http.client.HTTPConnection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        _local.conn = conn
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        conn.request("POST", parts.path or "/", data, headers)
        reply = conn.getresponse()
        reply.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        _local.conn = None
        raise
    return reply.status
