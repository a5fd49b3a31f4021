"""SIGKILL at each named moment of a submission's life, then the same counts.

The daemon kills itself where PTDAEMON_TEST_CRASH_AT says (a test-only
hook, see ptdaemon/crashpoints.py); the restarted daemon must finish the
work with nothing lost and no delivery that no attempt accounts for.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.e2e.conftest import Api, DaemonProcess, Reply, Sink


async def restart_after_crash(process: DaemonProcess, api: Api) -> None:
    """Wait for the daemon to kill itself, check the file, start it again."""
    assert process.proc is not None
    await asyncio.to_thread(process.proc.wait, 10)
    assert process.proc.returncode == -9
    assert process.integrity_check() == "ok"
    process.env = {}
    await process.start()
    api.base = process.base


async def start(tmp_path, moment: str) -> tuple[DaemonProcess, Api]:
    process = DaemonProcess(tmp_path)
    process.env = {"PTDAEMON_TEST_CRASH_AT": moment}
    await process.start()
    return process, Api(process.base, process.token)


async def check_counts(api: Api, sink: Sink, sub_id: str) -> list[str]:
    """Completed, delivered, and no delivery beyond its attempts."""
    final = await api.wait_final(sub_id)
    attempts = await api.attempts(sub_id)
    arrivals = [s for s in sink.requests if s.headers["Idempotency-Key"] == sub_id]
    assert final["status"] == "completed"
    assert arrivals
    assert len(arrivals) <= len(attempts)
    return [a["outcome"] for a in attempts]


async def test_kill_after_the_commit_before_the_202(sink, tmp_path):
    url = sink.script("/in", then=Reply(200))
    process, api = await start(tmp_path, "submission-committed")
    try:
        template = await api.template(method="API", target={"url": url})
        body = {
            "form_template_id": template["id"],
            "data": {"name": "Ada"},
            "idempotency_key": "k-1",
        }
        with pytest.raises(aiohttp.ClientError):
            await api.request("POST", "/v1/submissions", body)
        await restart_after_crash(process, api)
        # Not acknowledged, yet stored: the retried request finds it.
        status, sub = await api.request("POST", "/v1/submissions", body)
        assert status == 200
        outcomes = await check_counts(api, sink, sub["id"])
    finally:
        await api.close()
        await process.terminate()

    assert outcomes == ["success"]
    assert len(sink.seen("/in")) == 1


@pytest.mark.parametrize(
    ("moment", "requests_sent"),
    [
        # Cut before the connection: the one request is the retry's.
        ("claim-committed", 1),
        # At least once: the answered request is sent again, with the same key.
        ("reply-received", 2),
    ],
)
async def test_kill_during_an_attempt(sink, tmp_path, moment, requests_sent):
    url = sink.script("/in", then=Reply(200))
    process, api = await start(tmp_path, moment)
    try:
        template = await api.template(method="API", target={"url": url})
        sub = await api.submit(template["id"], {"name": "Ada"})
        await restart_after_crash(process, api)
        outcomes = await check_counts(api, sink, sub["id"])
    finally:
        await api.close()
        await process.terminate()

    assert outcomes == ["interrupted", "success"]
    assert len(sink.seen("/in")) == requests_sent


async def test_kill_between_a_file_drops_write_and_rename(tmp_path):
    process, api = await start(tmp_path, "file-written")
    drop = process.drop
    try:
        template = await api.template(
            method="FILE", target={"directory": str(drop), "format": "json"}
        )
        sub = await api.submit(template["id"], {"name": "Ada"})
        await restart_after_crash(process, api)
        final = await api.wait_final(sub["id"])
        attempts = await api.attempts(sub["id"])
    finally:
        await api.close()
        await process.terminate()

    assert final["status"] == "completed"
    assert [a["outcome"] for a in attempts] == ["interrupted", "success"]
    assert json.loads((drop / f"{sub['id']}.json").read_text()) == {"name": "Ada"}
    names = sorted(p.name for p in drop.iterdir())
    # Limit: the cut write's temporary file stays (see README).
    assert [n for n in names if not n.endswith(".tmp")] == [f"{sub['id']}.json"]
    assert len(names) == 2
