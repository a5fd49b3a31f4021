"""`ptdaemon users`: add, list, revoke and rotate-token against a real daemon."""

from __future__ import annotations

import http.client
import json
import sqlite3
import stat
from collections.abc import Iterator

import pytest

from ptdaemon.service import TOKEN_PREFIX
from tests.test_cli import Served, cli_env, client, one_line, serving


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("users")) as daemon:
        yield daemon


def status_with(served: Served, token: str, path: str = "/v1/templates") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def add(served: Served, name: str, *extra: str) -> dict[str, object]:
    result = client(served, "users", "add", name, "--json", *extra)
    assert result.returncode == 0, result.stderr
    user: dict[str, object] = json.loads(result.stdout)
    return user


def test_add_shows_a_prefixed_token_once_and_stores_only_its_hash(served: Served):
    user = add(served, "clerk")
    token = str(user["token"])
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > len(TOKEN_PREFIX) + 40
    assert user["admin"] is False
    assert status_with(served, token) == 200
    listed = client(served, "users", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {u["name"]: u for u in json.loads(listed.stdout)["items"]}
    assert "token" not in names["clerk"]
    db = served.root / "state" / "ptdaemon.db"
    assert token.encode() not in db.read_bytes()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        blobs = b"".join(
            json.dumps(row).encode() for row in conn.execute("SELECT * FROM users")
        )
    assert token.encode() not in blobs


def test_list_prints_one_line_per_user(served: Served):
    add(served, "lister")
    result = client(served, "users", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.endswith("  admin") and "admin" in line for line in lines)
    assert any(line.endswith("  lister") for line in lines)


def test_rotate_token_stops_the_old_one_at_once(served: Served):
    user = add(served, "rotator")
    old = str(user["token"])
    assert status_with(served, old) == 200
    result = client(served, "users", "rotate-token", "rotator", "--json")
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)["token"]
    assert new != old
    assert status_with(served, old) == 401
    assert status_with(served, new) == 200


def test_revoke_stops_the_token_at_once(served: Served):
    user = add(served, "leaver")
    token = str(user["token"])
    assert status_with(served, token) == 200
    result = client(served, "users", "revoke", str(user["id"]))
    assert result.returncode == 0, result.stderr
    assert status_with(served, token) == 401


def test_a_non_admin_token_cannot_manage_users(served: Served):
    user = add(served, "plain")
    env = cli_env(PTDAEMON_TOKEN=str(user["token"]))
    result = client(served, "users", "add", "sneaky", env=env)
    assert result.returncode == 1
    assert one_line(result.stderr).endswith("(forbidden)")
    assert status_with(served, str(user["token"]), "/v1/users") == 403


def test_an_admin_can_add_another_admin(served: Served):
    user = add(served, "deputy", "--admin")
    env = cli_env(PTDAEMON_TOKEN=str(user["token"]))
    result = client(served, "users", "add", "helper2", env=env)
    assert result.returncode == 0, result.stderr
    assert "token: pt_" in result.stdout or TOKEN_PREFIX in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("revoke", "nobody"), "no user named 'nobody'"),
        (("rotate-token", "nobody"), "no user named 'nobody'"),
    ],
)
def test_unknown_users_are_a_usage_error(served: Served, args, message):
    result = client(served, "users", *args)
    assert result.returncode == 2
    assert one_line(result.stderr) == f"ptdaemon: {message}"


def test_a_bad_name_is_refused_in_one_line(served: Served):
    result = client(served, "users", "add", "")
    assert result.returncode == 2
    assert "name" in one_line(result.stderr)


def test_rotating_the_admin_token_rewrites_the_token_file(served: Served):
    token_file = served.root / "state" / "admin.token"
    old = token_file.read_text().strip()
    result = client(served, "users", "rotate-token", "admin", "--json")
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)["token"]
    assert token_file.read_text().strip() == new
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert status_with(served, old) == 401
    # The CLI reads the file, so it keeps working.
    listed = client(served, "users", "list")
    assert listed.returncode == 0, listed.stderr
    leftovers = [p.name for p in token_file.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
