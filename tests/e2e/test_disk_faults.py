"""Disk trouble: a failed fsync stops the daemon; a full disk does not."""

from __future__ import annotations

import asyncio
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


def integrity(process: DaemonProcess) -> str:
    conn = sqlite3.connect(process.state / "ptdaemon.db")
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


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
    assert integrity(process) == "ok"
