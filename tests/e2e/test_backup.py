"""`ptdaemon backup` under load, its restore, `ptdaemon status`, retention."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from tests.e2e.conftest import Api, DaemonProcess, Reply, free_port

SUBMITTERS = 8


async def cli(process: DaemonProcess, *args: str) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ptdaemon",
        *args,
        "--config",
        str(process.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_a_backup_taken_under_load_holds_every_acknowledged_row(
    sink, start_daemon, tmp_path
):
    url = sink.script("/in", then=Reply(200))
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    acked: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def submitter(worker: int) -> None:
        while not stop.is_set():
            sub = await api.submit(template["id"], {"worker": worker})
            acked.append((time.monotonic(), sub["id"]))

    workers = [asyncio.create_task(submitter(n)) for n in range(SUBMITTERS)]
    try:
        while len(acked) < 200:
            await asyncio.sleep(0.05)
        backup_started = time.monotonic()
        code, out, err = await cli(process, "backup", str(tmp_path / "copy.db"))
        backup_ended = time.monotonic()
        count_at_end = len(acked)
        while len(acked) < count_at_end + 100:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert code == 0, err
    assert out.startswith(f"backup written: {tmp_path / 'copy.db'}")
    before = {sub_id for at, sub_id in acked if at < backup_started}
    conn = sqlite3.connect(tmp_path / "copy.db")
    try:
        [(verdict,)] = conn.execute("PRAGMA integrity_check").fetchall()
        [(mode,)] = conn.execute("PRAGMA journal_mode").fetchall()
        stored = {row[0] for row in conn.execute("SELECT id FROM submissions")}
    finally:
        conn.close()
    assert verdict == "ok"
    assert mode == "delete"
    assert len(before) >= 200
    assert before <= stored
    # Submissions went on while the copy was made: the writer was not held.
    during = [at for at, _ in acked if backup_started < at < backup_ended]
    assert during, "no submission was acknowledged during the backup"
    assert (tmp_path / "copy.db").stat().st_mode & 0o777 == 0o600


async def test_a_backup_restores_into_a_new_state_dir(sink, start_daemon, tmp_path):
    url = sink.script("/in", then=Reply(200))
    process, api = await start_daemon()
    template = await api.template(method="API", target={"url": url})
    sub = await api.submit(template["id"], {"name": "Ada"})
    await api.wait_final(sub["id"])
    code, _, err = await cli(process, "backup", str(tmp_path / "copy.db"))
    assert code == 0, err
    assert await process.terminate() == 0

    # The documented restore: stopped daemon, database replaced, WAL removed.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{process.state}/ptdaemon.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "copy.db", process.state / "ptdaemon.db")
    await process.start()
    api.base = process.base
    restored = await api.ok("GET", f"/v1/submissions/{sub['id']}")

    assert restored["status"] == "completed"
    assert [a["outcome"] for a in await api.attempts(sub["id"])] == ["success"]


async def test_backup_refuses_to_overwrite(start_daemon, tmp_path):
    process, _ = await start_daemon()
    (tmp_path / "taken.db").write_text("keep me")

    code, _, err = await cli(process, "backup", str(tmp_path / "taken.db"))

    assert code == 2
    assert "already exists" in err
    assert (tmp_path / "taken.db").read_text() == "keep me"


async def test_status_shows_health_queue_and_size(sink, tmp_path):
    url = sink.script("/slow", then=Reply(200, delay=30))
    # The status command finds the daemon at the configured address.
    process = DaemonProcess(tmp_path)
    config = process.config_path.read_text()
    port_zero = 'listen = "127.0.0.1:0"'
    assert port_zero in config
    process.config_path.write_text(
        config.replace(port_zero, f'listen = "127.0.0.1:{free_port()}"')
    )
    await process.start()
    api = Api(process.base, process.token)
    try:
        await check_status(process, api, sink, url)
    finally:
        await api.close()
        await process.terminate()


async def check_status(process: DaemonProcess, api: Api, sink, url: str) -> None:
    template = await api.template(method="API", target={"url": url}, timeout_seconds=60)
    await api.submit(template["id"], {"name": "Ada"})
    await sink.wait_for("/slow", 1)

    code, out, _ = await cli(process, "status", "--json")
    text_code, text, _ = await cli(process, "status")

    assert code == 0, out
    report = json.loads(out)
    assert report["health"] == "ready"
    assert report["pid"] == process.pid
    assert report["queue"] == {
        "depth": 0,
        "processing": 1,
        "oldest_due_age_seconds": None,
    }
    assert report["database"]["bytes"] > 0
    assert report["database"]["path"] == str(process.state / "ptdaemon.db")
    assert text_code == 0
    assert f"daemon: ready, pid {process.pid}" in text
    assert "queue: 0 due, 1 in flight" in text


async def test_status_of_a_stopped_daemon_exits_1(start_daemon):
    process, _ = await start_daemon()
    assert await process.terminate() == 0

    code, out, _ = await cli(process, "status")

    assert code == 1
    assert out.splitlines()[0] == "daemon: not running"


async def test_retention_removes_old_finished_submissions_at_start(sink, start_daemon):
    url = sink.script("/in", then=Reply(200))
    # 0.00002 days: finished submissions go after about 1.7 s.
    process, api = await start_daemon("[retention]\nfinished_days = 0.00002\n")
    template = await api.template(method="API", target={"url": url})
    done = await api.submit(template["id"], {"n": 1})
    await api.wait_final(done["id"])
    waiting = await api.submit(
        template["id"], {"n": 2}, scheduled_at="2999-01-01T00:00:00Z"
    )
    assert await process.terminate() == 0

    await asyncio.sleep(2.0)
    await process.start()
    api.base = process.base
    gone, _ = await api.request("GET", f"/v1/submissions/{done['id']}")
    kept = await api.ok("GET", f"/v1/submissions/{waiting['id']}")

    assert gone == 404
    assert kept["status"] == "pending"
    assert "finished submissions removed count=1" in process.log()
