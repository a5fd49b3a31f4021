"""Private, shared, link-local and ULA destinations, in a namespace of their own.

The probe runs under `unshare -rn`: a fresh network namespace with nothing
but a loopback interface, on which the test puts the refused addresses
with a real server behind each. A guard that failed would deliver there
and nowhere else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns_probe import ALLOW, CASES, CONTROL

ROOT = Path(__file__).resolve().parent.parent


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    done = subprocess.run(
        ["unshare", "-rn", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if not _namespaces_work():
        pytest.skip("unshare -rn with ip is not available here")
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "tests.netns_probe"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(("host", "reaches", "literal"), CASES)
def test_refused_when_saved_and_when_sent(report, host, reaches, literal):
    assert report["saved"][host] == ("address_refused" if literal else "accepted")
    sent = report["sent"][host]
    assert sent.startswith("validation: destination refused by the outbound")
    assert "refused:" in sent


def test_nothing_reached_a_server_while_guarded(report):
    assert report["hits_while_guarded"] == []


def test_the_servers_were_there_to_reach(report):
    # The same addresses, allow-listed, deliver: the guard is what stopped
    # the requests above, not a missing route.
    assert ALLOW
    assert report["control"] == dict.fromkeys(CONTROL, 200)
    assert report["hits_in_all"] == len(CONTROL)
