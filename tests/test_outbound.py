"""The outbound address policy against real servers on loopback.

Names go through a fake resolver, so the tests decide what each name
resolves to (and when it changes) without any DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from ptdaemon.dispatch.http import HttpDispatcher
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import ApiTarget, ErrorCategory, Method
from ptdaemon.netpolicy import AddressPolicy
from tests.test_dispatch_http import make_delivery, make_template


class FakeResolver(AbstractResolver):
    """Answers from a table; a list of answers is given out one call at a time."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        answers = self.table[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class Server:
    """A real aiohttp server on one loopback address that counts requests."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self.hits: list[str] = []


async def serve(host: str, port: int = 0, redirect: str | None = None) -> Server:
    server: Server

    async def handle(request: web.Request) -> web.Response:
        server.hits.append(request.path)
        if redirect is not None:
            raise web.HTTPTemporaryRedirect(redirect)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    server = Server(runner, host, sockets[0].getsockname()[1])
    return server


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[Server] = []

    async def start(host: str, port: int = 0, redirect: str | None = None) -> Server:
        server = await serve(host, port, redirect)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.runner.cleanup()


def dispatcher(
    allow: list[str] | None = None, table: dict[str, list[list[str]]] | None = None
) -> tuple[HttpDispatcher, FakeResolver]:
    resolver = FakeResolver(table or {})
    policy = AddressPolicy([ipaddress.ip_network(n) for n in allow or []])
    return (
        HttpDispatcher(
            Method.API, policy=policy, resolver=lambda: resolver, dns_cache_seconds=0
        ),
        resolver,
    )


async def send(client: HttpDispatcher, url: str) -> Any:
    return await client.deliver(make_delivery(make_template(Method.API, {"url": url})))


async def refused(client: HttpDispatcher, url: str) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await send(client, url)
    error = caught.value
    assert error.category is ErrorCategory.VALIDATION
    assert error.retryable is False
    assert "outbound address policy" in str(error)
    return error


@pytest.mark.parametrize(
    ("spelling", "bind"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ],
)
async def test_loopback_literals_are_refused_unless_allowed(servers, spelling, bind):
    try:
        server = await servers(bind)
    except OSError as exc:
        pytest.skip(f"cannot listen on {bind}: {exc}")
    url = f"http://{spelling}:{server.port}/hook"
    client, _ = dispatcher()
    try:
        error = await refused(client, url)
        assert "loopback" in error.details["rule"]
    finally:
        await client.close()
    assert server.hits == []
    allowed, _ = dispatcher(allow=["127.0.0.0/8", "::1/128"])
    try:
        result = await send(allowed, url)
    finally:
        await allowed.close()
    assert result.status == 200
    assert server.hits == ["/hook"]


async def test_a_name_that_resolves_to_loopback_is_refused(servers):
    server = await servers("127.0.0.1")
    client, resolver = dispatcher(table={"hooks.test": [["127.0.0.1"]]})
    try:
        error = await refused(client, f"http://hooks.test:{server.port}/")
    finally:
        await client.close()
    assert resolver.calls == ["hooks.test"]
    assert error.details["rule"] == "loopback (127.0.0.0/8)"
    assert server.hits == []


async def test_localhost_is_refused_when_the_template_is_saved():
    client, _ = dispatcher()
    for url in ("http://localhost:8080/", "http://127.0.0.1/", "http://[::1]/"):
        with pytest.raises(InvalidError) as caught:
            client.check_target(ApiTarget(url=url))
        assert caught.value.code == "address_refused"
    allowed, _ = dispatcher(allow=["127.0.0.0/8"])
    allowed.check_target(ApiTarget(url="http://localhost:8080/"))


async def test_a_redirect_into_loopback_is_refused(servers):
    inner = await servers("127.0.0.1")
    outer = await servers("127.0.0.2", redirect=f"http://127.0.0.1:{inner.port}/secret")
    client, _ = dispatcher(allow=["127.0.0.2/32"])
    try:
        await refused(client, f"http://127.0.0.2:{outer.port}/start")
    finally:
        await client.close()
    assert outer.hits == ["/start"]
    assert inner.hits == []


async def test_a_redirect_to_a_name_is_checked_on_its_address(servers):
    inner = await servers("127.0.0.1")
    outer = await servers("127.0.0.2", redirect=f"http://inner.test:{inner.port}/")
    client, _ = dispatcher(
        allow=["127.0.0.2/32"], table={"inner.test": [["127.0.0.1"]]}
    )
    try:
        await refused(client, f"http://127.0.0.2:{outer.port}/start")
    finally:
        await client.close()
    assert inner.hits == []


async def _twin_servers(servers: Callable[..., Any]) -> tuple[Server, Server]:
    """Servers on 127.0.0.2 and 127.0.0.1 that share one port."""
    for _ in range(20):
        allowed = await servers("127.0.0.2")
        try:
            blocked = await servers("127.0.0.1", allowed.port)
        except OSError:
            continue
        return allowed, blocked
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


async def test_an_answer_that_changes_after_a_first_check_gets_nothing_through(
    servers,
):
    # The first lookup answers an allowed address, the next a refused one:
    # each connect is judged on the address it is about to use.
    allowed, blocked = await _twin_servers(servers)
    client, resolver = dispatcher(
        allow=["127.0.0.2/32"],
        table={"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]},
    )
    url = f"http://rebind.test:{allowed.port}/"
    try:
        first = await send(client, url)
        await client.close()
        await refused(client, url)
    finally:
        await client.close()
    assert first.status == 200
    assert resolver.calls == ["rebind.test", "rebind.test"]
    assert allowed.hits == ["/"]
    assert blocked.hits == []


async def test_a_mixed_answer_connects_only_to_the_allowed_address(servers):
    allowed, blocked = await _twin_servers(servers)
    client, _ = dispatcher(
        allow=["127.0.0.2/32"], table={"mixed.test": [["127.0.0.1", "127.0.0.2"]]}
    )
    try:
        result = await send(client, f"http://mixed.test:{allowed.port}/")
    finally:
        await client.close()
    assert result.status == 200
    assert allowed.hits == ["/"]
    assert blocked.hits == []


async def test_the_socket_factory_refuses_what_slips_past_the_resolver(servers):
    server = await servers("127.0.0.1")
    client, _ = dispatcher(table={"slip.test": [["127.0.0.1"]]})
    # A resolver that lets everything through, as a broken one would.
    client.policy = AddressPolicy([ipaddress.ip_network("0.0.0.0/0")])
    session = client._client()
    client.policy = AddressPolicy()
    try:
        await refused(client, f"http://slip.test:{server.port}/")
    finally:
        await session.close()
    assert server.hits == []
