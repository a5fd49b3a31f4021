"""Disk trouble: a failed fsync stops the daemon; a full disk does not."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Api, DaemonProcess, Reply

# fsync and fdatasync fail with EIO while the file named by the variable
# exists; SQLite reaches fdatasync through the dynamic linker.
FAILING_SYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *trigger = getenv("FAIL_SYNC_WHILE_EXISTS");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
"""


def build_failing_sync(tmp_path: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the failing fsync library")
    source = tmp_path / "failing_sync.c"
    library = tmp_path / "failing_sync.so"
    source.write_text(FAILING_SYNC_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
        check=True,
        timeout=60,
    )
    return library


async def test_a_failed_fsync_stops_the_daemon_instead_of_retrying(sink, tmp_path):
    library = build_failing_sync(tmp_path)
    trigger = tmp_path / "disk-fails"
    url = sink.script("/in", then=Reply(200))
    process = DaemonProcess(tmp_path)
    process.env = {"LD_PRELOAD": str(library), "FAIL_SYNC_WHILE_EXISTS": str(trigger)}
    await process.start()
    api = Api(process.base, process.token)
    try:
        template = await api.template(method="API", target={"url": url})
        kept = await api.submit(template["id"], {"n": 1})

        trigger.touch()
        try:
            status, body = await api.request(
                "POST",
                "/v1/submissions",
                {"form_template_id": template["id"], "data": {}},
            )
        except aiohttp.ClientError:
            status, body = 0, None
        assert process.proc is not None
        code = await asyncio.to_thread(process.proc.wait, 30)

        trigger.unlink()
        process.env = {}
        await process.start()
        api.base = process.base
        again = await api.wait_final(kept["id"])
    finally:
        await api.close()
        await process.terminate()

    # The failed submission was refused, not acknowledged.
    assert status in (0, 503), body
    if status == 503:
        assert body["error"]["code"] == "storage_unavailable"
    assert code == 1
    log = process.log()
    assert "disk write failed, stopping" in log
    # One failure, no retries of the commit.
    assert log.count("store commit failed") == 1
    assert again["status"] == "completed"
    assert process.integrity_check() == "ok"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs as the daemon's state dir."""
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield state
    subprocess.run(["umount", "-l", str(state)], timeout=30, check=False)


def _write_until_error(fd: int, chunk: bytes) -> int | None:
    while True:
        try:
            os.write(fd, chunk)
        except OSError as exc:
            return exc.errno


def fill(directory: Path) -> Path:
    """Write zeros until the file system is full (unbuffered, so nothing is
    left to flush, and fail, on close)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        stopped_by = _write_until_error(fd, chunk)
    finally:
        os.close(fd)
    assert stopped_by == errno.ENOSPC, os.strerror(stopped_by or 0)
    return filler


async def test_a_full_disk_answers_503_and_resumes_when_space_returns(
    sink, small_disk, tmp_path
):
    url = sink.script("/in", then=Reply(200))
    process = DaemonProcess(tmp_path)
    await process.start()
    api = Api(process.base, process.token)
    try:
        template = await api.template(method="API", target={"url": url})
        before = [await api.submit(template["id"], {"n": n}) for n in range(5)]
        for sub in before:
            await api.wait_final(sub["id"])
        filler = fill(small_disk)

        body = {"form_template_id": template["id"], "data": {"pad": "x" * 200_000}}
        full = await api.send(
            "POST",
            "/v1/submissions",
            headers={"Content-Type": "application/json"},
            raw=json.dumps(body).encode(),
        )
        ready_full = await api.send("GET", "/readyz", auth=False)

        filler.unlink()
        status, after = await api.request("POST", "/v1/submissions", body)
        ready_again = await api.send("GET", "/readyz", auth=False)
        final = await api.wait_final(after["id"])
        kept = [await api.ok("GET", f"/v1/submissions/{s['id']}") for s in before]
    finally:
        await api.close()
        await process.terminate()

    assert full.status == 503
    assert full.json["error"]["code"] == "storage_unavailable"
    assert int(full.headers["Retry-After"]) >= 1
    assert ready_full.status == 503
    # The first request after space returned is stored, without a restart.
    assert status == 202
    assert ready_again.status == 200
    assert final["status"] == "completed"
    assert [s["status"] for s in kept] == ["completed"] * 5


async def test_a_held_write_lock_makes_requests_wait_never_500(sink, tmp_path):
    url = sink.script("/in", then=Reply(200))
    process = DaemonProcess(tmp_path)
    await process.start()
    api = Api(process.base, process.token)
    other = sqlite3.connect(process.state / "ptdaemon.db", isolation_level=None)
    try:
        template = await api.template(method="API", target={"url": url})
        body = {"form_template_id": template["id"], "data": {"n": 1}}

        # Shorter than the busy timeout (5 s): the request waits, then succeeds.
        other.execute("BEGIN IMMEDIATE")
        request = asyncio.create_task(api.request("POST", "/v1/submissions", body))
        await asyncio.sleep(1.0)
        still_waiting = not request.done()
        other.execute("COMMIT")
        status, sub = await request

        # Longer than the busy timeout: 503 with Retry-After, not 500.
        other.execute("BEGIN IMMEDIATE")
        blocked = await api.send(
            "POST",
            "/v1/submissions",
            headers={"Content-Type": "application/json"},
            raw=json.dumps(body).encode(),
        )
        other.execute("COMMIT")
        final = await api.wait_final(sub["id"])
    finally:
        other.close()
        await api.close()
        await process.terminate()

    assert still_waiting
    assert status == 202
    assert final["status"] == "completed"
    assert blocked.status == 503
    assert blocked.json["error"]["code"] == "storage_unavailable"
    assert "Retry-After" in blocked.headers
