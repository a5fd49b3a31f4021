"""The daemon as a whole, embedded: start, lock, recovery, config templates."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from ptdaemon.config import load_config
from ptdaemon.daemon import Daemon
from ptdaemon.errors import LockedError


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[api]\nlisten = "127.0.0.1:0"\nrate_per_second = 0\n'
        '[dispatch]\nfile_roots = ["drop"]\n'
        '[security]\nallow_networks = ["127.0.0.0/8"]\n'
        "\n[[templates]]\n"
        'name = "drop"\nmethod = "FILE"\n'
        'target = {directory = "drop", filename = "{id}.json"}\n'
        "retry_backoff_seconds = 0.05\n" + extra
    )
    return path


async def wait_status(daemon: Daemon, sub_id: str, status: str) -> dict:
    async with asyncio.timeout(10):
        while (sub := await daemon.get(sub_id))["status"] != status:
            await asyncio.sleep(0.01)
    return sub


async def test_embedded_daemon_delivers_without_an_api(tmp_path: Path):
    config = load_config(write_config(tmp_path))

    async with Daemon(config, api=False) as daemon:
        [template] = await daemon.service.list_templates(daemon.user)
        sub = await daemon.submit(template.id, {"name": "Ada"})
        done = await wait_status(daemon, sub["id"], "completed")
        assert daemon.listen_address is None

    written = tmp_path / "drop" / f"{sub['id']}.json"
    assert written.read_text().strip() == '{"name":"Ada"}'
    assert done["response_data"]["path"] == str(written)


async def test_config_templates_are_updated_by_name_on_restart(tmp_path: Path):
    path = write_config(tmp_path)
    async with Daemon(path, api=False) as daemon:
        [first] = await daemon.service.list_templates(daemon.user)
    path.write_text(path.read_text().replace("0.05", "0.5"))

    async with Daemon(path, api=False) as daemon:
        [second] = await daemon.service.list_templates(daemon.user)

    assert second.id == first.id
    assert second.retry_backoff_seconds == 0.5


async def test_a_second_daemon_on_the_same_state_dir_refuses(tmp_path: Path):
    path = write_config(tmp_path)

    async with Daemon(path, api=False):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            await Daemon(path, api=False).start()


async def test_first_start_writes_a_private_admin_token_once(tmp_path: Path):
    path = write_config(tmp_path)
    token_file = tmp_path / "state" / "admin.token"

    async with Daemon(path, api=False):
        token = token_file.read_text()
    async with Daemon(path, api=False):
        pass

    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text() == token
    assert token.startswith("ptd_")


async def test_rows_left_processing_by_a_crash_are_recovered(tmp_path: Path):
    path = write_config(tmp_path)
    async with Daemon(path, api=False) as daemon:
        [template] = await daemon.service.list_templates(daemon.user)
        far = await daemon.submit(
            template.id, {"a": 1}, scheduled_at="2999-01-01T00:00:00Z"
        )
    db = tmp_path / "state" / "ptdaemon.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE submissions SET status = 'processing',"
            " processing_started_at = 1.0, next_retry_at = NULL WHERE id = ?",
            (far["id"],),
        )

    async with Daemon(path, api=False) as daemon:
        done = await wait_status(daemon, far["id"], "completed")
        attempts = await daemon.service.list_attempts(daemon.user, far["id"])

    assert [a.outcome.value for a in attempts] == ["interrupted", "success"]
    assert attempts[0].error_category == "system"
    assert done["retry_count"] == 1


async def test_a_crash_looping_submission_ends_failed(tmp_path: Path):
    path = write_config(tmp_path)
    async with Daemon(path, api=False) as daemon:
        [template] = await daemon.service.list_templates(daemon.user)
        sub = await daemon.submit(
            template.id, {"a": 1}, scheduled_at="2999-01-01T00:00:00Z"
        )
    db = tmp_path / "state" / "ptdaemon.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE submissions SET status = 'processing', retry_count = 3,"
            " processing_started_at = 1.0 WHERE id = ?",
            (sub["id"],),
        )

    async with Daemon(path, api=False) as daemon:
        final = await daemon.get(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "system"
    assert final["next_retry_at"] is None


async def test_embedded_daemon_can_serve_the_api_too(tmp_path: Path):
    import aiohttp

    path = write_config(tmp_path)
    async with Daemon(path, api=True) as daemon:
        assert daemon.listen_address is not None
        url = f"http://{daemon.listen_address}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as reply:
            body = await reply.json()

    assert body == {"status": "ok"}


async def test_the_api_listens_on_a_unix_socket(tmp_path: Path):
    import aiohttp

    path = write_config(tmp_path)
    socket_path = tmp_path / "api.sock"
    path.write_text(path.read_text().replace("127.0.0.1:0", f"unix:{socket_path}"))

    async with Daemon(path, api=True) as daemon:
        mode = socket_path.stat().st_mode & 0o777
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://localhost/healthz") as reply,
        ):
            body = await reply.json()

    assert daemon.listen_address == f"unix:{socket_path}"
    assert mode == 0o600
    assert body == {"status": "ok"}
