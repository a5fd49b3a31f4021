"""Run inside a network namespace of its own: private ranges on a bare lo.

`unshare -rn` gives this process an empty network namespace with only a
loopback interface, so whatever the guard lets through can reach no other
host. The addresses that cloud metadata, private networks and ULAs use are
put on that loopback with a real server behind each, so a broken guard
would show up as a delivery. Prints one JSON object for the test to read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from typing import Any

from aiohttp import web

from ptdaemon.dispatch.http import HttpDispatcher
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import ApiTarget, Method
from ptdaemon.netpolicy import AddressPolicy
from tests.test_dispatch_http import make_delivery, make_template
from tests.test_outbound import FakeResolver

PORT = 8080
ADDRESSES = [
    "10.0.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "fd00::1",
]
# (URL host, what it reaches, whether the save-time check must refuse it)
CASES = [
    ("10.0.0.1", "10.0.0.1", True),
    ("167772161", "10.0.0.1", True),
    ("0xa000001", "10.0.0.1", True),
    ("0x0a.0.0.1", "10.0.0.1", True),
    ("012.0.0.1", "10.0.0.1", True),
    ("10.1", "10.0.0.1", True),
    ("169.254.169.254", "169.254.169.254", True),
    ("2852039166", "169.254.169.254", True),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", True),
    ("100.64.0.1", "100.64.0.1", True),
    ("172.16.0.1", "172.16.0.1", True),
    ("192.168.1.1", "192.168.1.1", True),
    ("[fd00::1]", "fd00::1", True),
    ("[::ffff:10.0.0.1]", "10.0.0.1", True),
    ("[::ffff:a9fe:a9fe]", "169.254.169.254", True),
    ("metadata.test", "169.254.169.254", False),
    ("ula.test", "fd00::1", False),
]
TABLE = {"metadata.test": [["169.254.169.254"]], "ula.test": [["fd00::1"]]}
CONTROL = [
    "10.0.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "[fd00::1]",
    "metadata.test",
]
ALLOW = [
    "10.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fd00::/8",
]


def setup_interfaces() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in ADDRESSES:
        prefix = "128" if ":" in address else "32"
        command = ["ip", "addr", "add", f"{address}/{prefix}", "dev", "lo"]
        if ":" in address:
            command = [
                "ip",
                "-6",
                "addr",
                "add",
                f"{address}/{prefix}",
                "dev",
                "lo",
                "nodad",
            ]
        subprocess.run(command, check=True)


async def main() -> dict[str, Any]:
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.host)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    for address in ADDRESSES:
        await web.TCPSite(runner, address, PORT).start()

    def client(allow: list[str]) -> HttpDispatcher:
        resolver = FakeResolver({k: list(v) for k, v in TABLE.items()})
        policy = AddressPolicy([ipaddress.ip_network(n) for n in allow])
        return HttpDispatcher(Method.API, policy=policy, resolver=lambda: resolver)

    report: dict[str, Any] = {"saved": {}, "sent": {}, "control": {}}
    guarded = client([])
    for host, _, _ in CASES:
        url = f"http://{host}:{PORT}/latest/meta-data/"
        try:
            guarded.check_target(ApiTarget(url=url))
            report["saved"][host] = "accepted"
        except InvalidError as exc:
            report["saved"][host] = exc.code
        delivery = make_delivery(make_template(Method.API, {"url": url}))
        try:
            await asyncio.wait_for(guarded.deliver(delivery), 10)
            report["sent"][host] = "delivered"
        except DeliveryError as exc:
            report["sent"][host] = f"{exc.category.value}: {exc}"
    await guarded.close()
    report["hits_while_guarded"] = list(hits)

    allowed = client(ALLOW)
    for host in CONTROL:
        url = f"http://{host}:{PORT}/"
        delivery = make_delivery(make_template(Method.API, {"url": url}))
        try:
            result = await asyncio.wait_for(allowed.deliver(delivery), 10)
            report["control"][host] = result.status
        except DeliveryError as exc:
            report["control"][host] = f"{exc.category.value}: {exc}"
    await allowed.close()
    report["hits_in_all"] = len(hits)
    await runner.cleanup()
    return report


if __name__ == "__main__":
    setup_interfaces()
    json.dump(asyncio.run(main()), sys.stdout)
