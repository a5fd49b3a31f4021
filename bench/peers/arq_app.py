"""arq, the nearest asyncio peer, its job doing the same POST with aiohttp."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import aiohttp
from arq.connections import RedisSettings

TARGET = os.environ.get("BENCH_TARGET_URL", "http://127.0.0.1:9/")
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))


async def startup(ctx: dict[str, Any]) -> None:
    ctx["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["session"].close()


async def post(ctx: dict[str, Any], body: dict[str, Any]) -> int:
    async with ctx["session"].post(TARGET, json=body) as reply:
        await reply.read()
        return reply.status


class WorkerSettings:
    functions: ClassVar[list[Any]] = [post]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings(host="127.0.0.1", port=REDIS_PORT)
