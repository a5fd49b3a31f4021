"""The dashboard: static files shipped in the package, served under /ui/."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

from aiohttp import web

# Only these files are served; anything else under /ui/ is a 404.
FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads nothing from another host and talks only to this daemon.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self';"
        " connect-src 'self'; img-src 'self' data:; base-uri 'none';"
        " form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("ptdaemon.ui").joinpath(name).read_bytes()


def _file(name: str) -> web.Response:
    if name not in FILES:
        raise web.HTTPNotFound(reason="no such file")
    headers = {"Content-Type": FILES[name], **SECURITY_HEADERS}
    return web.Response(body=_read(name), headers=headers)


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": "/ui/"})


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", asset)
