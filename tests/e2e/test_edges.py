"""Edges that need the real `ptdaemon` process or a real destination."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DaemonProcess, Reply, Sink

COMMAND_TIMEOUT_SECONDS = 30.0
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR) ")
FAR_FUTURE = "2999-01-01T00:00:00Z"
NOWHERE = "http://127.0.0.1:9/x"


def one_line(stderr: str) -> str:
    """The single message line a failing command prints, and nothing else."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def one_message(stderr: str) -> str:
    """`serve` logs to stderr too: besides log lines, exactly one message line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if not LOG_LINE.match(ln)]
    assert len(lines) == 1, stderr
    return lines[0]


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PTDAEMON_TOKEN"}


async def ptdaemon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m ptdaemon ARGS` to its end, with a bounded wait."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ptdaemon", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        encoding="utf-8",
        env=cli_env(),
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def db_rows(process: DaemonProcess, sql: str, *params: Any) -> list[Any]:
    with contextlib.closing(sqlite3.connect(process.state / "ptdaemon.db")) as conn:
        return conn.execute(sql, params).fetchall()


# -- replies whose body comes slowly -------------------------------------------


async def test_a_2xx_with_a_body_slower_than_the_timeout_completes(
    sink: Sink, start_daemon
):
    url = sink.script("/drip", then=Reply(200, drip=0.2, count=30))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=0.5, max_retries=3
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "completed", final
    assert final["error_category"] is None
    assert [(a["outcome"], a["status"]) for a in attempts] == [("success", 200)]
    assert len(sink.seen("/drip")) == 1


async def test_a_503_with_a_slow_body_is_remote_and_keeps_its_status(
    sink: Sink, start_daemon
):
    url = sink.script("/drip", then=Reply(503, drip=0.2, count=30))
    _, api = await start_daemon()
    template = await api.template(
        method="API", target={"url": url}, timeout_seconds=0.5, max_retries=0
    )
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote", final
    assert final["error_details"]["status"] == 503
    assert [(a["error_category"], a["status"]) for a in attempts] == [("remote", 503)]


# -- redirects -----------------------------------------------------------------


@pytest.mark.parametrize("location", ["http://[::1", "ftp://127.0.0.1/x"])
async def test_a_307_to_a_location_that_cannot_be_followed_is_final(
    sink: Sink, start_daemon, location: str
):
    url = sink.script(
        "/moved", then=Reply(307, body=b"", headers={"Location": location})
    )
    _, api = await start_daemon()
    template = await api.template(method="API", target={"url": url}, max_retries=3)
    sub = await api.submit(template["id"], {"name": "Ada"})

    final = await api.wait_final(sub["id"])
    attempts = await api.attempts(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "remote", final
    assert final["retry_count"] == 0
    assert final["error_details"]["retryable"] is False
    assert final["error_details"]["location"] == location
    assert len(attempts) == 1
    assert len(sink.seen("/moved")) == 1


# -- templates in the config file ----------------------------------------------

BAD_TEMPLATES = {
    "ftp url": 'method = "API"\ntarget = {url = "ftp://x"}\n',
    "outside file_roots": 'method = "FILE"\ntarget = {directory = "../outside"}\n',
    "bad email address": 'method = "EMAIL"\ntarget = {to = ["clerk"], subject = "s"}\n',
    "unknown plugin": 'method = "CUSTOM"\ntarget = {handler = "no-such-plugin"}\n',
    "short secret": (
        f'method = "API"\ntarget = {{url = "{NOWHERE}"}}\nsigning_secret = "short"\n'
    ),
    "empty path": (
        f'method = "API"\ntarget = {{url = "{NOWHERE}"}}\nfield_map = {{a = ""}}\n'
    ),
}


@pytest.mark.parametrize("template", BAD_TEMPLATES.values(), ids=BAD_TEMPLATES)
async def test_check_config_and_serve_refuse_the_same_templates(
    tmp_path: Path, template: str
):
    (tmp_path / "config.toml").write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[api]\nlisten = "127.0.0.1:0"\n'
        '[dispatch]\nfile_roots = ["drop"]\n'
        '\n[[templates]]\nname = "bad"\n' + template,
        encoding="utf-8",
    )

    checked = await ptdaemon("check-config", "--config", "config.toml", cwd=tmp_path)
    served = await ptdaemon("serve", "--config", "config.toml", cwd=tmp_path)

    assert checked.returncode == 2, checked.stdout
    assert "templates[0]" in one_line(checked.stderr)
    assert checked.stdout == ""
    assert served.returncode == 2, served.stderr
    assert "templates[0]" in one_message(served.stderr)
    assert not (tmp_path / "state").exists()


# -- serve cannot start --------------------------------------------------------


@pytest.mark.parametrize("case", ["state_dir", "unix_listen"])
async def test_serve_on_unusable_paths_fails_in_one_line(tmp_path: Path, case: str):
    (tmp_path / "afile").write_text("not a directory\n")
    if case == "state_dir":
        config = '[daemon]\nstate_dir = "afile/state"\n[api]\nlisten = "127.0.0.1:0"\n'
        named = "afile"
    else:
        socket_path = tmp_path / "missing" / "dir" / "api.sock"
        config = (
            f'[daemon]\nstate_dir = "state"\n[api]\nlisten = "unix:{socket_path}"\n'
        )
        named = "missing/dir"
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")

    served = await ptdaemon("serve", "--config", "config.toml", cwd=tmp_path)

    assert served.returncode != 0
    message = one_message(served.stderr)
    assert message.startswith("ptdaemon: ")
    assert named in message


# -- stopping ------------------------------------------------------------------


async def test_during_the_sigterm_drain_new_calls_get_503(sink: Sink, start_daemon):
    url = sink.script("/slow", then=Reply(200, delay=3.0))
    process, api = await start_daemon(grace=5.0)
    template = await api.template(method="API", target={"url": url})
    sub = await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "daemon stopping" not in process.log():
        assert time.monotonic() < deadline, process.log()
        await asyncio.sleep(0.02)
    answer = await api.send("GET", f"/v1/submissions/{sub['id']}")
    health = await api.send("GET", "/healthz")
    ready = await api.send("GET", "/readyz")
    code = await process.terminate()
    [(status,)] = db_rows(
        process, "SELECT status FROM submissions WHERE id = ?", sub["id"]
    )

    assert answer.status == 503, answer.raw
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["message"]
    assert answer.headers["Retry-After"].isdigit()
    assert health.status == 200
    assert ready.status == 503
    assert code == 0
    assert status == "completed"


# -- files on disk ---------------------------------------------------------------


async def test_the_database_and_its_wal_files_are_private(start_daemon):
    process, api = await start_daemon()
    await api.template(method="API", target={"url": NOWHERE})

    modes = {
        name: stat.S_IMODE((process.state / name).stat().st_mode)
        for name in ("ptdaemon.db", "ptdaemon.db-wal", "ptdaemon.db-shm")
    }

    assert modes == dict.fromkeys(modes, 0o600)


# -- the command line against a running daemon ---------------------------------


async def test_cli_list_by_template_name_and_empty_idempotency_key(
    start_daemon, tmp_path: Path
):
    process, api = await start_daemon()
    port = process.base.rsplit(":", 1)[1]
    (tmp_path / "cli.toml").write_text(
        f'[daemon]\nstate_dir = "state"\n[api]\nlisten = "127.0.0.1:{port}"\n',
        encoding="utf-8",
    )
    alpha = await api.template(name="alpha", method="API", target={"url": NOWHERE})
    beta = await api.template(name="beta", method="API", target={"url": NOWHERE})
    alpha_ids = {
        (await api.submit(alpha["id"], {"n": n}, scheduled_at=FAR_FUTURE))["id"]
        for n in range(2)
    }
    await api.submit(beta["id"], {"n": 9}, scheduled_at=FAR_FUTURE)

    listed = await ptdaemon(
        "list", "--config", "cli.toml", "--template", "alpha", "--json", cwd=tmp_path
    )
    empty_key = await ptdaemon(
        "submit",
        "--config",
        "cli.toml",
        "alpha",
        "--data",
        "{}",
        "--idempotency-key",
        "",
        cwd=tmp_path,
    )
    everything = await api.ok("GET", "/v1/submissions")

    assert listed.returncode == 0, listed.stderr
    assert {item["id"] for item in json.loads(listed.stdout)["items"]} == alpha_ids
    assert empty_key.returncode == 2, empty_key.stdout
    assert one_line(empty_key.stderr)
    assert empty_key.stdout == ""
    assert len(everything["items"]) == 3
